"""Every CLI command end to end on a tiny pipeline in a temp folder, as a user would run them."""
import json
import os
import subprocess
import sys

import pytest

from freezeasguard.cli import main


@pytest.fixture(scope="module")
def trained(tiny_sd, people, logos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    mask = tmp / "mask.safetensors"
    assert main(["learn", "--model", str(tiny_sd), "--illegal", str(people), "--innocent", str(logos),
                 "--innocent", str(logos), "--ratio", "0.3", "--out", str(mask), "--warm-start-steps", "2",
                 "--steps", "2", "--inner-steps", "2", "--batch-size", "2", "--user-lr", "1e-3",
                 "--device", "cpu"]) == 0
    return tmp, mask


def test_learn_writes_a_mask_and_prints_both_ratios(trained, capsys):
    tmp, mask = trained
    assert mask.exists() and (tmp / "mask.safetensors.work" / "learn_history.json").exists()
    assert main(["mask", "show", str(mask), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frozen_tensors"] == 206 and 0 < summary["param_fraction"] < 1


def test_mask_show_plot_and_exports(trained, capsys):
    tmp, mask = trained
    assert main(["mask", "show", str(mask), "--plot", str(tmp / "mask.png")]) == 0
    out = capsys.readouterr().out
    assert "206/686 tensors frozen" in out and "down_blocks.0" in out
    assert (tmp / "mask.png").stat().st_size > 1000
    assert main(["mask", "show", str(mask), "--export", "names"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == 206
    assert main(["mask", "show", str(mask), "--export", "regex"]) == 0
    import re
    rx = re.compile(capsys.readouterr().out.strip())
    assert all(rx.fullmatch(n) for n in names)


@pytest.mark.parametrize("scheme", [["--mask", "MASK"], ["--random-ratio", "0.3", "--seed", "1"], ["--full"]])
def test_finetune_then_verify(trained, tiny_sd, people, scheme, capsys):
    tmp, mask = trained
    scheme = [str(mask) if a == "MASK" else a for a in scheme]
    out = tmp / f"ft{len(scheme)}"
    assert main(["finetune", "--model", str(tiny_sd), "--data", str(people), "--out", str(out), *scheme,
                 "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]) == 0
    assert (out / "model_index.json").exists() and (out / "freezeasguard_manifest.json").exists()
    code = main(["verify", "--model", str(tiny_sd), "--mask", str(mask), "--candidate", str(out),
                 "--report", str(tmp / "report.json")])
    report = json.loads((tmp / "report.json").read_text())
    if scheme[0] == "--mask":
        assert code == 0 and report["compliant"]
    else:   # other schemes train tensors this mask freezes: the audit must catch it
        assert code == 1 and len(report["violations"]) > 0


def test_resuming_a_finished_finetune_leaves_it_and_says_so(tiny_sd, people, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(tiny_sd), "--data", str(people), "--out", str(out), "--full", "--steps", "2",
            "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]
    assert main(args) == 0
    weights = next(out.glob("unet/*.safetensors"))
    stamp, before = weights.stat().st_mtime_ns, weights.read_bytes()
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    said = capsys.readouterr().out
    assert "already complete" in said and "nan" not in said
    assert weights.stat().st_mtime_ns == stamp and weights.read_bytes() == before
    # asked for more steps than the finished run made: it trains (resuming from a checkpoint if any)
    more = args.copy()
    more[more.index("--steps") + 1] = "3"
    assert main(more + ["--resume"]) == 0
    assert "fine-tuned the denoiser" in capsys.readouterr().out and weights.read_bytes() != before


def test_verify_unusable_input_exits_2(trained, tiny_sd, tmp_path):
    tmp, mask = trained
    assert main(["verify", "--model", str(tiny_sd), "--mask", str(tmp_path / "none.safetensors"),
                 "--candidate", str(tiny_sd)]) == 2
    assert main(["verify", "--model", str(tmp_path / "no-model"), "--mask", str(mask),
                 "--candidate", str(tiny_sd)]) == 2


def test_bad_ratio_and_bad_data_are_clear_errors(tiny_sd, people, tmp_path, capsys):
    assert main(["finetune", "--model", str(tiny_sd), "--data", str(people), "--out", str(tmp_path / "x"),
                 "--random-ratio", "30", "--steps", "1", "--device", "cpu"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tiny_sd), "--data", str(tmp_path), "--out", str(tmp_path / "x"),
                 "--full", "--steps", "1", "--device", "cpu"]) == 2
    assert "metadata.jsonl" in capsys.readouterr().err


def test_generate_writes_images_and_a_grid(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of Mara Quell\na red circle logo\n")
    out = tmp_path / "imgs"
    assert main(["generate", "--model", str(tiny_sd), "--prompts", str(prompts), "--out", str(out),
                 "--steps", "2", "--num-images", "2", "--device", "cpu"]) == 0
    index = json.loads((out / "prompts.json").read_text())
    assert [e["prompt"] for e in index] == ["a photo of Mara Quell"] * 2 + ["a red circle logo"] * 2
    from PIL import Image
    assert Image.open(out / "grid.png").size == (2 * 16, 2 * 16)


def test_tiny_pipeline_and_help(tmp_path, capsys):
    assert main(["tiny-pipeline", "--out", str(tmp_path / "p"), "--layout", "mini"]) == 0
    from freezeasguard.models.pipelines import load_model
    c = load_model(tmp_path / "p")
    assert len(c.tokenizer) > 2 and c.resolution == 32
    for cmd in (["learn"], ["finetune"], ["verify"], ["generate"], ["mask", "show"], []):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    assert "freezing" in capsys.readouterr().out


def test_library_notices_are_switched_off_through_the_environment_unless_verbose(monkeypatch, capsys):
    for switch in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(switch, raising=False)
    assert main(["world", "cast"]) == 0
    assert os.environ["TRANSFORMERS_VERBOSITY"] == os.environ["DIFFUSERS_VERBOSITY"] == "error"
    for switch in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(switch)
    assert main(["--verbose", "world", "cast"]) == 0
    assert "TRANSFORMERS_VERBOSITY" not in os.environ and "DIFFUSERS_VERBOSITY" not in os.environ
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")        # a user's own choice is kept
    assert main(["world", "cast"]) == 0 and os.environ["TRANSFORMERS_VERBOSITY"] == "info"


@pytest.mark.slow
def test_both_libraries_read_their_verbosity_switch_when_first_imported():
    # what the CLI relies on instead of importing them (in a fresh process: here they are imported)
    code = ("import logging, diffusers.utils.logging as d, transformers.utils.logging as t; "
            "print(d.get_verbosity() == t.get_verbosity() == logging.ERROR)")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_world_export_feeds_the_loaders(tmp_path, capsys):
    from freezeasguard.training.data import load_image_captions
    from freezeasguard.synthetic.world import make_cast
    name = make_cast(0)[1].name
    assert main(["world", "export", "people", "--out", str(tmp_path / "p"), "-n", "3", "--subject", name]) == 0
    data = load_image_captions(tmp_path / "p", subject=name)
    assert len(data) == 3 and all(c.startswith(f"a photo of {name}") for c in data.captions)
    assert main(["world", "export", "clothes", "--out", str(tmp_path / "c"), "-n", "4"]) == 0
    assert len(load_image_captions(tmp_path / "c")) == 4
    assert main(["world", "cast"]) == 0
    assert name in capsys.readouterr().out


@pytest.mark.slow      # end to end: two protections and a fine-tune under them (.ci/run runs -m slow)
def test_protect_uce_then_saliency_and_finetune_under_it(tiny_sd, people, logos, tmp_path, capsys):
    """A user's path for a baseline chain: protect prints the model and mask to fine-tune; the
    guarded fine-tune of that model under that mask passes verify against the edited model."""
    out = tmp_path / "prot"
    assert main(["protect", "uce+saliency", "--model", str(tiny_sd), "--illegal", str(people), "--innocent", str(logos),
                 "--ratio", "0.2", "--out", str(out), "--saliency-batches", "1", "--batch-size", "2",
                 "--device", "cpu"]) == 0
    summary = json.loads((out / "protection.json").read_text())
    assert summary["subjects"] == ["Mara Quell"]          # read from the data's name column
    assert summary["model"].endswith("uce/model") and summary["mask"] == str(out / "mask.safetensors")
    assert "mask" in capsys.readouterr().out
    ft = tmp_path / "ft"
    assert main(["finetune", "--model", summary["model"], "--data", str(people), "--mask", summary["mask"],
                 "--out", str(ft), "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]) == 0
    assert main(["verify", "--model", summary["model"], "--mask", summary["mask"], "--candidate", str(ft)]) == 0
    # the mask was made for the edited model: against the original base it is refused
    assert main(["finetune", "--model", str(tiny_sd), "--data", str(people), "--mask", summary["mask"],
                 "--out", str(tmp_path / "ft2"), "--steps", "1", "--device", "cpu"]) != 0


def test_preset_checks_the_model_folder(tiny_sd, people, tmp_path, capsys):
    """--preset sd15 on the tiny pipeline is refused before any work, naming what differs."""
    code = main(["finetune", "--model", str(tiny_sd), "--preset", "sd15", "--data", str(people), "--full",
                 "--out", str(tmp_path / "ft"), "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "is not sd15" in err and "resolution 16 (preset sd15: 512)" in err
    assert not (tmp_path / "ft").exists()


def test_presets_match_real_configs(tmp_path):
    """Configs shaped like the real SD v1.5 and v2.1 folders pass their presets and fail the other."""
    import json as _json

    from freezeasguard.models.presets import PRESETS, PresetError, check_model
    for name, (sample, pred, width) in {"sd15": (64, "epsilon", 768), "sd21": (96, "v_prediction", 1024)}.items():
        root = tmp_path / name
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            (root / part).mkdir(parents=True)
        (root / "unet" / "config.json").write_text(_json.dumps({"sample_size": sample, "cross_attention_dim": width}))
        (root / "vae" / "config.json").write_text(_json.dumps({"block_out_channels": [128, 256, 512, 512]}))
        (root / "scheduler" / "scheduler_config.json").write_text(_json.dumps({"prediction_type": pred}))
        check_model(PRESETS[name], root)
        other = "sd21" if name == "sd15" else "sd15"
        with pytest.raises(PresetError, match=f"it looks like .*{name}"):
            check_model(PRESETS[other], root)


# the published configs of each family, as numbers (what the folder check reads; no download)
_FAMILY_FOLDERS = {
    "sdxl": ("StableDiffusionXLPipeline", "unet", {"sample_size": 128, "cross_attention_dim": 2048},
             {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "sample_size": 1024},
             {"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}),
    "sd35-medium": ("StableDiffusion3Pipeline", "transformer",
                    {"sample_size": 128, "joint_attention_dim": 4096, "num_layers": 24},
                    {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16, "sample_size": 1024},
                    {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
    "sd35-large": ("StableDiffusion3Pipeline", "transformer",
                   {"sample_size": 128, "joint_attention_dim": 4096, "num_layers": 38},
                   {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16, "sample_size": 1024},
                   {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
    "flux1-dev": ("FluxPipeline", "transformer", {"joint_attention_dim": 4096, "num_layers": 19, "guidance_embeds": True},
                  {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16, "sample_size": 1024},
                  {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True}),
    "flux1-schnell": ("FluxPipeline", "transformer",
                      {"joint_attention_dim": 4096, "num_layers": 19, "guidance_embeds": False},
                      {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16, "sample_size": 1024},
                      {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}),
}


@pytest.mark.parametrize("name", list(_FAMILY_FOLDERS))
def test_family_presets_pass_their_own_folders_and_name_the_right_one_for_another(name, tmp_path):
    import json as _json

    from freezeasguard.models.families import FAMILIES, family_of_pipeline_class
    from freezeasguard.models.presets import PRESETS, PresetError, check_model
    for key, (pipeline, folder, den, vae, sched) in _FAMILY_FOLDERS.items():
        root = tmp_path / key
        family = family_of_pipeline_class(pipeline)
        for part in [folder, "vae", "scheduler"] + [p for pair in FAMILIES[family.name].encoders for p in pair]:
            (root / part).mkdir(parents=True)
        (root / "model_index.json").write_text(_json.dumps({"_class_name": pipeline}))
        (root / folder / "config.json").write_text(_json.dumps(den))
        (root / "vae" / "config.json").write_text(_json.dumps(vae))
        (root / "scheduler" / "scheduler_config.json").write_text(_json.dumps(sched))
    check_model(PRESETS[name], tmp_path / name)
    for other in _FAMILY_FOLDERS:
        if other != name:
            with pytest.raises(PresetError, match=f"is not {name}: .*it looks like {other}"):
                check_model(PRESETS[name], tmp_path / other)


def test_a_preset_supplies_the_values_the_command_runs_with_unless_a_flag_is_typed():
    import argparse

    from freezeasguard.models.presets import Preset, apply_preset
    preset = Preset("x", "sd", 16, "epsilon", 32, settings={"finetune": {"lr": 3e-4, "steps": 7}})
    defaults = {"lr": 1e-5, "steps": 2000}
    args = argparse.Namespace(lr=1e-5, steps=50)          # steps typed by the user
    apply_preset(preset, "finetune", args, defaults)
    assert args.lr == 3e-4 and args.steps == 50


def test_demo_refuses_an_unknown_attack_before_running_anything(tmp_path, capsys):
    from freezeasguard.cli import main
    assert main(["demo", "--attacks", "lr-x10,lr-x99", "--out", str(tmp_path / "d")]) == 2
    assert "lr-x99" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
