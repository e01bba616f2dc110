"""SDXL, SD3 and FLUX.1 through the same learn / finetune / verify: tiny pipelines of each family
built in code, the flow-matching objective against a hand computation, and masks that refuse a
model of another family."""
import json

import pytest
import torch
from safetensors.torch import save_file

from freezeasguard.cli import main
from freezeasguard.training.diffusion import NoiseSchedule, noisy_and_target
from freezeasguard.models.families.flux import image_ids, pack, unpack
from freezeasguard.models.families.tiny import save_tiny
from freezeasguard.guard.mask import Mask, MaskError
from freezeasguard.models.families import FAMILIES
from freezeasguard.models.generate import load_pipeline
from freezeasguard.models.pipelines import Components, fingerprint, load_denoiser_state, load_model

TINY_FAMILIES = ["sdxl", "sd3", "flux", "flux2", "qwenimage", "zimage"]


@pytest.fixture(scope="module", autouse=True)
def short_flux2_captions():
    """FLUX.2 pads every caption to 512 tokens (its training script's default), and the tiny
    transformer's joint attention over them was most of each FLUX.2 test's time; 64 tokens take
    the same code path."""
    from freezeasguard.models.families import flux2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flux2, "MAX_SEQUENCE_LENGTH", 64)
        yield


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request, tmp_path_factory):
    return request.param, save_tiny(tmp_path_factory.mktemp(request.param) / "model", request.param,
                                    extra_words=["mara", "quell"])


def test_flow_matching_noise_and_target_match_a_hand_computation():
    n, shift = 1000, 3.0
    schedule = NoiseSchedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                    "num_train_timesteps": n, "shift": shift})
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    index = torch.tensor([0, 500, 999])
    noisy, model_t, target = noisy_and_target(x0, eps, index, schedule)
    u = (n - index.double()) / n                       # the unshifted noise level of each index
    s = shift * u / (1 + (shift - 1) * u)              # SD3's time shift
    s4 = s.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s4) * x0 + s4 * eps)
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(model_t, (s * n).float())


def test_sd3_loss_is_on_the_preconditioned_output_as_its_training_script_and_flux_on_the_flow(monkeypatch):
    """diffusers' SD3 scripts (--precondition_outputs 1): loss = mean((x_t - s * pred - x0)^2);
    FLUX's: mean((pred - (eps - x0))^2). Checked with a stand-in denoiser whose prediction is known."""
    import freezeasguard.training.diffusion as diffusion
    from freezeasguard.training.diffusion import diffusion_loss

    class Fixed:
        @staticmethod
        def predict(denoiser, noisy, model_t, cond):
            return 0.3 * noisy + cond

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    x0, eps, cond = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    index = torch.tensor([3, 400, 990])
    for family in ("sd3", "flux"):
        monkeypatch.setitem(diffusion.FAMILIES, family, Fixed)
        schedule = NoiseSchedule.from_scheduler_config(config, family)
        s = schedule.sigmas[index].float().view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * eps
        pred = 0.3 * noisy + cond
        by_hand = ((noisy - s * pred - x0) ** 2 if family == "sd3" else (pred - (eps - x0)) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(diffusion_loss(None, x0, cond, eps, index, schedule), by_hand)


def test_v_prediction_target_matches_a_hand_computation():
    from freezeasguard.models.families.tiny import scheduler_config
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config("v_prediction"))
    x0, eps, index = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 700])
    noisy, model_t, target = noisy_and_target(x0, eps, index, schedule)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2   # scaled_linear
    a = torch.cumprod(1 - betas, 0)[index].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(target, a.sqrt() * eps - (1 - a).sqrt() * x0)
    assert torch.equal(model_t, index)


def test_flux_packing_is_a_lossless_permutation_into_2x2_patch_tokens():
    x = torch.randn(2, 16, 4, 6)
    tokens = pack(x)
    assert tokens.shape == (2, 6, 64)
    torch.testing.assert_close(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(16, 4).reshape(-1))   # patch (0, 1)
    assert torch.equal(unpack(tokens, 4, 6), x)
    assert image_ids(4, 6, "cpu")[1].tolist() == [0, 0, 1]


def test_the_family_is_read_from_the_folder_and_a_short_full_finetune_lowers_the_loss(tiny, people, tmp_path):
    from freezeasguard import FinetuneConfig, guarded_finetune
    family, model = tiny
    comps = load_model(model)
    # Qwen-Image's configs name no side: the pipeline's default, 1024
    assert comps.family == family and comps.resolution == (1024 if family == "qwenimage" else 16)
    cfg = FinetuneConfig(steps=15, batch_size=4, lr=3e-3, device="cpu", checkpoint_every=0, resolution=16)
    r = guarded_finetune(model, people, tmp_path / "ft", cfg, full=True)
    first, last = r.history[0]["loss_data"], sum(h["loss_data"] for h in r.history[-5:]) / 5
    assert last < first


