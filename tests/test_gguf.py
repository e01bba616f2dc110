"""GGUF derivatives in city96's layout (audit/gguf_file.py, quantized.py), on FLUX.1 and SD3.5
transformers wide enough for GGUF's blocks (256-wide rows), written the way city96's convert
script writes them (original-layout keys without prefix; 1-D and small tensors F32; the rest
quantized, F16 where a type does not fit) and loaded back through diffusers' own GGUF loader
to show they are real files. Q8_0 (the gguf package's quantizer: exact) and Q4_K (llama.cpp's
K-quant, written here by a round-to-nearest Q4_K packer and read back by gguf's dequantizer:
within the type's bound): the base is compliant, a frozen tensor moved is a violation, a
trainable one is not, and every quantized tensor's bound is in the report."""
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from freezeasguard.audit.quantized import gguf_bound
from freezeasguard.audit.verify import denoiser_config, verify_checkpoint
from freezeasguard.cli import main
from freezeasguard.guard.mask import Mask
from freezeasguard.models.families.tiny import save_tiny
from freezeasguard.models.pipelines import fingerprint, load_denoiser_state
from test_audit import write_bfl_file, write_sd3_file

# city96's convert: keys kept in F32 beside the 1-D and small (<= 1024 values) ones
HIGH_PRECISION = ("time_in.", "txt_in.", "vector_in.", "img_in.", "guidance_in.", "final_layer.")
Q = gguf.GGMLQuantizationType


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of a multiple of 256 values as Q4_K blocks (llama.cpp's layout: fp16 d and dmin, 12
    bytes of 6-bit sub-block scales and mins, 128 bytes of 4-bit values), rounding to nearest."""
    rows, cols = x.shape
    out = np.zeros((rows, cols // 256, 144), dtype=np.uint8)
    for r in range(rows):
        for b in range(cols // 256):
            v = x[r, b * 256:(b + 1) * 256].astype(np.float64).reshape(8, 32)
            lo, hi = np.minimum(v.min(1), 0.0), v.max(1)
            scale, mins = (hi - lo) / 15, -lo
            d = np.float16(scale.max() / 63 if scale.max() > 0 else 0.0)
            dmin = np.float16(mins.max() / 63 if mins.max() > 0 else 0.0)
            sc = np.clip(np.round(scale / float(d)) if d else np.zeros(8), 0, 63).astype(np.uint8)
            m = np.clip(np.round(mins / float(dmin)) if dmin else np.zeros(8), 0, 63).astype(np.uint8)
            step = float(d) * sc.astype(np.float64)
            q = np.where(step[:, None] > 0, np.round((v + float(dmin) * m[:, None]) / np.where(step > 0, step, 1)[:, None]),
                         0)
            q = np.clip(q, 0, 15).astype(np.uint8)
            packed = np.zeros(12, dtype=np.uint8)
            for j in range(4):
                packed[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
                packed[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6)
                packed[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4)
            qs = np.zeros(128, dtype=np.uint8)
            for j in range(4):
                qs[j * 32:(j + 1) * 32] = q[2 * j] | (q[2 * j + 1] << 4)
            out[r, b] = np.concatenate([np.frombuffer(np.array([d, dmin], dtype=np.float16).tobytes(), np.uint8),
                                        packed, qs])
    return out.reshape(rows, -1)


def write_gguf(single_file, path, arch: str, qtype: str, overrides: dict | None = None):
    """city96's convert of a single file: prefix stripped, F32 for 1-D, small and high-precision
    keys, the rest ``qtype`` (F16 where its blocks do not fit the rows). ``overrides``: key ->
    values written instead of the file's (a tampered upload)."""
    state = {k: v for k, v in load_file(str(single_file)).items() if not k.startswith("text_encoders.")}
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, tensor in state.items():
        data = (overrides or {}).get(key, tensor).float().numpy()
        kind = "F32" if data.ndim == 1 or data.size <= 1024 or any(h in key for h in HIGH_PRECISION) else qtype
        if kind == "Q4_K" and data.ndim == 2 and data.shape[1] % 256 == 0:
            writer.add_tensor(key, quantize_q4_k(data), raw_dtype=Q.Q4_K)
            continue
        if kind == "Q4_K":
            kind = "F16"
        try:
            writer.add_tensor(key, gguf.quants.quantize(data, Q[kind]), raw_dtype=Q[kind])
        except gguf.QuantError:
            writer.add_tensor(key, gguf.quants.quantize(data, Q.F16), raw_dtype=Q.F16)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


