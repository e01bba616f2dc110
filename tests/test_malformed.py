"""No malformed tensor is ever called compliant: a single file whose fused or renamed tensor has
another shape than its layout gives it (extra rows behind the three q/k/v parts, a tensor of the
wrong height) loads into no model, and verify says so (exit 2, naming the tensor, its shape and
the shape required), with the base and with the mask's digests alike."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from freezeasguard.cli import main
from freezeasguard.guard.mask import Mask
from freezeasguard.models.families.tiny import save_tiny
from freezeasguard.models.pipelines import fingerprint, load_denoiser_state
from freezeasguard.audit.verify import denoiser_config, record_digests
from test_audit import write_bfl_file, write_sd3_file, write_single_file
from test_llm_families import _zimage_original_key, write_flux2_bfl_file


def _write_zimage(state, config, path):
    fused: dict[str, list] = {}
    for name in sorted(state, key=lambda n: (n.rsplit(".to_", 1)[0], "qkv".find(n.rsplit(".to_", 1)[-1][:1]))
                       if ".attention.to_" in n and ".to_out." not in n else (n, 0)):
        fused.setdefault(_zimage_original_key(name), []).append(state[name])
    tensors = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in fused.items()}
    tensors["norm_final.weight"] = torch.ones(4)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# family -> (writer of a single file in its original layout, one of its fused q/k/v tensors)
LAYOUTS = {
    "flux": (write_bfl_file, "double_blocks.0.txt_attn.qkv.weight"),
    "flux2": (write_flux2_bfl_file, "double_blocks.0.img_attn.qkv.weight"),
    "sd3": (write_sd3_file, "joint_blocks.0.x_block.attn.qkv.weight"),
    "zimage": (_write_zimage, "layers.0.attention.qkv.weight"),
}


# FLUX.1 in the fast suite, the other layouts with -m slow (CI runs both)
@pytest.fixture(scope="module", params=[f if f == "flux" else pytest.param(f, marks=pytest.mark.slow)
                                        for f in sorted(LAYOUTS)])
def written(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    folder = save_tiny(tmp / "model", family)
    base, config = load_denoiser_state(folder), denoiser_config(folder)
    names = list(base)
    mask = Mask.from_scores([(n, base[n]) for n in names], torch.tensor([float(i % 3 == 0) for i in range(len(names))]),
                            0.3, base_fingerprint=fingerprint(base.items()))
    plain = mask.save(tmp / "mask.safetensors")
    recorded = record_digests(mask, folder).save(tmp / "rec.safetensors")
    write, fused = LAYOUTS[family]
    good = write(base, config, tmp / "good.safetensors")
    return family, folder, plain, recorded, good, fused, tmp


def _verify(capsys, folder, mask, candidate):
    args = ["verify", "--mask", str(mask), "--candidate", str(candidate)] + (["--model", str(folder)] if folder else [])
    code = main(args)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out + out.err


def test_a_fused_tensor_with_extra_rows_or_the_wrong_height_is_unusable_not_compliant(written, capsys):
    family, folder, plain, recorded, good, fused, tmp = written
    tensors = load_file(str(good))
    rows, *rest = tensors[fused].shape
    assert rows % 3 == 0
    extra = dict(tensors)
    extra[fused] = torch.cat([tensors[fused], torch.randn(rows // 3, *rest)])          # q, k, v unchanged, then more
    save_file(extra, str(tmp / "extra.safetensors"))
    taller = dict(tensors)
    taller[fused] = torch.randn(rows + rows // 2, *rest)                              # 1.5x: other split points
    save_file(taller, str(tmp / "taller.safetensors"))
    wider = dict(tensors)
    wider[fused] = torch.randn(rows, *(r + 1 for r in rest))
    save_file(wider, str(tmp / "wider.safetensors"))
    for ref_model, ref_mask in ((folder, plain), (None, recorded)):
        code, out = _verify(capsys, ref_model, ref_mask, good)
        assert code == 0, out
        for name, shape in (("extra", [rows + rows // 3, *rest]), ("taller", [rows + rows // 2, *rest]),
                            ("wider", [rows, *(r + 1 for r in rest)])):
            code, out = _verify(capsys, ref_model, ref_mask, tmp / f"{name}.safetensors")
            assert code == 2, (family, name, out)
            assert f"tensor {fused} has shape {shape}" in out and f"requires {[rows, *rest]}" in out, out
            assert "compliant" not in out.replace("NOT compliant", "")


def test_a_renamed_single_file_tensor_of_another_shape_is_unusable(tiny_sd, tmp_path, capsys):
    base, config = load_denoiser_state(tiny_sd), denoiser_config(tiny_sd)
    names = list(base)
    mask = Mask.from_scores([(n, base[n]) for n in names], torch.zeros(len(names)), 0.1,
                            base_fingerprint=fingerprint(base.items())).save(tmp_path / "mask.safetensors")
    victim = "conv_in.weight"
    bad = dict(base)
    bad[victim] = torch.randn(base[victim].shape[0] + 4, *base[victim].shape[1:])
    write_single_file(bad, config, tmp_path / "bad.safetensors")
    code, out = _verify(capsys, tiny_sd, mask, tmp_path / "bad.safetensors")
    assert code == 2 and "model.diffusion_model.input_blocks.0.0.weight has shape" in out, out