@pytest.mark.slow      # end to end: learn, finetune, LoRA, verify, export, generate per family (.ci/run runs -m slow)
def test_learn_finetune_lora_and_verify_end_to_end_on_every_family(tiny, people, logos, tmp_path, capsys):
    family, model = tiny
    mask = tmp_path / "mask.safetensors"
    assert main(["learn", "--model", str(model), "--illegal", str(people), "--innocent", str(logos), "--ratio", "0.3",
                 "--warm-start-steps", "2", "--steps", "2", "--inner-steps", "1", "--batch-size", "2",
                 "--device", "cpu", "--resolution", "16", "--out", str(mask)]) == 0
    learned = Mask.load(mask)
    assert learned.frozen_names and learned.tensor_ratio == pytest.approx(0.3, abs=0.01)
    ft = tmp_path / "ft"
    assert main(["finetune", "--model", str(model), "--data", str(people), "--mask", str(mask), "--steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--resolution", "16", "--out", str(ft)]) == 0
    folder = "unet" if family == "sdxl" else "transformer"
    assert (ft / folder / "diffusion_pytorch_model.safetensors").is_file()
    base, tuned = load_denoiser_state(model), load_denoiser_state(ft)
    frozen = set(learned.frozen_names)
    assert all(torch.equal(base[n], tuned[n]) for n in frozen)
    assert any(not torch.equal(base[n], tuned[n]) for n in base if n not in frozen)
    assert main(["verify", "--model", str(model), "--mask", str(mask), "--candidate", str(ft)]) == 0
    changed = sorted(frozen)[0]                     # the same weights with one frozen tensor moved
    tampered = tmp_path / "tampered.safetensors"
    save_file({**tuned, changed: tuned[changed] + 1e-3}, str(tampered))
    capsys.readouterr()
    assert main(["verify", "--model", str(model), "--mask", str(mask), "--candidate", str(tampered)]) == 1
    assert changed in capsys.readouterr().out
    lora = tmp_path / "lora"
    assert main(["finetune", "--model", str(model), "--data", str(people), "--mask", str(mask), "--steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--lora-rank", "2", "--resolution", "16",
                 "--out", str(lora)]) == 0
    assert json.loads((lora / "freezeasguard_manifest.json").read_text())["lora"]["modules"]
    capsys.readouterr()
    assert main(["verify", "--model", str(model), "--mask", str(mask), "--candidate", str(lora)]) == 0
    loaded = Components.from_pipeline(load_pipeline(lora), lora)     # the base with the adapter, as the runner reads it
    assert loaded.family == family and len(loaded.text_encoders) == len(FAMILIES[family].encoders)
    assert any("lora_" in n for n, _ in loaded.denoiser.named_parameters())
    for fmt in ("peft", "ai-toolkit", "onetrainer"):
        assert main(["mask", "export", str(mask), "--format", fmt]) == 0
    for source in (ft, lora):       # the fine-tuned pipeline, and the base with the adapter loaded
        out = tmp_path / f"images-{source.name}"
        assert main(["generate", "--model", str(source), "--prompt", "a photo of mara quell", "--steps", "2",
                     "--resolution", "16", "--out", str(out)]) == 0
        from PIL import Image
        assert Image.open(out / "grid.png").size[0] >= 16


def test_a_mask_for_one_family_is_refused_on_another_naming_both(tmp_path):
    sdxl, flux = save_tiny(tmp_path / "sdxl", "sdxl"), save_tiny(tmp_path / "flux", "flux")
    mask = Mask.random(list(load_denoiser_state(sdxl).items()), 0.3, seed=0)
    with pytest.raises(MaskError, match="made for a sdxl model .* is a flux model"):
        mask.check_matches(list(load_model(flux).denoiser.named_parameters()))