FAMILIES = {
    "flux": ("FluxTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=128, axes_dims_rope=[16, 56, 56],
                                            joint_attention_dim=256, pooled_projection_dim=256, in_channels=64,
                                            num_layers=1, num_single_layers=1, guidance_embeds=True),
             write_bfl_file, "double_blocks.0.img_attn.qkv.weight"),
    "sd3": ("SD3Transformer2DModel", dict(num_attention_heads=4, attention_head_dim=64, joint_attention_dim=256,
                                          caption_projection_dim=256, pooled_projection_dim=256, in_channels=16,
                                          out_channels=16, patch_size=2, sample_size=16, num_layers=2,
                                          pos_embed_max_size=16, dual_attention_layers=(0,)),
            write_sd3_file, "joint_blocks.0.x_block.attn.qkv.weight"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def wide(request, tmp_path_factory):
    import diffusers
    family = request.param
    cls_name, config, write, fused = FAMILIES[family]
    tmp = tmp_path_factory.mktemp(family + "-gguf")
    folder = save_tiny(tmp / "model", family)
    torch.manual_seed(0)
    shipped = {k: v for k, v in denoiser_config(folder).items() if not k.startswith("_")}
    getattr(diffusers, cls_name)(**{**shipped, **config}).save_pretrained(folder / "transformer")
    base = load_denoiser_state(folder)
    write(base, denoiser_config(folder), tmp / "full.safetensors")
    names = list(base)
    frozen = next(n for n in names if n.endswith(".attn.to_k.weight") and n.startswith("transformer_blocks.0."))
    scores = torch.tensor([1.0 if n == frozen or ".ff." in n else 0.0 for n in names])
    mask = Mask.from_scores([(n, base[n]) for n in names], scores, 0.2, base_fingerprint=fingerprint(base.items()))
    trainable = next(n for n in names if n.endswith(".attn.to_q.weight") and n.startswith("transformer_blocks.0."))
    assert frozen in mask.frozen_names and trainable not in mask.frozen_names
    return family, folder, mask.save(tmp / "mask.safetensors"), tmp, fused, cls_name


def _verify(capsys, folder, mask, candidate):
    code = main(["verify", "--mask", str(mask), "--candidate", str(candidate)] + (["--model", str(folder)] if folder else []))
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return code, out.out + out.err


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_a_gguf_of_the_base_is_compliant_and_a_moved_frozen_tensor_is_not(wide, qtype, capsys):
    import diffusers
    from diffusers import GGUFQuantizationConfig
    family, folder, mask, tmp, fused, cls_name = wide
    arch = "flux" if family == "flux" else "sd3"
    good = write_gguf(tmp / "full.safetensors", tmp / f"{qtype}.gguf", arch, qtype)
    reader = gguf.GGUFReader(str(good))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types[fused] == qtype and types[fused.replace(".weight", ".bias")] == "F32"
    base = load_denoiser_state(folder)
    name = next(n for n in base if n.endswith(".attn.to_k.weight") and n.startswith("transformer_blocks.0."))
    rows = base[name].shape[0]
    bound = gguf_bound(base[name].numpy(), qtype)
    if family == "sd3":
        # a real file: diffusers' GGUF loader reads it into the model (FLUX.1's converter in diffusers
        # assumes FLUX.1's width, 3072, so a narrower FLUX cannot load; its BFL names are tested
        # against that converter at full width in test_audit)
        model = getattr(diffusers, cls_name).from_single_file(
            str(good), config=str(folder), subfolder="transformer",
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32)
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
        values = dequantize_gguf_tensor(dict(model.named_parameters())[name]).detach().float().numpy()
        assert values.shape == tuple(base[name].shape)
        assert (np.abs(values - base[name].numpy()) <= bound).all()
    code, out = _verify(capsys, folder, mask, good)
    assert code == 0, out
    report = verify_checkpoint(folder, mask, good)
    assert report.quantized[name]["type"] == qtype
    assert report.quantized[name]["rule"] == ("exact" if qtype == "Q8_0" else "bound")
    assert report.quantized[name]["max_abs_diff"] <= report.quantized[name]["bound"]
    # a frozen part moved by twice its bound (k's rows of the fused q/k/v), then a trainable one (q's rows)
    full = load_file(str(tmp / "full.safetensors"))
    for rows_moved, expected in ((slice(rows, 2 * rows), 1), (slice(0, rows), 0)):
        t = full[fused].clone()
        t[rows_moved] += 2 * float(bound.max()) + 0.05
        moved = write_gguf(tmp / "full.safetensors", tmp / f"{qtype}-moved.gguf", arch, qtype, {fused: t})
        code, out = _verify(capsys, folder, mask, moved)
        assert code == expected, out
        if expected:
            assert name in out
    # the mask's digests alone cannot audit blocks: exit 2, asking for the base
    code, out = _verify(capsys, None, mask, good)
    assert code == 2 and "--model" in out


def test_the_bound_per_type_by_hand():
    row = np.array([[-1.0, 3.0] + [0.0] * 30], dtype=np.float32)
    assert gguf_bound(row, "Q8_0")[0, 0] == pytest.approx(6.0 / 255)        # ±3 over 255 steps
    assert gguf_bound(row, "Q4_1")[0, 0] == pytest.approx(4.0 / 15)         # max - min over 15 steps
    with pytest.raises(ValueError, match="IQ2_XS is not read"):
        gguf_bound(row, "IQ2_XS")


@pytest.mark.slow
def test_a_hubs_batch_of_gguf_and_scaled_fp8_uploads_gets_a_verdict_each_with_the_bound_used(wide, tmp_path):
    from freezeasguard.audit.batch import audit_folder, exit_code
    from test_quantized import scaled_fp8
    family, folder, mask, tmp, fused, _ = wide
    arch = "flux" if family == "flux" else "sd3"
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    write_gguf(tmp / "full.safetensors", uploads / "a-q8.gguf", arch, "Q8_0")
    write_gguf(tmp / "full.safetensors", uploads / "b-q4k.gguf", arch, "Q4_K")
    full = load_file(str(tmp / "full.safetensors"))
    moved = full[fused].clone()
    moved[moved.shape[0] // 3:2 * moved.shape[0] // 3] += 1.0                 # the frozen k rows
    write_gguf(tmp / "full.safetensors", uploads / "c-q4k-moved.gguf", arch, "Q4_K", {fused: moved})
    from safetensors.torch import save_file
    save_file(scaled_fp8(full, "current"), str(uploads / "d-fp8.safetensors"))
    (uploads / "e-broken.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    rows = {r["file"]: r for r in audit_folder(uploads, mask, folder, report_path=tmp_path / "report.json")}
    assert [rows[f]["verdict"] for f in sorted(rows)] == ["compliant", "compliant", "violations", "compliant",
                                                          "unreadable"]
    assert rows["a-q8.gguf"]["format"].endswith("(gguf)") and "Q8_0:" in rows["a-q8.gguf"]["quantized"]
    assert "compared exactly" in rows["a-q8.gguf"]["quantized"]
    assert "Q4_K:" in rows["b-q4k.gguf"]["quantized"] and "within bound <=" in rows["b-q4k.gguf"]["quantized"]
    assert "attn.to_k.weight" in rows["c-q4k-moved.gguf"]["first_violation"]
    assert exit_code(list(rows.values())) == 1
    assert "quantized" in (tmp_path / "report.csv").read_text().splitlines()[0]


def test_an_sd_gguf_with_reshaped_tensors_is_read_under_its_ldm_names(tiny_sd, tmp_path, capsys):
    """city96's SD/SDXL files: LDM keys without model.diffusion_model., and tensors whose last
    dimension is not a multiple of 256 stored as (n / 256, 256) with comfy.gguf.orig_shape.<key>."""
    from freezeasguard.audit.original_layouts import LDM_UNET_PREFIX, ldm_key_map
    base, config = load_denoiser_state(tiny_sd), denoiser_config(tiny_sd)
    names = list(base)
    keys = ldm_key_map(names, config)
    mask = Mask.from_scores([(n, base[n]) for n in names], torch.tensor([float(i % 2) for i in range(len(names))]), 0.5,
                            base_fingerprint=fingerprint(base.items())).save(tmp_path / "mask.safetensors")
    reshaped = [n for n in names if base[n].numel() % 256 == 0 and base[n].shape[-1] % 256 and base[n].ndim > 1]
    assert reshaped

    def write(state, path):
        writer = gguf.GGUFWriter(path=str(path), arch="sd1")
        for n in names:
            data = state[n].float().numpy()
            if n in reshaped:
                writer.add_array(f"comfy.gguf.orig_shape.{keys[n][len(LDM_UNET_PREFIX):]}", list(data.shape))
                data = data.reshape(-1, 256)
            kind = Q.Q8_0 if data.ndim == 2 and data.shape[1] % 32 == 0 else Q.F32
            writer.add_tensor(keys[n][len(LDM_UNET_PREFIX):], gguf.quants.quantize(data, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path
    assert _verify(capsys, tiny_sd, mask, write(base, tmp_path / "sd.gguf"))[0] == 0
    frozen = next(n for n in reshaped if n in Mask.load(mask).frozen_names)
    code, out = _verify(capsys, tiny_sd, mask, write({**base, frozen: base[frozen] + 0.1}, tmp_path / "moved.gguf"))
    assert code == 1 and frozen in out, out
