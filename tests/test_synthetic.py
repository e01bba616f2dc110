"""The synthetic world, its judges and the shipped tiny pipeline."""
import random

import pytest
import torch

from freezeasguard.evaluate.metrics import attribute_accuracy, frechet_distance, identity_recognition, prompt_accuracy
from freezeasguard.synthetic import TINY_SD
from freezeasguard.synthetic.world import make_cast, render_garment, render_logo, render_person


def test_rendering_is_deterministic_and_casts_differ_by_seed():
    cast = make_cast(0)
    a = render_person(cast[0], random.Random(5))
    b = render_person(cast[0], random.Random(5))
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
    assert render_logo(random.Random(1))[0].tobytes() == render_logo(random.Random(1))[0].tobytes()
    assert [p.name for p in make_cast(0)] == [p.name for p in make_cast(0)]
    assert {p.name for p in make_cast(0)}.isdisjoint({p.name for p in make_cast(1)})
    assert len({p.name for p in cast}) == len(cast) == 8


def test_captions_say_what_is_drawn():
    img, caption, attrs = render_logo(random.Random(3))
    assert f"a {attrs['colour1']} {attrs['shape1']}" in caption and attrs["background"] in caption
    img, caption, attrs = render_garment(random.Random(3))
    assert attrs["kind"] in caption and attrs["colour"] in caption
    p = make_cast(0)[2]
    img, caption, attrs = render_person(p, random.Random(3))
    assert caption.startswith(f"a photo of {p.name} {attrs['expression']}") and attrs["background"] in caption


@pytest.mark.parametrize("domain", ["logos", "clothes"])
def test_attribute_judges_read_real_renders(domain):
    from freezeasguard.evaluate.world import SyntheticWorld
    world = SyntheticWorld(0)
    _, attrs, images = world.innocent_prompts(domain, 200, seed=4242)
    assert prompt_accuracy(world.attribute_judge(domain).predict(images), attrs) >= 0.95


def test_recogniser_knows_the_cast_on_held_out_renders():
    from freezeasguard.evaluate.world import SyntheticWorld
    world = SyntheticWorld(0)
    rec = world.recogniser()
    for subject in world.subjects(8):
        _, real = world.people_prompts(subject, 40, seed=777)
        assert identity_recognition([p["identity"] for p in rec.predict(real)], subject) >= 0.95, subject


def test_shipped_pipeline_loads_offline_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from freezeasguard.generate import generate_images, load_pipeline
    pipe = load_pipeline(TINY_SD)
    assert len(pipe.tokenizer) > 2
    images = generate_images(pipe, ["a plain red t-shirt"], steps=3, seed=0)
    assert images[0].size == (32, 32)


def test_shipped_weights_match_the_checksums_of_their_pretraining_record():
    """pretrain_info.json records the settings and the sha256 of every weight file it wrote; the
    files in the package must be those (a stale record would describe another model)."""
    import hashlib
    import json
    info = json.loads((TINY_SD / "pretrain_info.json").read_text())
    shipped = sorted(str(p.relative_to(TINY_SD)) for p in TINY_SD.rglob("*.safetensors"))
    assert sorted(info["sha256"]) == shipped
    for name, digest in info["sha256"].items():
        assert hashlib.sha256((TINY_SD / name).read_bytes()).hexdigest() == digest, name
    unet_config = json.loads((TINY_SD / "unet" / "config.json").read_text())
    assert unet_config["attention_head_dim"] == info["settings"]["attention_heads"]


@pytest.mark.parametrize("sampler", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_samplers_built_from_the_shipped_scheduler_config_reach_the_data(sampler):
    """With the exact noise predictor of a one-point data set, eps(x_t) = (x_t - sqrt(a_t) x0) /
    sqrt(1 - a_t), any sampler built from the shipped config must land on x0. (A config that lets
    DDIM clip x0 estimates to [-1, 1] fails this: latents are not bounded by 1.)"""
    import json
    import diffusers

    config = json.loads((TINY_SD / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sampler).from_config(config)
    alphas_cumprod = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0 = 1.5 * torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64)
    scheduler.set_timesteps(20)
    x = torch.randn(x0.shape, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        a = alphas_cumprod[int(t)]
        x_t = scheduler.scale_model_input(x, t)
        # scale_model_input returns the variance-preserving x_t for every scheduler
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        x = scheduler.step(eps, t, x).prev_sample
    assert (x - x0).abs().max() < 0.05 * x0.abs().max(), (x - x0).abs().max()


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    torch.manual_seed(0)
    x = torch.randn(500, 8)
    assert abs(frechet_distance(x, x)) < 1e-6
    d1, d2 = frechet_distance(x, x + 0.5), frechet_distance(x, x + 1.0)
    assert d1 == pytest.approx(8 * 0.25, rel=1e-6) and d2 == pytest.approx(8 * 1.0, rel=1e-6)
    # independent check with diagonal covariances: FD = |dmu|^2 + sum (s1 - s2)^2
    a, b = torch.randn(20000, 3) * torch.tensor([1.0, 2.0, 3.0]), torch.randn(20000, 3) * 2.0
    expected = sum((s1 - 2.0) ** 2 for s1 in (1.0, 2.0, 3.0))
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.1)


def test_prompt_and_attribute_accuracy_by_hand():
    expected = [{"shape": "circle", "colour": "red"}, {"shape": "star", "colour": "blue"}]
    predicted = [{"shape": "circle", "colour": "red"}, {"shape": "star", "colour": "green"}]
    assert prompt_accuracy(predicted, expected) == 0.5          # one image has every attribute right
    assert attribute_accuracy(predicted, expected) == 0.75      # (2/2 + 1/2) / 2