@pytest.mark.slow
def test_the_published_configs_give_the_published_parameter_counts_on_the_meta_device():
    from freezeasguard.models.families.shapes import PUBLISHED, guarded_full_gb, memory_plan, meta_model
    counts = {name: sum(p.numel() for p in meta_model(name).parameters()) for name in PUBLISHED}
    assert counts["sdxl"] == 2_567_463_684            # SDXL base UNet, as reported with the model
    assert counts["flux1-dev"] == 11_901_408_320      # FLUX.1-dev transformer
    assert abs(counts["sd35-large"] / 8.1e9 - 1) < 0.01   # "8.1 billion parameters"
    assert abs(counts["sd35-medium"] / 2.5e9 - 1) < 0.15  # "2.5 billion" counts more than the transformer
    assert counts["flux2-dev"] == 32_223_281_152       # "32 billion parameter"
    assert counts["qwen-image"] == 20_430_401_088      # "a 20B MMDiT"
    assert counts["z-image"] == 6_154_908_736          # "6B parameters"
    for name in ("flux2-dev", "qwen-image", "z-image"):
        assert abs(counts[name] / PUBLISHED[name][2] - 1) < 0.03, name
    plan = memory_plan(counts["flux1-dev"])
    assert plan["mask_learning_fp32_gb"] == pytest.approx(12 * counts["flux1-dev"] / 2**30)
    assert guarded_full_gb(1000, 0.75) == pytest.approx(1000 * (4 + 3) / 2**30)


# preset-shaped models take 5-14 s each (flux2-dev's 15,360-wide text encoder output 50-100 s): they
# run with -m slow; every family is end to end in the fast suite on smaller shapes
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sdxl", "sd35-medium", "flux1-dev", "flux2-dev", "qwen-image", "z-image"])
def test_presets_run_learn_finetune_and_verify_end_to_end_on_models_shaped_like_theirs(preset, people, logos,
                                                                                      tmp_path, capsys):
    """`--preset P` on a tiny model with the published model's checked numbers (native side 1024,
    text width 2048 / 4096, depth 24 / 19, guidance embedding): the folder check passes, the
    preset's published settings are what runs (where no flag was typed), and learn -> finetune ->
    verify works at --resolution 16. A side the model cannot take is refused, naming one it can."""
    from freezeasguard.models.families.tiny import build_preset_shaped
    from freezeasguard.models.presets import PRESETS
    model, mask, ft = tmp_path / "model", tmp_path / "mask.safetensors", tmp_path / "ft"
    build_preset_shaped(PRESETS[preset], extra_words=["mara", "quell"]).save_pretrained(model, safe_serialization=True)
    common = ["--preset", preset, "--model", str(model), "--device", "cpu"]
    assert main(["learn", *common, "--resolution", "16", "--illegal", str(people), "--innocent", str(logos),
                 "--ratio", "0.3", "--warm-start-steps", "1", "--steps", "2", "--inner-steps", "1", "--batch-size", "2",
                 "--out", str(mask)]) == 0
    used = Mask.load(mask).meta["hyperparameters"]
    assert used["user_lr"] == PRESETS[preset].settings["learn"]["user_lr"] and used["resolution"] == 16
    assert main(["finetune", *common, "--resolution", "16", "--data", str(people), "--mask", str(mask),
                 "--steps", "2", "--batch-size", "2", "--grad-accum", "1", "--out", str(ft)]) == 0
    config = json.loads((ft / "freezeasguard_manifest.json").read_text())["config"]
    published = {k: v for k, v in PRESETS[preset].settings["finetune"].items()
                 if k not in ("steps", "batch_size", "grad_accum")}
    assert published and all(config[k] == v for k, v in published.items())
    base, tuned = load_denoiser_state(model), load_denoiser_state(ft)
    frozen = set(Mask.load(mask).frozen_names)
    assert all(torch.equal(base[n], tuned[n]) for n in frozen)
    assert any(not torch.equal(base[n], tuned[n]) for n in base if n not in frozen)
    assert main(["verify", "--preset", preset, "--model", str(model), "--mask", str(mask), "--candidate", str(ft)]) == 0
    capsys.readouterr()
    assert main(["finetune", *common, "--resolution", "18", "--data", str(people), "--mask", str(mask),
                 "--steps", "1", "--out", str(tmp_path / "odd")]) == 2
    assert "--resolution 18: this model takes multiples of 4 px; use 16" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sdxl", "sd3", "flux2", "qwenimage", "zimage"])
