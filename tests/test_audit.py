"""Auditing what people share: single-file checkpoints (LDM layout, fp32/fp16, with and without
the VAE and text encoders), the base-free audit against the mask's digests, and a hub's batch."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from freezeasguard import Mask, verify_checkpoint
from freezeasguard.audit.digests import tensor_digests
from freezeasguard.audit.layouts import Checkpoint
from freezeasguard.audit.original_layouts import ldm_key_map, ldm_unet_names
from freezeasguard.models.pipelines import fingerprint, load_denoiser_state
from freezeasguard.audit.tensorfile import TensorFile, TensorFileError
from freezeasguard.audit.verify import denoiser_config, record_digests

def write_single_file(state: dict, config: dict, path, dtype=None, other_parts: bool = True):
    """A single-file checkpoint as A1111/ComfyUI save it: the UNet under model.diffusion_model.,
    optionally beside (random) VAE and text-encoder tensors, in ``dtype``."""
    keys = ldm_key_map(list(state), config)
    out = {keys[n]: t for n, t in state.items()}
    if other_parts:
        out["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
        out["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(32)
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def audit_setup(tiny_sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    base = load_denoiser_state(tiny_sd)
    named = [(n, t) for n, t in base.items()]
    mask = Mask.random(named, 0.3, seed=2, base_fingerprint=fingerprint(base.items()))
    plain = mask.save(tmp / "mask.safetensors")
    recorded = record_digests(Mask.load(plain), tiny_sd).save(tmp / "mask-recorded.safetensors")
    return tmp, base, mask, plain, recorded, denoiser_config(tiny_sd)


def test_the_single_file_names_round_trip_through_diffusers_converter(tiny_sd, audit_setup):
    _, base, _, _, _, config = audit_setup
    keys = ldm_key_map(list(base), config)          # raises unless diffusers' converter maps each key back
    assert len(set(keys.values())) == len(base) > 600
    assert keys["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == \
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"     # SD 1.5's own name
    assert keys["up_blocks.0.upsamplers.0.conv.weight"] == "model.diffusion_model.output_blocks.2.1.conv.weight"
    assert ldm_unet_names(list(keys.values()), config) == keys


@pytest.mark.parametrize("positioned", [True, False])
def test_tensorfile_reads_what_safetensors_wrote_and_refuses_a_truncated_file(tmp_path, monkeypatch, positioned):
    """Also where the system has no positioned read (Windows: os.preadv is missing)."""
    if not positioned:
        monkeypatch.delattr(os, "preadv")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half(),
               "d": torch.randn(2, 2).bfloat16(), "e": torch.empty(0)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    f = TensorFile(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.read(k), v) and f.read(k).dtype == v.dtype
    assert f.bytes_read == 2 * sum(v.numel() * v.element_size() for v in tensors.values())
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-7])
    with pytest.raises(TensorFileError, match="truncated"):
        TensorFile(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(TensorFileError):
        TensorFile(tmp_path / "junk.safetensors")


def test_streamed_fingerprint_equals_the_in_memory_one(tiny_sd):
    assert Checkpoint(tiny_sd).fingerprint() == fingerprint(load_denoiser_state(tiny_sd).items())


def test_digests_are_blake3_of_dtype_shape_and_bytes_and_old_blake2b_records_still_audit(audit_setup, tmp_path):
    import copy
    import hashlib

    import blake3

    from freezeasguard.audit.digests import digest
    # independent computations of both hashes over "dtype|shape|" and the raw bytes
    raw = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    assert digest(raw, torch.float32, (2, 3)) == blake3.blake3(b"float32|[2, 3]|" + raw).hexdigest(length=16)
    assert digest(raw, torch.float32, (2, 3), "blake2b") == hashlib.blake2b(b"float32|[2, 3]|" + raw,
                                                                           digest_size=16).hexdigest()
    # a mask recorded before BLAKE3 (format /1, blake2b digests, no "hash" key) audits as before
    tmp, base, mask, _, recorded, _ = audit_setup
    new = Mask.load(recorded)
    record = new.meta["audit"]
    assert record["hash"] == "blake3" and record["format"] == "freezeasguard-audit/2"
    old = copy.deepcopy(record)
    del old["hash"]
    old["format"] = "freezeasguard-audit/1"
    old["digests"] = {n: {k: digest(base[n].to(getattr(torch, k)).contiguous().numpy().tobytes()
                                    if k != "bfloat16" else base[n].to(torch.bfloat16).view(torch.int16).numpy().tobytes(),
                                    getattr(torch, k), base[n].shape, "blake2b")
                          for k in d if k in ("float32", "float16", "bfloat16")}       # what /1 records held
                      for n, d in record["digests"].items()}
    old_mask = Mask(new.names, new.shapes, new.logits, new.frozen, new.base_fingerprint, {**new.meta, "audit": old})
    old_path = old_mask.save(tmp_path / "old.safetensors")
    candidate = tmp_path / "ft.safetensors"
    save_file({n: t.contiguous() for n, t in base.items()}, str(candidate))
    assert verify_checkpoint(None, old_path, candidate).compliant
    moved = dict(base)
    moved[new.frozen_names[0]] = moved[new.frozen_names[0]] + 1e-3
    save_file({n: t.contiguous() for n, t in moved.items()}, str(candidate))
    assert not verify_checkpoint(None, old_path, candidate).compliant


def test_digests_cover_the_base_dtype_and_its_roundings():
    import blake3
    import gguf

    t = torch.randn(5, 3)
    d = tensor_digests(t)
    assert set(d) == {"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}   # no Q8_0: rows of 3
    wide = torch.randn(4, 64)
    blocks = gguf.quants.quantize(wide.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert tensor_digests(wide)["Q8_0"] == blake3.blake3(b"Q8_0|[4, 64]|" + blocks.tobytes()).hexdigest(length=16)
    assert d["float16"] == tensor_digests(t.half())["float16"]
    bumped = t.half().clone().view(-1)
    bumped.view(torch.int16)[0] += 1                                     # one fp16 ulp
    assert tensor_digests(bumped.view(5, 3))["float16"] != d["float16"]
    assert tensor_digests(t.reshape(3, 5))["float32"] != d["float32"]        # the shape is part of it


def _cases(tmp, base, mask, config):
    """(file, mode, expected compliant) for single-file checkpoints of the untouched base and of
    changed ones, in fp32 and fp16, with and without the other parts."""
    victim = mask.frozen_names[11]
    cases = []
    cases.append((write_single_file(base, config, tmp / "base32.safetensors"), "exact", True))
    cases.append((write_single_file(base, config, tmp / "base32-unet.safetensors", other_parts=False), "exact", True))
    cases.append((write_single_file(base, config, tmp / "base16.safetensors", torch.float16), "tolerance", True))
    cases.append((tmp / "base16.safetensors", "exact", True))      # exact: the base rounded to fp16, bit for bit
    cases.append((write_single_file(base, config, tmp / "basebf16.safetensors", torch.bfloat16), "tolerance", True))
    one_ulp = dict(base)
    t = one_ulp[victim].clone().view(-1)
    t[0] = torch.nextafter(t[0], torch.tensor(float("inf")))
    one_ulp[victim] = t.view_as(base[victim])
    cases.append((write_single_file(one_ulp, config, tmp / "ulp32.safetensors"), "exact", False))
    half = {k: v.half() for k, v in base.items()}
    h = half[victim].clone().view(-1)
    h.view(torch.int16)[0] += 1                                          # one fp16 ulp
    half[victim] = h.view_as(base[victim])
    cases.append((write_single_file(half, config, tmp / "ulp16.safetensors"), "tolerance", False))
    trainable = next(n for n in mask.names if n not in set(mask.frozen_names))
    changed = {**base, trainable: base[trainable] + 1.0}
    cases.append((write_single_file(changed, config, tmp / "trainable.safetensors", torch.float16), "tolerance", True))
    return cases, victim


@pytest.mark.slow
def test_single_files_are_read_and_base_free_verdicts_equal_base_backed_ones(tiny_sd, audit_setup):
    tmp, base, mask, plain, recorded, config = audit_setup
    cases, victim = _cases(tmp, base, mask, config)
    for path, mode, expected in cases:
        backed = verify_checkpoint(tiny_sd, plain, path, mode)
        free = verify_checkpoint(None, recorded, path, mode)
        assert backed.compliant == free.compliant == expected, (path.name, mode)
        assert backed.layout == free.layout == "ldm-unet"
        assert [v.name for v in backed.violations] == [v.name for v in free.violations]
        if path.name.startswith("ulp"):
            assert [v.name for v in free.violations] == [victim]
    # base-free reads only the candidate: its bytes, not the base's
    report = verify_checkpoint(None, recorded, tmp / "base16.safetensors", "tolerance")
    assert report.trainable_changed is None
    assert report.bytes_read <= (tmp / "base16.safetensors").stat().st_size


@pytest.mark.slow
def test_the_old_false_accusation_is_gone_and_an_unknown_layout_is_exit_2(tiny_sd, audit_setup, run_cli):
    tmp, base, mask, plain, recorded, config = audit_setup
    write_single_file(base, config, tmp / "base16-cli.safetensors", torch.float16)
    # the untouched base as an fp16 A1111-layout file: compliant, exit 0, in the default (exact) mode
    out = run_cli(["verify", "--model", str(tiny_sd), "--mask", str(plain), "--candidate",
                   str(tmp / "base16-cli.safetensors")])
    save_file({"some.other.model.weight": torch.randn(3, 3)}, str(tmp / "unknown.safetensors"))
    err = run_cli(["verify", "--mask", str(recorded), "--candidate", str(tmp / "unknown.safetensors")], code=2)
    assert "cannot tell this checkpoint's layout" in err and "some.other.model.weight" in err
    err = run_cli(["verify", "--mask", str(plain), "--candidate", str(tmp / "base16-cli.safetensors")], code=2)
    assert "records no digests" in err
    assert "verify: compliant" in out                  # the log; run_cli asserted exit 0


@pytest.mark.slow
def test_a_hubs_batch_gets_a_verdict_per_upload_and_the_documented_exit_code(tiny_sd, audit_setup, tmp_path,
                                                                            run_cli):
    tmp, base, mask, plain, recorded, config = audit_setup
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    cases, victim = _cases(tmp, base, mask, config)
    expected = {}
    for i, (path, mode, ok) in enumerate(c for c in cases if c[1] == "tolerance" or c[2] is False):
        if (path.name, mode) == ("base16.safetensors", "exact"):
            continue        # the same file as the tolerance case
        target = uploads / f"{i:02d}-{path.name}"
        target.write_bytes(path.read_bytes())
        expected[target.name] = "compliant" if ok else "violations"
    good = (tmp / "base32.safetensors").read_bytes()
    (uploads / "20-truncated.safetensors").write_bytes(good[: len(good) // 2])
    expected["20-truncated.safetensors"] = "unreadable"
    (uploads / "21-corrupt.safetensors").write_bytes(b"not a safetensors file at all")
    expected["21-corrupt.safetensors"] = "unreadable"
    save_file({"some.other.model.weight": torch.randn(3, 3)}, str(uploads / "22-unknown.safetensors"))
    expected["22-unknown.safetensors"] = "unreadable"
    linear = next(n for n in mask.frozen_names if n.endswith(".weight") and base[n].dim() == 2)
    out_f, in_f = base[linear].shape
    kohya = "lora_unet_" + linear[:-len(".weight")].replace(".", "_")
    save_file({f"{kohya}.lora_down.weight": torch.randn(2, in_f), f"{kohya}.lora_up.weight": torch.randn(out_f, 2)},
              str(uploads / "23-lora-frozen.safetensors"))
    # more of what a hub receives
    import shutil
    write_single_file(base, config, uploads / "30-base32.safetensors")
    write_single_file(base, config, uploads / "31-base32-unet-only.safetensors", other_parts=False)
    shutil.copytree(tiny_sd, uploads / "32-diffusers-pipeline")
    bad_state = {**base, victim: base[victim] + 1e-3}
    save_file(bad_state, str(uploads / "33-diffusers-state-changed.safetensors"))
    free = next(n for n in mask.names if n.endswith(".weight") and base[n].dim() == 2 and n not in set(mask.frozen_names)
                and n.replace(".weight", ".bias") not in set(mask.frozen_names))
    save_file({f"unet.{free[:-len('.weight')]}.lora_A.weight": torch.randn(2, base[free].shape[1]),
               f"unet.{free[:-len('.weight')]}.lora_B.weight": torch.randn(base[free].shape[0], 2)},
              str(uploads / "34-lora-allowed.safetensors"))
    nan = dict(base)
    nan[victim] = base[victim].clone()
    nan[victim].view(-1)[0] = float("nan")
    write_single_file(nan, config, uploads / "35-nan.safetensors")
    (uploads / "36-empty-folder").mkdir()
    (uploads / "37-a-mask.safetensors").write_bytes(plain.read_bytes())
    small = {n: t[..., :1].contiguous() for n, t in base.items()}       # every width 1: another model
    write_single_file(small, config, uploads / "38-another-model.safetensors")
    half_state = {k: v.half() for k, v in base.items()}
    save_file(half_state, str(uploads / "39-diffusers-state-fp16.safetensors"))
    ldm_module = ldm_key_map(list(base), config)[linear][len("model.diffusion_model."):-len(".weight")]
    save_file({f"diffusion_model.{ldm_module}.lora_down.weight": torch.randn(2, in_f),
               f"diffusion_model.{ldm_module}.lora_up.weight": torch.randn(out_f, 2)},
              str(uploads / "40-comfy-lora-frozen.safetensors"))
    expected.update({"40-comfy-lora-frozen.safetensors": "violations", "30-base32.safetensors": "compliant", "31-base32-unet-only.safetensors": "compliant",
                     "32-diffusers-pipeline": "compliant", "33-diffusers-state-changed.safetensors": "violations",
                     "34-lora-allowed.safetensors": "compliant", "35-nan.safetensors": "unreadable",
                     "36-empty-folder": "unreadable", "37-a-mask.safetensors": "unreadable",
                     "38-another-model.safetensors": "unreadable", "39-diffusers-state-fp16.safetensors": "compliant",
                     "23-lora-frozen.safetensors": "violations"})
    assert len(expected) >= 20
    report = tmp_path / "report.json"
    run_cli(["verify", "--mask", str(recorded), "--candidates", str(uploads), "--tolerance", "--report", str(report)],
            code=1)
    rows = {r["file"]: r for r in json.loads(report.read_text())["uploads"]}
    for name, verdict in expected.items():
        assert rows[name]["verdict"] == verdict, (name, rows[name])
    assert rows["23-lora-frozen.safetensors"]["format"] == "adapter"
    assert rows["23-lora-frozen.safetensors"]["verdict"] == "violations"
    assert rows["23-lora-frozen.safetensors"]["first_violation"] == linear
    assert report.with_suffix(".csv").read_text().count("\n") == len(rows) + 1
    # without the violating uploads the batch exits 2 (unreadable ones remain), then 0 when all are clean
    # the same batch against the base model: the same verdicts
    run_cli(["verify", "--model", str(tiny_sd), "--mask", str(plain), "--candidates", str(uploads), "--tolerance",
             "--report", str(tmp_path / "backed.json")], code=1)
    backed = {r["file"]: r["verdict"] for r in json.loads((tmp_path / "backed.json").read_text())["uploads"]}
    assert backed == {name: r["verdict"] for name, r in rows.items()}
    for name, verdict in expected.items():
        if verdict == "violations":
            (uploads / name).unlink()
    run_cli(["verify", "--mask", str(recorded), "--candidates", str(uploads), "--tolerance"], code=2)
    for name, verdict in expected.items():
        if verdict == "unreadable":
            target = uploads / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    run_cli(["verify", "--mask", str(recorded), "--candidates", str(uploads), "--tolerance"], code=0)


def test_an_sdxl_single_file_is_read_and_a_changed_frozen_tensor_flagged(tmp_path):
    from freezeasguard.models.families.tiny import save_tiny
    model = save_tiny(tmp_path / "sdxl", "sdxl")
    base = load_denoiser_state(model)
    config = denoiser_config(model)
    assert ldm_unet_names(list(ldm_key_map(list(base), config).values()), config) == ldm_key_map(list(base), config)
    mask = Mask.random(list(base.items()), 0.5, seed=0, base_fingerprint=fingerprint(base.items()))
    plain = mask.save(tmp_path / "mask.safetensors")
    recorded = record_digests(mask, model).save(tmp_path / "rec.safetensors")
    write_single_file(base, config, tmp_path / "xl16.safetensors", torch.float16)
    victim = mask.frozen_names[0]
    bad = {**base, victim: base[victim] * 1.01}
    write_single_file(bad, config, tmp_path / "xl16-bad.safetensors", torch.float16)
    for ref_model, ref_mask in ((model, plain), (None, recorded)):
        assert verify_checkpoint(ref_model, ref_mask, tmp_path / "xl16.safetensors", "tolerance").compliant
        report = verify_checkpoint(ref_model, ref_mask, tmp_path / "xl16-bad.safetensors", "tolerance")
        assert [v.name for v in report.violations] == [victim]


def test_the_flux_table_equals_diffusers_converter_at_flux_width():
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers on row-coded placeholders
    ((rows, 1) tensors whose values say key and row) at FLUX.1's width: each parameter's rows
    decode to the same segments as bfl_flux_segments."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from freezeasguard.audit.original_layouts import bfl_flux_segments
    inner, mlp = 3072, 12288

    def rows(key):
        return (3 * inner if ".qkv." in key else 3 * inner + mlp if "linear1" in key
                else 2 * inner if "adaLN_modulation" in key else 5)
    keys = []
    for p in ("weight", "bias"):
        keys += [f"{k}.{p}" for k in ("time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                                      "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "txt_in",
                                      "img_in", "final_layer.linear", "final_layer.adaLN_modulation.1")]
        for i in range(2):
            keys += [f"double_blocks.{i}.{k}.{p}" for k in ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv",
                                                             "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2",
                                                             "img_attn.proj", "txt_attn.proj")]
        keys += [f"single_blocks.0.{k}.{p}" for k in ("modulation.lin", "linear1", "linear2")]
    for i in range(2):
        keys += [f"double_blocks.{i}.{k}.scale" for k in ("img_attn.norm.query_norm", "img_attn.norm.key_norm",
                                                          "txt_attn.norm.query_norm", "txt_attn.norm.key_norm")]
    keys += ["single_blocks.0.norm.query_norm.scale", "single_blocks.0.norm.key_norm.scale"]
    coded = {k: (i * 100_000 + torch.arange(rows(k), dtype=torch.float64)).reshape(-1, 1) for i, k in enumerate(keys)}
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(coded))
    ours = bfl_flux_segments(keys, {"num_attention_heads": 24, "attention_head_dim": 128})

    def decode(t):
        segments = []
        for code in t.view(-1).long().tolist():
            key, row = keys[code // 100_000], code % 100_000
            if segments and segments[-1][0] == key and segments[-1][2] == row:
                segments[-1][2] = row + 1
            else:
                segments.append([key, row, row + 1])
        return [tuple(s) for s in segments]
    assert set(converted) == set(ours) and len(ours) == 98
    for name, t in converted.items():
        assert decode(t) == [(k, a, b if b is not None else rows(k)) for k, a, b in ours[name]], name


def write_bfl_file(state: dict, config: dict, path, dtype=None, prefix: str = ""):
    """A FLUX.1 single file in BFL's layout from a diffusers transformer state: each BFL key
    assembled from the parameters whose row ranges bfl_flux_segments puts in it."""
    from freezeasguard.audit.original_layouts import bfl_flux_segments
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    table = bfl_flux_segments(_bfl_keys(state, inner), config)
    names_of = {}
    for name, segs in table.items():
        for key, _, _ in segs:
            names_of.setdefault(key, set()).add(name)
    total = {k: sum(state[n].shape[0] for n in names) for k, names in names_of.items()}
    out = {k: torch.empty((total[k], *state[next(iter(names))].shape[1:])) for k, names in names_of.items()}
    for name, segs in table.items():
        offset = 0
        for key, start, end in segs:
            length = (end if end is not None else total[key]) - start
            out[key][start:start + length] = state[name][offset:offset + length]
            offset += length
    out = {prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in out.items()}
    out["text_encoders.t5xxl.transformer.shared.weight"] = torch.randn(4, 4)      # another part, not audited
    save_file(out, str(path))
    return path


@pytest.mark.parametrize("chunk_bytes", [None, 20])
def test_a_flux_single_file_with_fused_qkv_is_read_and_one_ulp_in_a_slice_flagged(tmp_path, monkeypatch, chunk_bytes):
    """Also with 20-byte chunks (5 fp32 values), which cut across rows, fused slices and the
    swapped (shift, scale) halves: the chunks put together are the tensor, the verdicts are the same."""
    from freezeasguard.audit import verify as verify_module
    from freezeasguard.audit.layouts import Checkpoint
    from freezeasguard.models.families.tiny import save_tiny
    if chunk_bytes:
        monkeypatch.setattr(verify_module, "CHUNK_BYTES", chunk_bytes)
    model = save_tiny(tmp_path / "flux", "flux")
    base = load_denoiser_state(model)
    config = denoiser_config(model)
    names = list(base)
    scores = torch.tensor([1.0 if ".attn.to_k." in n or "add_v_proj" in n else 0.0 for n in names])
    mask = Mask.from_scores([(n, base[n]) for n in names], scores, 0.1, base_fingerprint=fingerprint(base.items()))
    victim = next(n for n in mask.frozen_names if ".attn.to_k.weight" in n)
    plain = mask.save(tmp_path / "mask.safetensors")
    recorded = record_digests(mask, model).save(tmp_path / "rec.safetensors")
    write_bfl_file(base, config, tmp_path / "flux.safetensors")
    write_bfl_file(base, config, tmp_path / "flux-comfy16.safetensors", torch.float16, prefix="model.diffusion_model.")
    ulp = dict(base)
    t = base[victim].clone().view(-1)
    t[3] = torch.nextafter(t[3], torch.tensor(float("inf")))
    ulp[victim] = t.view_as(base[victim])
    write_bfl_file(ulp, config, tmp_path / "flux-ulp.safetensors")
    single = Checkpoint(tmp_path / "flux.safetensors", config)
    buf = bytearray(12)
    for name in base:
        flat = torch.cat([c.clone() for c in single.chunks(name, 3, buf)])
        assert torch.equal(flat, base[name].reshape(-1)), name
    for ref_model, ref_mask in ((model, plain), (None, recorded)):
        ok = verify_checkpoint(ref_model, ref_mask, tmp_path / "flux.safetensors")
        assert ok.compliant and ok.layout == "bfl-flux" and ok.frozen_checked == len(mask.frozen_names)
        assert verify_checkpoint(ref_model, ref_mask, tmp_path / "flux-comfy16.safetensors", "tolerance").compliant
        report = verify_checkpoint(ref_model, ref_mask, tmp_path / "flux-ulp.safetensors")
        assert [v.name for v in report.violations] == [victim]
        if ref_model is not None:
            assert report.violations[0].max_abs_diff == float(ulp[victim].view(-1)[3]) - float(base[victim].view(-1)[3])
            assert report.trainable_changed == 0 and report.trainable_total == len(base) - len(mask.frozen_names)


def _bfl_keys(state, inner):
    """The BFL key names (without data) a FLUX transformer state of this shape has."""
    keys = set()
    for p in ("weight", "bias"):
        keys |= {f"{k}.{p}" for k in ("time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                                      "vector_in.out_layer", "txt_in", "img_in", "final_layer.linear",
                                      "final_layer.adaLN_modulation.1")}
        if any(n.startswith("time_text_embed.guidance_embedder") for n in state):
            keys |= {f"guidance_in.in_layer.{p}", f"guidance_in.out_layer.{p}"}
    doubles = {int(n.split(".")[1]) for n in state if n.startswith("transformer_blocks.")}
    singles = {int(n.split(".")[1]) for n in state if n.startswith("single_transformer_blocks.")}
    for i in doubles:
        for p in ("weight", "bias"):
            keys |= {f"double_blocks.{i}.{k}.{p}" for k in ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv",
                                                            "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2",
                                                            "img_attn.proj", "txt_attn.proj")}
        keys |= {f"double_blocks.{i}.{k}.scale" for k in ("img_attn.norm.query_norm", "img_attn.norm.key_norm",
                                                          "txt_attn.norm.query_norm", "txt_attn.norm.key_norm")}
    for i in singles:
        for p in ("weight", "bias"):
            keys |= {f"single_blocks.{i}.{k}.{p}" for k in ("modulation.lin", "linear1", "linear2")}
        keys |= {f"single_blocks.{i}.norm.{k}.scale" for k in ("query_norm", "key_norm")}
    return keys


def test_loras_in_original_layout_names_map_to_the_parameters_they_change(tiny_sd, audit_setup, tmp_path):
    """ComfyUI's diffusion_model.<LDM module> and A1111/kohya's lora_unet_<LDM module> keys, with the
    base and base-free: a LoRA on a frozen module is a violation, one on a trainable module passes."""
    from freezeasguard.audit.adapters import verify_adapter
    _, base, mask, plain, recorded, config = audit_setup
    keys = ldm_key_map(list(base), config)
    frozen = set(mask.frozen_names)
    linears = [n for n in base if n.endswith(".weight") and base[n].dim() == 2 and ".attn" in n]
    hit = next(n for n in linears if n in frozen)
    free = next(n for n in linears if n not in frozen and n.replace(".weight", ".bias") not in frozen)

    def lora(name, style):
        module = keys[name][len("model.diffusion_model."):-len(".weight")]
        out_f, in_f = base[name].shape
        prefix = f"diffusion_model.{module}" if style == "comfy" else "lora_unet_" + module.replace(".", "_")
        return {f"{prefix}.lora_down.weight": torch.randn(2, in_f), f"{prefix}.lora_up.weight": torch.randn(out_f, 2),
                f"{prefix}.alpha": torch.tensor(2.0)}

    for style in ("comfy", "a1111"):
        save_file(lora(hit, style), str(tmp_path / f"hit-{style}.safetensors"))
        save_file(lora(free, style), str(tmp_path / f"free-{style}.safetensors"))
        for ref_model, ref_mask in ((tiny_sd, plain), (None, recorded)):
            report = verify_adapter(ref_model, ref_mask, tmp_path / f"hit-{style}.safetensors")
            assert report.frozen_changed == [hit] and not report.unknown
            ok = verify_adapter(ref_model, ref_mask, tmp_path / f"free-{style}.safetensors")
            assert ok.compliant and list(ok.changed) == [free]


def test_a_lora_on_flux_fused_qkv_changes_all_three_projections(tmp_path):
    from freezeasguard.models.families.tiny import save_tiny
    from freezeasguard.audit.adapters import verify_adapter
    model = save_tiny(tmp_path / "flux", "flux")
    base = load_denoiser_state(model)
    names = list(base)
    scores = torch.tensor([1.0 if n == "transformer_blocks.0.attn.to_v.weight" else 0.0 for n in names])
    mask = Mask.from_scores([(n, base[n]) for n in names], scores, 0.01, base_fingerprint=fingerprint(base.items()))
    assert "transformer_blocks.0.attn.to_v.weight" in mask.frozen_names
    plain = mask.save(tmp_path / "mask.safetensors")
    recorded = record_digests(mask, model).save(tmp_path / "rec.safetensors")
    inner = base["transformer_blocks.0.attn.to_q.weight"].shape[0]
    width = base["transformer_blocks.0.attn.to_q.weight"].shape[1]
    for prefix in ("diffusion_model.double_blocks.0.img_attn.qkv", "lora_unet_double_blocks_0_img_attn_qkv"):
        save_file({f"{prefix}.lora_down.weight": torch.randn(2, width),
                   f"{prefix}.lora_up.weight": torch.randn(3 * inner, 2)}, str(tmp_path / "qkv.safetensors"))
        for ref_model, ref_mask in ((model, plain), (None, recorded)):
            report = verify_adapter(ref_model, ref_mask, tmp_path / "qkv.safetensors")
            assert sorted(report.changed) == [f"transformer_blocks.0.attn.to_{x}.weight" for x in "kqv"]
            assert report.frozen_changed == ["transformer_blocks.0.attn.to_v.weight"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_fast_finite_check_agrees_with_torch(dtype):
    from freezeasguard.audit.tensorfile import all_finite
    x = torch.randn(1000).to(dtype)
    x[3] = torch.finfo(dtype).max
    x[4] = -torch.finfo(dtype).max
    x[5] = torch.finfo(dtype).tiny / 2          # a subnormal
    assert all_finite(x) == bool(torch.isfinite(x).all()) is True
    for bad in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y[17] = bad
        assert all_finite(y) == bool(torch.isfinite(y).all()) is False


def test_a_learned_mask_carries_its_digests_and_audits_without_the_base(tiny_sd, people, logos, warm_start, tmp_path):
    from freezeasguard import LearnConfig, learn_mask
    out = tmp_path / "m.safetensors"
    learn_mask(tiny_sd, people, [logos], out, LearnConfig(ratio=0.3, mask_steps=1, inner_steps=1, mask_batch=2,
                                                           device="cpu", checkpoint_every=0), finetuned_dir=warm_start)
    mask = Mask.load(out)
    assert set(mask.meta["audit"]["digests"]) == set(mask.frozen_names)
    assert verify_checkpoint(None, out, tiny_sd).compliant                 # the base itself
    report = verify_checkpoint(None, out, warm_start)                      # full fine-tuning moved frozen tensors
    assert not report.compliant and {v.name for v in report.violations} <= set(mask.frozen_names)


@pytest.mark.slow
def test_the_hub_recipe_files_each_upload_by_its_verdict_and_keeps_every_file(tiny_sd, audit_setup, tmp_path):
    """examples/hub-audit.sh (docs/audit.md) as cron runs it: uploads in incoming/ are audited with the
    mask alone and moved, none lost, into a folder per verdict; a second pass with nothing new does nothing."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    _, base, mask, _, recorded, _ = audit_setup
    root = tmp_path / "hub"
    (root / "incoming").mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in base.items()}, str(root / "incoming" / "same.safetensors"))
    moved = dict(base)
    frozen = mask.frozen_names[0]
    moved[frozen] = moved[frozen] + 1e-3
    save_file({n: t.contiguous() for n, t in moved.items()}, str(root / "incoming" / "moved.safetensors"))
    (root / "incoming" / "junk.safetensors").write_bytes(b"not a safetensors file")
    script = Path(__file__).resolve().parents[1] / "examples" / "hub-audit.sh"
    command = shutil.which("freezeasguard", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        r = subprocess.run(["bash", str(script), str(root), str(recorded), command], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    filed = {p.name: p.parent.name for p in root.glob("*/*.safetensors")}
    assert filed == {"same.safetensors": "compliant", "moved.safetensors": "violations",
                     "junk.safetensors": "unreadable"}
    (report,) = list((root / "reports").glob("*.json"))
    rows = {row["file"]: row for row in json.loads(report.read_text())["uploads"]}
    assert rows["moved.safetensors"]["first_violation"].startswith(frozen)


def _sd3_keys(blocks: int, dual: tuple[int, ...], prefix: str = "") -> list[str]:
    """The Stability AI layout keys (without data) of an SD3/SD3.5 transformer with qk-norm."""
    keys = [prefix + "pos_embed"]
    for p in ("weight", "bias"):
        keys += [f"{prefix}{k}.{p}" for k in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "context_embedder",
                                              "y_embedder.mlp.0", "y_embedder.mlp.2", "final_layer.linear",
                                              "final_layer.adaLN_modulation.1")]
        for i in range(blocks):
            last = i == blocks - 1
            keys += [f"{prefix}joint_blocks.{i}.{k}.{p}" for k in (
                "x_block.attn.qkv", "x_block.attn.proj", "x_block.adaLN_modulation.1", "x_block.mlp.fc1",
                "x_block.mlp.fc2", "context_block.attn.qkv", "context_block.adaLN_modulation.1")
                + (() if last else ("context_block.attn.proj", "context_block.mlp.fc1", "context_block.mlp.fc2"))
                + (("x_block.attn2.qkv", "x_block.attn2.proj") if i in dual else ())]
    for i in range(blocks):
        keys += [f"{prefix}joint_blocks.{i}.{k}.weight" for k in (
            "x_block.attn.ln_q", "x_block.attn.ln_k", "context_block.attn.ln_q", "context_block.attn.ln_k")
            + (("x_block.attn2.ln_q", "x_block.attn2.ln_k") if i in dual else ())]
    return keys


def test_the_sd3_table_equals_diffusers_converter_at_sd35_medium_width():
    """diffusers' convert_sd3_transformer_checkpoint_to_diffusers on row-coded placeholders at SD3.5
    Medium's width (24 heads of 64, attn2 in the first blocks): each parameter's rows decode to the
    segments sai_sd3_segments gives, the last block's and the final (shift, scale) swaps included."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from freezeasguard.audit.original_layouts import sai_sd3_segments
    inner = 24 * 64
    keys = _sd3_keys(3, dual=(0, 1))

    def rows(key):
        return 3 * inner if ".qkv." in key else 2 * inner if "adaLN_modulation" in key else 5
    coded = {k: (i * 100_000 + torch.arange(rows(k), dtype=torch.float64)).reshape(-1, 1) for i, k in enumerate(keys)}
    coded["context_embedder.weight"] = coded["context_embedder.weight"].expand(5, 4)   # its rows: the caption width
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(coded))
    ours = sai_sd3_segments(keys, {"num_attention_heads": 24, "attention_head_dim": 64, "caption_projection_dim": inner})

    def decode(t):
        segments = []
        for code in t[:, :1].reshape(-1).long().tolist():
            key, row = keys[code // 100_000], code % 100_000
            if segments and segments[-1][0] == key and segments[-1][2] == row:
                segments[-1][2] = row + 1
            else:
                segments.append([key, row, row + 1])
        return [tuple(s) for s in segments]
    assert set(converted) == set(ours)
    assert {"transformer_blocks.1.attn2.to_v.bias", "transformer_blocks.2.norm1_context.linear.weight"} <= set(ours)
    for name, t in converted.items():
        t = t.reshape(t.shape[0], -1)
        assert decode(t) == [(k, a, b if b is not None else rows(k)) for k, a, b in ours[name]], name


def write_sd3_file(state: dict, config: dict, path, dtype=None, prefix: str = ""):
    """An SD3 single file in Stability AI's layout from a diffusers transformer state."""
    from freezeasguard.audit.original_layouts import sai_sd3_segments
    blocks = 1 + max(int(n.split(".")[1]) for n in state if n.startswith("transformer_blocks."))
    dual = tuple({int(n.split(".")[1]) for n in state if ".attn2." in n})
    table = sai_sd3_segments(_sd3_keys(blocks, dual), config)
    assert set(table) == set(state)           # every parameter has its place in the file
    names_of = {}
    for name, segs in table.items():
        for key, _, _ in segs:
            names_of.setdefault(key, set()).add(name)
    total = {k: sum(state[n].shape[0] for n in names) if len(names) > 1 else
             state[next(iter(names))].shape[0] for k, names in names_of.items()}
    out = {k: torch.empty((total[k], *state[next(iter(names))].shape[1:])) for k, names in names_of.items()}
    for name, segs in table.items():
        offset = 0
        for key, start, end in segs:
            length = (end if end is not None else total[key]) - start
            out[key][start:start + length] = state[name][offset:offset + length]
            offset += length
    out = {prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in out.items()}
    out["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(4)   # not audited
    save_file(out, str(path))
    return path


def test_an_sd35_single_file_is_read_and_one_ulp_in_a_fused_qkv_slice_flagged(tmp_path):
    """An SD3.5 Medium-shaped tiny transformer (attn2 in block 0) written in Stability AI's layout:
    diffusers' own converter gives the state back; the audit passes it (fp32, and fp16 with the
    ComfyUI prefix under tolerance), flags one ulp in a frozen slice of a fused q/k/v tensor and
    passes one ulp in a trainable slice of the same tensor."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    from freezeasguard.models.families.tiny import save_tiny
    model = save_tiny(tmp_path / "sd3", "sd3")
    config = {k: v for k, v in denoiser_config(model).items() if not k.startswith("_")}
    SD3Transformer2DModel(**{**config, "dual_attention_layers": (0,)}).save_pretrained(model / "transformer")
    base = load_denoiser_state(model)
    config = denoiser_config(model)
    assert any(".attn2." in n for n in base)
    write_sd3_file(base, config, tmp_path / "sd35.safetensors")
    back = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in load_file(str(tmp_path / "sd35.safetensors")).items() if not k.startswith("text_encoders.")})
    assert set(back) == set(base) and all(torch.equal(back[n], base[n]) for n in base)
    names = list(base)
    scores = torch.tensor([1.0 if n.startswith("transformer_blocks.0.attn.to_k.") or "add_v_proj" in n else 0.0
                           for n in names])
    mask = Mask.from_scores([(n, base[n]) for n in names], scores, 0.05, base_fingerprint=fingerprint(base.items()))
    frozen_slice = "transformer_blocks.0.attn.to_k.weight"
    trainable_slice = "transformer_blocks.0.attn.to_q.weight"       # the same fused x_block.attn.qkv tensor
    assert frozen_slice in mask.frozen_names and trainable_slice not in mask.frozen_names
    plain = mask.save(tmp_path / "mask.safetensors")
    recorded = record_digests(mask, model).save(tmp_path / "rec.safetensors")
    write_sd3_file(base, config, tmp_path / "sd35-comfy16.safetensors", torch.float16, prefix="model.diffusion_model.")

    def one_ulp(name, path):
        t = base[name].clone().view(-1)
        t[3] = torch.nextafter(t[3], torch.tensor(float("inf")))
        return write_sd3_file({**base, name: t.view_as(base[name])}, config, tmp_path / path)
    for ref_model, ref_mask in ((model, plain), (None, recorded)):
        ok = verify_checkpoint(ref_model, ref_mask, tmp_path / "sd35.safetensors")
        assert ok.compliant and ok.layout == "sai-sd3" and ok.frozen_checked == len(mask.frozen_names)
        assert verify_checkpoint(ref_model, ref_mask, tmp_path / "sd35-comfy16.safetensors", "tolerance").compliant
        report = verify_checkpoint(ref_model, ref_mask, one_ulp(frozen_slice, "frozen-ulp.safetensors"))
        assert [v.name for v in report.violations] == [frozen_slice]
        assert verify_checkpoint(ref_model, ref_mask, one_ulp(trainable_slice, "free-ulp.safetensors")).compliant
