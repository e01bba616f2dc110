"""The experiment runner: results in long format, and a killed run resumes without redoing stages."""
import json

import pytest

from freezeasguard.evaluate import experiment
from freezeasguard.evaluate.experiment import ExperimentConfig, Runner


def _cfg(out, model):
    return ExperimentConfig(out=str(out), model=str(model), seeds=[0], mask_images=4, finetune_images=4,
                            eval_images=2, warm_start_steps=2, mask_steps=1, inner_steps=1, mask_batch=2,
                            finetune_steps=2, finetune_batch=2, generate_steps=2)


def test_runner_resumes_without_redoing_finished_stages(tiny_sd, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path / "exp", tiny_sd)
    calls = []
    real = Runner.finetune

    def counting(self, method, ratio, seed, domain, subject):
        calls.append((method, domain))
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real(self, method, ratio, seed, domain, subject)

    monkeypatch.setattr(Runner, "finetune", counting)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg).run()
    done_before = {p.name for p in (tmp_path / "exp" / "stages").iterdir()}
    assert any(n.startswith("mask-learned") for n in done_before) is False   # learned comes last
    monkeypatch.setattr(Runner, "finetune", real)
    trained = []
    real_ft = experiment.Runner.stage

    def watch(self, name, fn):
        marker = self.root / "stages" / f"{name}.done.json"
        if not marker.exists() and name.startswith("finetune-"):
            trained.append(name)
        return real_ft(self, name, fn)

    monkeypatch.setattr(Runner, "stage", watch)
    rows = Runner(cfg).run()
    # 3 methods x (people + logos) = 6 fine-tunes; 3 were finished before the kill
    assert len(trained) == 3
    assert {r["method"] for r in rows} == {"pretrained", "full", "random", "learned"}
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved == rows
    for r in saved:
        assert set(r) == {"method", "ratio", "seed", "subject", "domain", "metric", "value"}
        if r["metric"] in ("identity_recognition", "prompt_accuracy"):
            assert 0 <= r["value"] <= 1
    assert "FreezeAsGuard-30%" in (tmp_path / "exp" / "results.md").read_text()
    assert (tmp_path / "exp" / "tradeoff.png").exists()


def test_unknown_settings_and_methods_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("methods: [full]\nfinetune_stepz: 3\n")
    with pytest.raises(ValueError, match="finetune_stepz"):
        ExperimentConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="unknown methods"):
        Runner(ExperimentConfig(out=str(tmp_path / "x"), methods=["magic"]))