def test_sharded_finetune_in_two_processes_gives_the_single_process_result(family, people, tmp_path, run_cli):
    """finetune --shard under accelerate launch (2 CPU processes, gloo, FSDP2) on a tiny model of
    each family: the same weights as one process with the same global batch, frozen tensors
    byte-identical. Plain SGD, so the comparison is tight: Adam turns the rounding noise of a
    near-zero gradient (a conv bias before a GroupNorm) into a full +-lr step either way."""
    model = save_tiny(tmp_path / "flux", family)
    mask = tmp_path / "mask.safetensors"
    Mask.random(list(load_model(model).denoiser.named_parameters()), 0.3, seed=2,   # SD3's state also has a buffer
                base_fingerprint=fingerprint(load_denoiser_state(model).items())).save(mask)
    args = ["finetune", "--model", str(model), "--data", str(people), "--mask", str(mask), "--steps", "3",
            "--batch-size", "4", "--lr", "0.1", "--optimizer", "sgd", "--device", "cpu", "--checkpoint-every", "0",
            "--resolution", "16"]
    run_cli([*args, "--out", str(tmp_path / "one")])
    log = run_cli([*args, "--shard", "--out", str(tmp_path / "two")], processes=2)
    assert "sharded the denoiser over 2 processes" in log
    a, b, base = (load_denoiser_state(tmp_path / d) for d in ("one", "two", "flux"))
    frozen = set(Mask.load(mask).frozen_names)
    for n in Mask.load(mask).names:                 # the parameters (SD3's state also holds a buffer)
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6)    # steps move weights by ~1e-3
        # Qwen-Image's last block has a text MLP whose output nothing reads: no gradient, no step
        assert torch.equal(b[n], base[n]) == (n in frozen or torch.equal(a[n], base[n])), n
    assert all(torch.equal(b[n], base[n]) for n in frozen)
    assert sum(not torch.equal(b[n], base[n]) for n in b) > 0.6 * (len(b) - len(frozen))
    assert main(["verify", "--model", str(model), "--mask", str(mask), "--candidate", str(tmp_path / "two")]) == 0


# Resuming and mask learning under --shard save, restore and combine DTensor shards whatever the
# model; what is a family's own is which blocks become shards, and the two-process fine-tune
# above checks that for every family. So these run on one family each: Qwen-Image for the
# fine-tune's resume (its last text MLP gets no gradient, hence no Adam state), FLUX.1 for mask
# learning (the others took 3 x 60-90 s more of -m slow and covered nothing new).
@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwenimage"])
def test_a_sharded_finetune_resumes_from_its_per_process_checkpoints_bit_exactly(family, people, tmp_path, run_cli):
    """finetune --shard checkpoints each process's shards (weights and Adam moments) beside an
    index of the last complete step; a resume in as many processes gives the uninterrupted run's
    weights bit for bit, and one in another number of processes is refused, saying how to resume."""
    from safetensors.torch import load_file
    model = save_tiny(tmp_path / "flux", family)
    mask = tmp_path / "mask.safetensors"
    Mask.random(list(load_model(model).denoiser.named_parameters()), 0.3, seed=2).save(mask)
    args = ["finetune", "--model", str(model), "--data", str(people), "--mask", str(mask), "--batch-size", "4",
            "--lr", "1e-3", "--device", "cpu", "--checkpoint-every", "2", "--shard", "--resolution", "16"]
    run_cli([*args, "--steps", "4", "--out", str(tmp_path / "whole")], processes=2)
    run_cli([*args, "--steps", "2", "--out", str(tmp_path / "part")], processes=2)
    work = tmp_path / "part.work"
    files = ["checkpoint.step2.rank0-of-2.safetensors", "checkpoint.step2.rank1-of-2.safetensors"]
    assert json.loads((work / "checkpoint.shards.json").read_text()) == {"step": 2, "world_size": 2, "files": files}
    shards = [load_file(work / f) for f in files]
    base = load_denoiser_state(model)
    trainable = [n for n in base if n not in set(Mask.load(mask).frozen_names)]
    for n in trainable:                   # each process holds its rows; together, the whole tensor once
        assert sum(s[f"param/{n}"].numel() for s in shards) == base[n].numel()
    stateless = {n for n in trainable if f"opt/{n}/exp_avg#shard" not in shards[0]}

    log = run_cli([*args, "--steps", "4", "--out", str(tmp_path / "part"), "--resume"], code=2)
    assert "sharded over 2 processes" in log and "--num_processes 2" in log
    log = run_cli([*args, "--steps", "4", "--out", str(tmp_path / "part"), "--resume"], processes=2)
    assert "from step 2" in log
    assert sorted(p.name for p in work.glob("checkpoint*")) == [
        "checkpoint.shards.json", "checkpoint.step4.rank0-of-2.safetensors", "checkpoint.step4.rank1-of-2.safetensors"]
    whole, resumed = load_denoiser_state(tmp_path / "whole"), load_denoiser_state(tmp_path / "part")
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    # Adam state for exactly the trainable tensors that train (Qwen-Image's last text MLP is never read)
    assert stateless == {n for n in trainable if torch.equal(whole[n], base[n])}
    assert len(stateless) < 0.1 * len(trainable)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux"])
