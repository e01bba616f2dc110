"""The synthetic world, its judges and the shipped tiny pipeline."""
import random

import pytest
import torch

from freezeasguard.metrics.basic import attribute_accuracy, frechet_distance, identity_recognition, prompt_accuracy
from freezeasguard.synthetic import TINY_SD
from freezeasguard.synthetic.world import (
    TRAITS,
    make_cast,
    person_caption,
    render_garment,
    render_generic_person,
    render_logo,
    render_person,
    visible_traits,
)


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
    for seed in range(20):
        img, caption, attrs = render_logo(random.Random(seed))
        assert f"{attrs['count']} {attrs['colour']} {attrs['shape']}" in caption
        assert caption.endswith(f"on a {attrs['background']} background")
    img, caption, attrs = render_garment(random.Random(3))
    assert attrs["kind"] in caption and attrs["colour"] in caption
    p = make_cast(0)[2]
    img, caption, attrs = render_person(p, random.Random(3))
    assert caption == (f"a photo of {p.name} {attrs['expression']}, wearing a {attrs['shirt']} shirt, "
                       f"in front of {attrs['background']}")


def test_generic_captions_name_the_traits_drawn_and_dropped_traits_are_left_out():
    for seed in range(30):
        img, caption, attrs = render_generic_person(random.Random(seed))
        assert caption.startswith("a photo of a person with ")
        assert f"a {attrs['face_shape']} face" in caption and f"{attrs['skin']} skin" in caption
        if attrs["hair_style"] == "bald":
            assert "a bald head" in caption
            assert ("hair_colour" in attrs) == (attrs["mark"] == "beard")   # colour only shows in a beard
        else:
            assert attrs["hair_colour"] in caption
        assert ("glasses" in caption) == (attrs["mark"] == "glasses")
        assert ("beard" in caption) == (attrs["mark"] == "beard")
    traits = {"face_shape": "long", "skin": "tan", "hair_style": "bun", "hair_colour": "red", "mark": "glasses"}
    scene = {"expression": "smiling", "shirt": "blue", "background": "the sea"}
    assert person_caption("a person", scene, traits) == ("a photo of a person with a long face, tan skin, red hair "
                                                          "in a bun and glasses, smiling, wearing a blue shirt, in front "
                                                          "of the sea")
    assert person_caption("a person", scene, traits, frozenset(TRAITS)) == person_caption("a person", scene)
    assert "red" not in person_caption("a person", scene, traits, frozenset({"hair_colour"}))


def test_cast_members_differ_in_two_visible_traits():
    for seed in range(5):
        cast = make_cast(seed)
        shown = [visible_traits(p.traits()) for p in cast]
        for i in range(len(cast)):
            for j in range(i):
                assert sum(shown[i].get(k) != shown[j].get(k) for k in TRAITS) >= 2


def test_trait_judge_reads_real_renders():
    from freezeasguard.synthetic.classifiers import trait_samples
    from freezeasguard.synthetic.judges import trait_judge
    images, expected = trait_samples(200, seed=4243)
    assert attribute_accuracy(trait_judge().predict(images), expected) >= 0.95


@pytest.mark.parametrize("domain", ["logos", "clothes"])
def test_attribute_judges_read_real_renders(domain):
    from freezeasguard.experiment.synthetic_world import SyntheticWorld
    world = SyntheticWorld(0)
    _, attrs, images = world.innocent_prompts(domain, 200, seed=4242)
    assert prompt_accuracy(world.attribute_judge(domain).predict(images), attrs) >= 0.95


def test_recogniser_knows_the_cast_on_held_out_renders():
    from freezeasguard.experiment.synthetic_world import SyntheticWorld
    world = SyntheticWorld(0)
    rec = world.recogniser()
    for subject in world.subjects(8):
        _, real = world.people_prompts(subject, 40, seed=777)
        assert identity_recognition([p["identity"] for p in rec.predict(real)], subject) >= 0.95, subject


def test_shipped_pipeline_loads_offline_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from freezeasguard.models.generate import generate_images, load_pipeline
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
    assert info["unet_tensors"] == 684 and info["steps"] > 0


