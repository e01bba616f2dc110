"""Scaled fp8 derivatives (audit/quantized.py), written the way ComfyUI writes them: each linear
weight stored as float8 with scale max|w| / fp8 max beside it (legacy: ``scaled_fp8`` marker and
``.scale_weight``; current: ``.weight_scale`` and ``.comfy_quant``). The base so written is
compliant; one fp8 step in a frozen tensor is a violation, in a trainable one is not; an outsized
scale, an unknown format, a per-row scale or a NaN are never certified."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from freezeasguard.audit.quantized import exporter_scale, quantize
from freezeasguard.audit.tensorfile import all_finite
from freezeasguard.audit.verify import denoiser_config
from freezeasguard.cli import main
from freezeasguard.guard.mask import Mask
from freezeasguard.models.families.tiny import save_tiny
from freezeasguard.models.pipelines import fingerprint, load_denoiser_state
from test_audit import write_bfl_file, write_sd3_file

WRITERS = {"flux": (write_bfl_file, "model.diffusion_model.", "double_blocks.0.img_attn.qkv.weight"),
           "sd3": (write_sd3_file, "model.diffusion_model.", "joint_blocks.0.x_block.attn.qkv.weight")}


def scaled_fp8(tensors: dict, convention: str, dtype=torch.float8_e4m3fn, prefix: str = "") -> dict:
    """ComfyUI's scaled fp8 of a single file: every 2-D weight of the denoiser quantized per tensor,
    scale = max|w| / fp8 max (float32), (w / scale) clamped and cast; the rest kept."""
    out = {}
    for key, t in tensors.items():
        if key.startswith(prefix) and key.endswith(".weight") and t.ndim == 2:
            top = torch.finfo(dtype).max
            scale = t.float().abs().max() / top
            out[key] = (t.float() / scale).clamp(-top, top).to(dtype)
            stem = key[:-len(".weight")]
            if convention == "legacy":
                out[stem + ".scale_weight"] = scale.reshape(())
            else:
                out[stem + ".weight_scale"] = scale.reshape(())
                out[stem + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": str(dtype)[6:]}).encode()),
                                                          dtype=torch.uint8)
        else:
            out[key] = t
    if convention == "legacy":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=dtype)
    return out


# FLUX.1 in the fast suite, SD3.5 with -m slow (CI runs both)
@pytest.fixture(scope="module", params=[f if f == "flux" else pytest.param(f, marks=pytest.mark.slow)
                                        for f in sorted(WRITERS)])
def base_files(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family + "-fp8")
    folder = save_tiny(tmp / "model", family)
    base, config = load_denoiser_state(folder), denoiser_config(folder)
    write, prefix, fused = WRITERS[family]
    write(base, config, tmp / "full.safetensors", prefix=prefix)
    names = list(base)
    frozen = fused_part = None
    for n in names:     # freeze one projection of the fused q/k/v, keep another of the same tensor trainable
        if n.endswith((".attn.to_k.weight",)) and (n.startswith("transformer_blocks.0.")):
            frozen = n
        if n.endswith(".attn.to_q.weight") and n.startswith("transformer_blocks.0."):
            fused_part = n
    scores = torch.tensor([1.0 if n == frozen or ".ff." in n else 0.0 for n in names])
    mask = Mask.from_scores([(n, base[n]) for n in names], scores, 0.2, base_fingerprint=fingerprint(base.items()))
    assert frozen in mask.frozen_names and fused_part not in mask.frozen_names
    return family, folder, mask.save(tmp / "mask.safetensors"), tmp / "full.safetensors", prefix, fused, tmp


def _verify(capsys, folder, mask, candidate, *extra):
    code = main(["verify", "--mask", str(mask), "--candidate", str(candidate), *extra] +
                (["--model", str(folder)] if folder else []))
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return code, out.out + out.err


@pytest.mark.parametrize("convention", ["legacy", "current"])
def test_scaled_fp8_of_the_base_is_compliant_and_one_step_in_a_frozen_part_is_not(base_files, convention, capsys):
    family, folder, mask, full, prefix, fused, tmp = base_files
    tensors = load_file(str(full))
    fp8 = scaled_fp8(tensors, convention, prefix=prefix)
    save_file(fp8, str(tmp / f"{convention}.safetensors"))
    code, out = _verify(capsys, folder, mask, tmp / f"{convention}.safetensors")
    assert code == 0, out
    # the fused q/k/v's rows: q (trainable) then k (frozen); one fp8 step in each
    rows = fp8[prefix + fused].shape[0] // 3

    def step(row):
        bumped = dict(fp8)
        q = fp8[prefix + fused].clone()
        bits = q.view(torch.uint8)
        bits[row, 1] = bits[row, 1] + 1 if bits[row, 1] & 0x7F < 0x7E else bits[row, 1] - 1
        bumped[prefix + fused] = q
        path = tmp / f"{convention}-step{row}.safetensors"
        save_file(bumped, str(path))
        return path
    code, out = _verify(capsys, folder, mask, step(rows + 1))           # a row of k
    assert code == 1 and "fp8 bits differ from the base quantized" in out and "attn.to_k.weight" in out, out
    code, out = _verify(capsys, folder, mask, step(1))                  # a row of q
    assert code == 0, out
    # the mask's digests alone cannot audit a quantized file: said, exit 2
    code, out = _verify(capsys, None, mask, tmp / f"{convention}.safetensors")
    assert code == 2 and "--model" in out


def test_an_outsized_scale_an_unknown_format_a_row_scale_and_nan_are_never_certified(base_files, capsys):
    family, folder, mask, full, prefix, fused, tmp = base_files
    fp8 = scaled_fp8(load_file(str(full)), "current", prefix=prefix)
    stem = prefix + fused[:-len(".weight")]
    # a scale 1000x the exporter's: the base's bits at that scale are mostly zero, and "match"
    huge = dict(fp8)
    scale = fp8[stem + ".weight_scale"] * 1000
    base_w = load_file(str(full))[prefix + fused]
    huge[prefix + fused] = quantize(base_w, float(scale), torch.float8_e4m3fn)
    huge[stem + ".weight_scale"] = scale
    save_file(huge, str(tmp / "huge.safetensors"))
    code, out = _verify(capsys, folder, mask, tmp / "huge.safetensors")
    assert code == 1 and "the tensor is quantized away" in out, out
    for name, change in (("nvfp4", {stem + ".comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}),
                         ("rows", {stem + ".weight_scale": torch.ones(base_w.shape[0])}),
                         ("nan", {prefix + fused: torch.full(base_w.shape, float("nan")).to(torch.float8_e4m3fn)})):
        save_file({**fp8, **change}, str(tmp / f"{name}.safetensors"))
        code, out = _verify(capsys, folder, mask, tmp / f"{name}.safetensors")
        assert code == 2, (name, out)
    assert "'nvfp4', a format the audit does not read" in _verify(capsys, folder, mask, tmp / "nvfp4.safetensors")[1]


def test_the_exporter_scale_and_quantizer_by_hand():
    assert exporter_scale(448.0, torch.float8_e4m3fn) == 1.0 and exporter_scale(57344.0, torch.float8_e5m2) == 1.0
    q = quantize(torch.tensor([1.0, 2.5, -700.0, 0.0]), 0.5, torch.float8_e4m3fn)
    assert q.float().tolist() == [2.0, 5.0, -448.0, 0.0]       # 2.5/0.5 = 5; -1400 clamped to -448
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):      # every byte, alone and amid finite values
        amid = torch.randn(999).to(dtype)
        for byte in range(256):
            one = torch.tensor([byte], dtype=torch.uint8).view(dtype)
            chunk = amid.clone()
            chunk.view(torch.uint8)[321] = byte
            assert all_finite(one) == bool(torch.isfinite(one.float()).all()), (dtype, byte)
            assert all_finite(chunk) == bool(torch.isfinite(chunk.float()).all()), (dtype, byte)
    assert not all_finite(torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_plain_fp8_cast_is_read_and_compared_with_the_base_so_cast(base_files, dtype, capsys):
    """No scale: every denoiser tensor cast to fp8 (the aminmax the finite check used has no fp8
    kernel: such files failed with an internal error before)."""
    family, folder, mask, full, prefix, fused, tmp = base_files
    cast = {k: (v.to(dtype) if k.startswith(prefix) else v) for k, v in load_file(str(full)).items()}
    save_file(cast, str(tmp / "cast.safetensors"))
    code, out = _verify(capsys, folder, mask, tmp / "cast.safetensors")
    assert code == 0, out
    bumped = cast[prefix + fused].clone()
    bumped.view(torch.uint8)[bumped.shape[0] // 3 + 1, 0] ^= 1          # a row of the frozen k
    save_file({**cast, prefix + fused: bumped}, str(tmp / "cast-bumped.safetensors"))
    code, out = _verify(capsys, folder, mask, tmp / "cast-bumped.safetensors")
    assert code == 1 and "attn.to_k.weight" in out, out


def test_fp8_casts_and_gguf_q8_0_audit_without_the_base_from_the_masks_digests(base_files, tmp_path, capsys):
    """The record holds digests of each frozen tensor cast to fp8 and of its Q8_0 blocks (the gguf
    package's encoding, deterministic): such files audit base-free; a scaled fp8 file still needs
    the base (its bits depend on the scale its exporter chose)."""
    import gguf
    from freezeasguard.audit.verify import record_digests
    family, folder, mask, full, prefix, fused, tmp = base_files
    recorded = record_digests(Mask.load(mask), folder).save(tmp_path / "rec.safetensors")
    tensors = load_file(str(full))
    cast = {k: (v.to(torch.float8_e5m2) if k.startswith(prefix) else v) for k, v in tensors.items()}
    save_file(cast, str(tmp_path / "cast.safetensors"))
    assert _verify(capsys, None, recorded, tmp_path / "cast.safetensors")[0] == 0
    bumped = cast[prefix + fused].clone()
    bumped.view(torch.uint8)[bumped.shape[0] // 3 + 1, 0] ^= 1
    save_file({**cast, prefix + fused: bumped}, str(tmp_path / "cast-bumped.safetensors"))
    code, out = _verify(capsys, None, recorded, tmp_path / "cast-bumped.safetensors")
    assert code == 1 and "attn.to_k.weight" in out, out

    def q8(state, path):     # every 2-D tensor whose rows split into 32s as Q8_0, the rest F32 (tiny widths: 16)
        writer = gguf.GGUFWriter(path=str(path), arch="flux" if family == "flux" else "sd3")
        for key, t in state.items():
            if not key.startswith(prefix):
                continue
            data = t.float().numpy()
            kind = gguf.GGMLQuantizationType.Q8_0 if data.ndim == 2 and data.shape[1] % 32 == 0 else \
                gguf.GGMLQuantizationType.F32
            writer.add_tensor(key[len(prefix):], gguf.quants.quantize(data, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path
    good = q8(tensors, tmp_path / "q8.gguf")
    for ref in (folder, None):
        code, out = _verify(capsys, ref, recorded, good)
        assert code == 0, out
    # a frozen feed-forward down-projection (rows 64 wide: Q8_0) moved: flagged with and without the base
    down, param = {"flux": ("double_blocks.0.img_mlp.2.weight", "transformer_blocks.0.ff.net.2.weight"),
                   "sd3": ("joint_blocks.0.x_block.mlp.fc2.weight", "transformer_blocks.0.ff.net.2.weight")}[family]
    assert param in Mask.load(mask).frozen_names and tensors[prefix + down].shape[1] % 32 == 0
    moved = dict(tensors)
    moved[prefix + down] = tensors[prefix + down] + 0.5
    bad = q8(moved, tmp_path / "q8-moved.gguf")
    for ref in (folder, None):
        code, out = _verify(capsys, ref, recorded, bad)
        assert code == 1 and param in out, out
