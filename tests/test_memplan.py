"""The memory plan (memplan.py) against hand counts and against measured runs: the same stages, the
same buffers, the same sizes (benchmarks/bench_realsize.py runs them at the SD v1.5 UNet's real
size); and the base weights read a tensor at a time instead of held as a second copy."""
import sys
from pathlib import Path

import pytest
import torch

from freezeasguard.models.families.tiny import save_tiny
from freezeasguard.models.memplan import STAGES, kept_activation_bytes, stage_plan
from freezeasguard.models.pipelines import LazyState, fingerprint, load_denoiser_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_realsize  # noqa: E402


def test_stage_plans_count_each_buffer_by_hand():
    n, acts = 1000, 6000
    assert stage_plan("mask_learning", n, acts).buffers == {"weights": 4000, "theta_d": 4000,
                                                            "gradient_buffer": 4000, "activations": 6000}
    # activations and gradients are not held together: the larger counts
    assert stage_plan("warm_start", n, acts).total == 4000 + 8000 + 6000
    assert stage_plan("warm_start", n, 100).total == 4000 + 8000 + 4000
    assert stage_plan("guarded_ft", n, 100, trainable=700).total == 4000 + 5600 + 2800
    assert stage_plan("lora", n, 100, lora_params=50).total == 4000 + 200 + 400 + 200
    with pytest.raises(ValueError, match="one of warm_start"):
        stage_plan("sampling", n)


def test_kept_activations_of_a_meta_copy_are_those_of_the_real_model():
    """On the meta device attention is counted as the fused kernel keeps it (its math form would
    keep the whole attention matrix); a small UNet with attention agrees with its real twin."""
    from diffusers import UNet2DConditionModel

    from freezeasguard.models.families.tiny import tiny_unet_config
    config = tiny_unet_config("sd15", sample_size=16, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32)

    def count(device):
        with torch.device(device):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**config)
            x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 32)
        return kept_activation_bytes(unet, lambda: unet(x, t, c).sample.sum())

    real, meta = count("cpu"), count("meta")
    assert abs(meta / real - 1) < 0.08, (meta, real)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(2, 8)          # linear 0 keeps x, ReLU its output (which linear 2 keeps too: once)
    assert kept_activation_bytes(mlp, lambda: mlp(x).sum()) == (2 * 8 + 2 * 16) * 4


@pytest.mark.parametrize("stage", STAGES)
def test_the_plan_and_a_measured_run_hold_the_same_buffers(stage):
    """bench_realsize's worker reports the buffers a run of the stage actually holds (its state
    tensors, optimizer moments, the activations autograd kept); the plan, computed on a meta copy,
    must name the same buffers with the same sizes (activations within the fused-kernel count)."""
    measured = bench_realsize.worker(stage, "tiny", 8, "cpu", 1)["buffers"]
    planned = bench_realsize.plan_for(stage, "tiny", 8)["buffers"]
    assert list(measured) == list(planned)
    for name in planned:
        if name.startswith("activations"):
            assert abs(measured[name] / planned[name] - 1) < 0.1, (name, measured[name], planned[name])
        else:
            assert measured[name] == planned[name], name


def test_the_base_weights_are_read_a_tensor_at_a_time(tmp_path):
    model = save_tiny(tmp_path / "m", "flux")
    lazy, whole = LazyState(model), load_denoiser_state(model)
    assert set(lazy) == set(whole) and len(lazy) == len(whole)
    name = next(iter(whole))
    assert torch.equal(lazy[name], whole[name]) and lazy[name] is not lazy[name]    # read again, not kept
    assert fingerprint(lazy) == fingerprint(whole.items())


def test_the_sdxl_rows_a_gpu_run_gives_are_planned_from_the_published_unet():
    """`bench_realsize.py --device cuda --model sdxl` (Table 3's rows on the first lent GPU): its
    plan comes from SDXL's published UNet on the meta device, with its added conditioning."""
    plan = bench_realsize.plan_for("mask_learning", "sdxl", 16)["buffers"]
    assert plan["weights"] == 4 * 2_567_463_684
    assert 0 < plan["activations"] < plan["weights"]