@pytest.mark.parametrize("sampler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_samplers_built_from_the_shipped_scheduler_config_reach_the_data(sampler):
    """With the exact predictor of a one-point data set (eps(x_t) = (x_t - sqrt(a_t) x0) /
    sqrt(1 - a_t), or v = sqrt(a_t) eps - sqrt(1 - a_t) x0 for the shipped v-prediction model),
    any sampler built from the shipped config must land on x0, from its first step at pure noise
    (zero terminal SNR: a_T = 0). (A config that lets DDIM clip x0 estimates to [-1, 1] fails
    this: latents are not bounded by 1.)"""
    import json

    import diffusers

    config = json.loads((TINY_SD / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sampler).from_config(config)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0 = 1.5 * torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64)
    scheduler.set_timesteps(20)
    assert int(scheduler.timesteps[0]) == 999 and float(alphas_cumprod[999]) < 1e-6
    x = torch.randn(x0.shape, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        a = alphas_cumprod[int(t)]
        x_t = scheduler.scale_model_input(x, t)
        # scale_model_input returns the variance-preserving x_t for every scheduler
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        pred = a.sqrt() * eps - (1 - a).sqrt() * x0 if config["prediction_type"] == "v_prediction" else eps
        x = scheduler.step(pred, t, x).prev_sample
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
    # only what the prompt names counts (a bald person's hair colour is not drawn, so not named)
    assert attribute_accuracy([{"skin": "tan", "hair_colour": "red"}], [{"skin": "tan"}]) == 1.0


@pytest.mark.parametrize("domain", ["logos", "clothes"])
def test_brands_are_seeded_named_and_told_apart_by_their_design(domain):
    from freezeasguard.synthetic.brands import DESIGN_ATTRIBUTES, make_brands
    brands = make_brands(domain, 0)
    assert brands == make_brands(domain, 0) and brands != make_brands(domain, 1)
    assert len({b.name for b in brands}) == len(brands)
    need = 2 if domain == "logos" else 1
    for i in range(len(brands)):
        assert set(brands[i].attrs()) == set(DESIGN_ATTRIBUTES[domain])
        for j in range(i):
            differ = sum(brands[i].attrs()[k] != brands[j].attrs()[k] for k in DESIGN_ATTRIBUTES[domain])
            assert differ >= need


@pytest.mark.parametrize("domain", ["logos", "clothes"])
def test_brand_renders_show_the_design_and_captions_name_the_brand(domain):
    import random

    from freezeasguard.synthetic.brands import make_brands, render_brand
    brand = make_brands(domain, 3)[0]
    rng = random.Random(0)
    for _ in range(10):
        _, caption, attrs = render_brand(brand, rng)
        assert brand.name in caption
        assert all(attrs[k] == v for k, v in brand.attrs().items())
        if domain == "clothes":
            assert caption == f"a {brand.name} {attrs['kind']}"    # the garment varies and is named
        else:
            assert caption == f"a logo of {brand.name}"


@pytest.mark.parametrize("domain", ["logos", "clothes"])
def test_brand_judge_reads_real_blurred_and_vae_renders_and_rarely_names_a_stranger(domain):
    """What the innocent subjects' recognition rests on: real renders of every innocent subject of
    two worlds, sharp, blurred and through the shipped VAE, read as their brand's design; renders
    of the other brands and generic renders of other designs read as it at most 5% of the time."""
    from freezeasguard.experiment.synthetic_world import SyntheticWorld
    from freezeasguard.models.pipelines import load_model
    from freezeasguard.synthetic.classifiers import blurred_copies, vae_round_trip
    vae = load_model(TINY_SD).vae
    for seed in (0, 5):
        world = SyntheticWorld(seed)
        judge = world.attribute_judge(domain)
        for brand in world.brands[domain][:4]:
            _, expected, real = world.innocent_subject_prompts(brand.name, 24, seed=4242)
            for images in (real, blurred_copies(real, 1, high=1.5), vae_round_trip(real, vae)):
                assert prompt_accuracy(judge.predict(images), expected) >= 0.95, brand
            assert world.brand_false_positives(domain, brand.name, 64) <= 0.05, brand