def test_sharded_mask_learning_resumes_bit_exactly(family, people, logos, tmp_path, run_cli):
    """learn --shard checkpoints each process's shards of theta(m) and theta_d with the logits
    (and its warm start checkpoints like finetune --shard): stopped after update 1 and resumed,
    it gives the uninterrupted run's logits bit for bit."""
    model = save_tiny(tmp_path / "flux", family)
    args = ["learn", "--model", str(model), "--illegal", str(people), "--innocent", str(logos), "--ratio", "0.3",
            "--warm-start-steps", "2", "--inner-steps", "2", "--batch-size", "4", "--user-lr", "1e-3",
            "--device", "cpu", "--checkpoint-every", "1", "--shard", "--resolution", "16"]
    run_cli([*args, "--steps", "3", "--out", str(tmp_path / "whole.safetensors")], processes=2)
    run_cli([*args, "--steps", "2", "--out", str(tmp_path / "part.safetensors")], processes=2)
    assert json.loads((tmp_path / "part.safetensors.work" / "learn_checkpoint.shards.json").read_text())["step"] == 1
    log = run_cli([*args, "--steps", "3", "--out", str(tmp_path / "part.safetensors"), "--resume"], processes=2)
    assert "resumed mask learning at update 1/3" in log
    whole, resumed = Mask.load(tmp_path / "whole.safetensors"), Mask.load(tmp_path / "part.safetensors")
    assert torch.equal(whole.logits, resumed.logits)
    assert torch.equal(whole.frozen, resumed.frozen)


def test_sd3_draws_times_logit_normally_as_its_training_script_and_flux_uniformly():
    from freezeasguard.training.diffusion import draw_noise
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    sd3, flux = (NoiseSchedule.from_scheduler_config(config, family) for family in ("sd3", "flux"))
    assert (sd3.timestep_sampling, flux.timestep_sampling) == ("logit_normal", "uniform")
    g = torch.Generator().manual_seed(0)
    draw = draw_noise(4000, (1, 1, 1), 1000, g, "logit_normal")
    g = torch.Generator().manual_seed(0)                     # the same draws by hand
    torch.randn(4000, 1, 1, 1, generator=g), torch.randn(4000, 1, 1, 1, generator=g)
    by_hand = (torch.sigmoid(torch.randn(4000, generator=g)) * 1000).long()
    assert torch.equal(draw.timesteps, by_hand)
    middle = ((draw.timesteps >= 250) & (draw.timesteps < 750)).float().mean()
    assert middle > 0.7                                      # uniform: 0.5; logit-normal(0, 1): 0.73


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux"])            # one family: see the note above the resume tests
def test_sharded_mask_learning_in_two_processes_gives_the_mask_of_one(family, people, logos, tmp_path, run_cli):
    """learn --shard under accelerate launch (2 CPU processes, FSDP2) on a tiny FLUX, warm start
    included: the same frozen set as one process with the same global batch, logits within rounding."""
    model = save_tiny(tmp_path / "flux", family)
    args = ["learn", "--model", str(model), "--illegal", str(people), "--innocent", str(logos), "--ratio", "0.3",
            "--warm-start-steps", "2", "--steps", "3", "--inner-steps", "2", "--batch-size", "4",
            "--user-lr", "1e-3", "--device", "cpu", "--resolution", "16"]
    run_cli([*args, "--out", str(tmp_path / "one.safetensors")])
    log = run_cli([*args, "--shard", "--out", str(tmp_path / "two.safetensors")], processes=2)
    assert "sharded the denoiser over 2 processes" in log
    a, b = Mask.load(tmp_path / "one.safetensors"), Mask.load(tmp_path / "two.safetensors")
    assert torch.equal(a.frozen, b.frozen)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-3, atol=1e-4)


def test_validation_images_use_the_familys_own_pipeline_with_the_loaded_parts(tiny, tmp_path):
    """finetune --validation-prompt builds a pipeline over the components being trained: it must be
    the family's own class (an SD pipeline cannot call a transformer) and sample what the folder's
    pipeline samples from the same weights."""
    from freezeasguard.models.generate import generate_images, pipeline_from_components
    family, model = tiny
    comps = load_model(model)
    pipe = pipeline_from_components(comps)
    assert type(pipe).__name__ == FAMILIES[family].pipeline_classes[0]
    assert getattr(pipe, FAMILIES[family].denoiser_folder) is comps.denoiser
    ours = generate_images(pipe, ["a photo of mara quell"], steps=2, seed=3, guidance=1.0, side=16)[0]
    folder = generate_images(load_pipeline(model), ["a photo of mara quell"], steps=2, seed=3, guidance=1.0,
                             side=16)[0]
    assert list(ours.getdata()) == list(folder.getdata())
