"""Real-model metrics on tiny stand-ins built in code: FID/KID against our own Frechet distance,
CLIP score against torchmetrics' CLIPScore, and clear errors for missing weights."""
import logging

import pytest
import torch

pytest.importorskip("torchmetrics", reason="the eval extra (torchmetrics) is not installed")

from freezeasguard.metrics.basic import frechet_distance  # noqa: E402
from freezeasguard.metrics.real import clip_scores, fid_and_kid, load_clip  # noqa: E402


class RandomFeatures(torch.nn.Module):
    """A fixed random conv net: uint8 images -> 8 features (a stand-in for Inception)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Tanh(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x):
        return self.net(x.float() / 255)


def _images(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 200 + shift).clamp(0, 255).to(torch.uint8)


def test_fid_matches_the_closed_form_and_grows_with_a_shift(caplog):
    ext = RandomFeatures()
    real = _images(64, 0)
    with caplog.at_level(logging.WARNING):
        same = fid_and_kid(real, real, ext, kid_subset=32)
    assert "biased" in caplog.text and not same["fid_reliable"]
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-3
    small, big = fid_and_kid(real, _images(64, 1, 10), ext, 32), fid_and_kid(real, _images(64, 1, 50), ext, 32)
    assert 0 < small["fid"] < big["fid"] and small["kid"] < big["kid"]
    with torch.no_grad():
        expected = frechet_distance(ext(real), ext(_images(64, 1, 50)))
    assert big["fid"] == pytest.approx(expected, rel=1e-3)


def _tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from freezeasguard.models.families.tiny import build_offline_tokenizer
    tok = build_offline_tokenizer(model_max_length=16)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_score_matches_the_full_forward(tmp_path):
    """Our score (get_image/text_features) against CLIPModel.forward's own projected embeddings.
    (torchmetrics 1.9's CLIPScore cannot serve as the reference: with transformers 5 its
    get_image_features returns an output object and CLIPScore fails on it.)"""
    from PIL import Image
    model, proc = load_clip(_tiny_clip(tmp_path))
    images = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 240))]
    prompts = ["a red circle", "a green square", "a blue star", "a white hat"]
    ours = clip_scores(images, prompts, model, proc, batch_size=3)
    assert len(ours) == 4 and all(0 <= s <= 100 for s in ours)
    with torch.no_grad():
        out = model(**proc(text=prompts, images=images, return_tensors="pt", padding=True))
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert ours == pytest.approx((100 * cos.clamp_min(0)).tolist(), abs=1e-4)
    assert len(set(round(s, 3) for s in ours)) > 1      # the pairs differ
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        clip_scores(images, prompts[:3], model, proc)


def test_missing_clip_folder_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip-weights .*nothing is downloaded"):
        load_clip(tmp_path / "nope")


@pytest.mark.slow
def test_runner_on_folders_with_real_metrics(tiny_sd, tmp_path):
    """The runner on an FF25-style people folder and a saved HF dataset of logos, scored with a
    local CLIP folder (CLIP score) and the same folder as FID feature space."""
    import datasets
    from PIL import Image

    from freezeasguard.experiment.config import ExperimentConfig
    from freezeasguard.experiment.runner import Runner
    from freezeasguard.toydata import make_logos, make_people
    ff = tmp_path / "ff25"
    rows = []
    for name, seed in (("Mara Quell", 0), ("Ode Varn", 1)):
        folder = make_people(ff / name.replace(" ", "_"), name, 6, 16, seed)
        for line in (folder / "metadata.jsonl").read_text().splitlines():
            r = __import__("json").loads(line)
            rows.append(f"{name.replace(' ', '_')}/{r['file_name']},{r['text']},{name}")
        (folder / "metadata.jsonl").unlink()
    (ff / "metadata.csv").write_text("file_name,text,name\n" + "\n".join(rows) + "\n")
    logos = make_logos(tmp_path / "logo-folder", 8, 16, 1)
    meta = [__import__("json").loads(line) for line in (logos / "metadata.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_dict({"image": [Image.open(logos / m["file_name"]) for m in meta],
                                     "text": [m["text"] for m in meta]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "logo-ds"))
    clip = _tiny_clip(tmp_path)
    from safetensors.torch import save_file

    from freezeasguard.metrics.nets.topiq import TopiqFR
    save_file({k: v for k, v in TopiqFR().state_dict().items() if "num_batches" not in k}, tmp_path / "topiq.safetensors")
    cfg = ExperimentConfig(out=str(tmp_path / "exp"), model=str(tiny_sd), methods=["full"], seeds=[0],
                           people_data=str(ff), innocent_data={"logos": str(tmp_path / "logo-ds")},
                           clip_weights=str(clip), fid_features=str(clip), topiq_fr=str(tmp_path / "topiq.safetensors"),
                           mask_images=2, finetune_images=4,
                           eval_images=4, finetune_steps=1, finetune_batch=2, generate_steps=2)
    rows = Runner(cfg).run()
    metrics = {(r["method"], r["domain"], r["metric"]) for r in rows}
    assert {("full", "people", "fid_features"), ("full", "people", "kid_features"), ("full", "people", "topiq_fr"),
            ("full", "logos", "clip_score"), ("full", "logos", "topiq_fr")} <= metrics
    assert all(r["subject"] == "Mara Quell" for r in rows if r["domain"] == "people")
    for r in rows:
        if r["metric"] == "clip_score":
            assert 0 <= r["value"] <= 100
        if r["metric"] == "fid_features":
            assert r["value"] > 0
    table = (tmp_path / "exp" / "results.md").read_text()
    assert "FID (fid_features) ↑" in table and "Logos CLIP score ↑" in table and "clip_score_real/logos" in table
    assert "| TOPIQ-FR ↓ |" in table and "Logos TOPIQ-FR ↑" in table


def test_score_command_on_folders(tmp_path, capsys):
    """freezeasguard score: FID of a folder against itself is ~0 and against other images is not;
    the CLIP score equals clip_scores' mean; missing inputs and corrupt images are named."""
    import json

    from PIL import Image

    from freezeasguard.cli import main
    clip = _tiny_clip(tmp_path)
    g = torch.Generator().manual_seed(0)
    gen, real, other = tmp_path / "gen", tmp_path / "real", tmp_path / "other"
    prompts = ["a red circle", "a green square", "a blue star", "a white hat", "a black scarf", "a pink logo"]
    index = []
    for folder, scale in ((gen, 1.0), (real, 1.0), (other, 0.4)):
        (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(prompts):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(gen / f"{i}.png")
        Image.fromarray(arr).save(real / "sub" / f"{i}.png")        # nested, as FF25 person folders
        Image.fromarray((arr * 0.4).astype("uint8")).save(other / f"{i}.png")
        index.append({"file": f"{i}.png", "prompt": p, "seed": i})
    (gen / "prompts.json").write_text(json.dumps(index))

    assert main(["score", str(gen), "--real", str(real), "--fid-features", str(clip), "--clip-weights", str(clip),
                 "--out", str(tmp_path / "s.json")]) == 0
    same = json.loads((tmp_path / "s.json").read_text())
    assert json.loads(capsys.readouterr().out) == same
    assert main(["score", str(gen), "--real", str(other), "--fid-features", str(clip)]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert abs(same["fid"]) < 1e-3 < diff["fid"] and same["images"] == 6 and same["fid_feature_space"] == "clip"
    model, proc = load_clip(clip)
    images = [Image.open(gen / f"{i}.png").convert("RGB") for i in range(6)]
    assert same["clip_score"] == pytest.approx(sum(clip_scores(images, prompts, model, proc)) / 6, abs=1e-4)

    assert main(["score", str(gen), "--fid-features", str(clip)]) == 2
    assert "pass --real DIR" in capsys.readouterr().err
    assert main(["score", str(other), "--clip-weights", str(clip)]) == 2
    assert "needs each image's prompt" in capsys.readouterr().err
    (other / "broken.png").write_bytes(b"not a png")
    assert main(["score", str(gen), "--real", str(other), "--fid-features", str(clip)]) == 2
    assert "broken.png: not a readable image" in capsys.readouterr().err
