"""The compliance audit: one ulp is a violation; an honest fp16 export passes in tolerance mode."""
import pytest
import torch
from safetensors.torch import save_file

from freezeasguard import FinetuneConfig, Mask, guarded_finetune, verify_checkpoint
from freezeasguard.guard.mask import MaskError
from freezeasguard.models.pipelines import load_model, load_denoiser_state


@pytest.fixture(scope="module")
def setup(tiny_sd, people, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    named = list(load_model(tiny_sd).denoiser.named_parameters())
    from freezeasguard.models.pipelines import fingerprint
    mask = Mask.random(named, 0.3, seed=1, base_fingerprint=fingerprint(load_denoiser_state(tiny_sd).items()))
    mask_path = mask.save(tmp / "mask.safetensors")
    out = tmp / "ft"
    guarded_finetune(tiny_sd, people, out, FinetuneConfig(steps=1, batch_size=2, lr=1e-3, device="cpu",
                                                         checkpoint_every=0), mask=mask)
    return tmp, mask, mask_path, out


def test_compliant_checkpoint_passes(tiny_sd, setup):
    tmp, mask, mask_path, out = setup
    report = verify_checkpoint(tiny_sd, mask_path, out)
    assert report.compliant and report.frozen_checked == 206
    assert report.trainable_changed == 480


def test_one_ulp_in_one_frozen_tensor_is_flagged(tiny_sd, setup):
    tmp, mask, mask_path, out = setup
    state = load_denoiser_state(out)
    victim = mask.frozen_names[17]
    t = state[victim].clone().view(-1)
    t[0] = torch.nextafter(t[0], torch.tensor(float("inf")))
    state[victim] = t.view_as(state[victim])
    save_file(state, str(tmp / "tampered.safetensors"))
    report = verify_checkpoint(tiny_sd, mask_path, tmp / "tampered.safetensors")
    assert not report.compliant
    assert [v.name for v in report.violations] == [victim]
    assert 0 < report.violations[0].max_abs_diff < 1e-6


def test_an_honest_fp16_export_passes_and_one_fp16_ulp_does_not(tiny_sd, setup):
    """Exact mode: each frozen tensor is the base in the candidate's dtype, bit for bit (rounding to
    fp16 is deterministic); tolerance mode: within --atol of that rounding."""
    tmp, mask, mask_path, out = setup
    half = {k: v.half() for k, v in load_denoiser_state(out).items()}
    save_file(half, str(tmp / "half.safetensors"))
    assert verify_checkpoint(tiny_sd, mask_path, tmp / "half.safetensors").compliant
    assert verify_checkpoint(tiny_sd, mask_path, tmp / "half.safetensors", mode="tolerance").compliant
    victim = mask.frozen_names[3]
    t = half[victim].clone().view(-1)
    t.view(torch.int16)[0] += 1                                          # one fp16 ulp
    half[victim] = t.view_as(half[victim])
    save_file(half, str(tmp / "half-bad.safetensors"))
    for mode in ("exact", "tolerance"):
        report = verify_checkpoint(tiny_sd, mask_path, tmp / "half-bad.safetensors", mode=mode)
        assert [v.name for v in report.violations] == [victim]
    assert verify_checkpoint(tiny_sd, mask_path, tmp / "half-bad.safetensors", mode="tolerance", atol=0.1).compliant


def test_mask_for_another_base_is_refused(tiny_sd_v, setup):
    tmp, mask, mask_path, out = setup
    with pytest.raises(MaskError, match="another model"):
        verify_checkpoint(tiny_sd_v, mask_path, out)
