"""The experiment runner: methods x ratios x subjects x seeds, every stage resumable (its settings:
config.py).

Each stage writes its outputs and then a done-marker (``.done.json`` holding its result); a
stage whose marker exists is never redone, and a killed stage restarts (fine-tunes and mask
learning resume from their own checkpoints). Results: results.json (long format, one number per
row), results.csv, results.md (laid out like the paper's Table 2: mean ± std over seeds),
image grids per method, the mask plot and a trade-off plot.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from freezeasguard.training.finetune import guarded_finetune
from freezeasguard.models.generate import generate_images, save_grid
from freezeasguard.io import atomic_write_json
from freezeasguard.attacks import recipe_chains, resolve_attack
from freezeasguard.training.lora import NoAllowedModules
from freezeasguard.methods import chain_uses_ratio, protect
from freezeasguard.outputs import mark_output, prepare_output_dir, write_image_folder
from freezeasguard.synthetic import TINY_SD
from freezeasguard.experiment.jobs import (attack_suffix, protection_groups, shorter_recipe,
                                          start_from_checkpoint)
from freezeasguard.experiment.config import ExperimentConfig, check_same_config
from freezeasguard.experiment.folder_world import FolderWorld
from freezeasguard.experiment.heldout import heldout_data, heldout_loss
from freezeasguard.experiment.loaded_model import LoadedModel, StartingModels
from freezeasguard.experiment.report import write_report
from freezeasguard.experiment.timings import write_timings
from freezeasguard.experiment.workers import run_jobs_in_processes, start_worker_server
from freezeasguard.experiment.synthetic_world import SyntheticWorld
from freezeasguard.training.data import neutral_caption

logger = logging.getLogger(__name__)

# the illegal metrics also measured with "a person" for the name (as <metric>_unnamed)
NAME_BINDING_METRICS = ("identity_recognition", "identity_match")


def group_tag(subjects: tuple[str, ...]) -> str:
    """A user's subjects in stage and folder names: the one subject's name ("Sara Belfa"), or
    the first and how many more ("Sara Belfa+9")."""
    if not subjects:
        return ""
    return subjects[0] if len(subjects) == 1 else f"{subjects[0]}+{len(subjects) - 1}"


# ---- the runner ------------------------------------------------------------------------------
class Runner:
    def __init__(self, cfg: ExperimentConfig, world=None):
        self.cfg = cfg
        inputs = {"model": cfg.model, "people_data": cfg.people_data, "innocent_data": list(cfg.innocent_data.values())}
        self.root = prepare_output_dir(cfg.out, "experiment", inputs, resume=True)
        self.root.mkdir(parents=True, exist_ok=True)
        check_same_config(self.root, cfg)
        mark_output(self.root, "experiment")
        if world is None and cfg.people_data:
            missing = [d for d in cfg.innocent if d not in cfg.innocent_data]
            if missing:
                raise ValueError(f"innocent domains {missing} have no folder in innocent_data")
            world = FolderWorld(cfg.people_data, cfg.innocent_data, cfg.mask_images, cfg.clip_weights,
                                cfg.fid_features, face_identity=cfg.face_identity, fid_inception=cfg.fid_inception,
                                topiq_fr=cfg.topiq_fr)
        self._own_world = world is None
        self.world = world or SyntheticWorld(cfg.cast_seed, cfg.world_cast_size())
        self.subjects = cfg.subjects or self.world.subjects(cfg.n_people())
        if len(self.subjects) < cfg.n_people():
            raise ValueError(f"the people data has {len(self.subjects)} subjects; {cfg.n_people()} are needed "
                             f"(n_subjects, people_per_forger)")
        for s in self.subjects:
            self.world.check_subject(s)
        k = cfg.people_per_forger
        # each illegal user's people, fine-tuned together (the paper's protocol: several at once)
        self.forgers = [tuple(self.subjects[i:i + k]) for i in range(0, len(self.subjects), k)]
        if cfg.model is None:
            self.model = TINY_SD
        else:
            self.model = Path(cfg.model)
        self.timings: dict[str, float] = {}
        self.loaded = LoadedModel()      # the model being evaluated, loaded once
        self.starting = StartingModels()     # the models fine-tunes start from, read once

    # stage bookkeeping
    def stage(self, name: str, fn, valid=None):
        """``fn()``'s result, from its done-marker when the stage ran before. ``valid(result)`` says
        whether what the stage wrote besides its marker is still there: a run's markers alone (the
        small state experiments/run_paper.sh keeps in git between machines) resume it, and a stage
        whose files are gone is run again (data and fine-tunes are deterministic)."""
        marker = self.root / "stages" / f"{name}.done.json"
        if marker.exists():
            result = json.loads(marker.read_text())["result"]
            if valid is None or valid(result):
                return result
        t = time.time()
        result = fn()
        self.timings[name] = time.time() - t
        atomic_write_json(marker, {"result": result, "seconds": time.time() - t})
        return result

    def data(self, domain: str, split: str, subjects: tuple[str, ...] = (), n: int | None = None) -> Path:
        """A domain's split as an image folder: the named subjects' images (n each), or the whole
        domain (people: every illegal subject)."""
        default_n = self.cfg.mask_images if split == "mask" else self.cfg.finetune_images
        n = n or default_n
        name = f"{domain}-{group_tag(subjects) or 'all'}-{split}" + (f"-n{n}" if n != default_n else "")
        name = name.replace(" ", "_")
        path = self.root / "data" / name
        chosen = list(subjects) if subjects else (self.subjects if domain == "people" else None)
        self.stage(f"data-{name}", lambda: str(self.world.export(path, domain, n, split, chosen)),
                   valid=lambda _: (path / "metadata.jsonl").exists())
        return path

    def protection(self, method: str, ratio: float):
        """The method's output for this ratio (cached under protect/ by the registry)."""
        innocent = [self.data(d, "mask") for d in self.cfg.innocent]
        if self.cfg.mask_generic_people:
            innocent.append(self.data("generic-people", "mask"))
        return protect(method, self.model, self.data("people", "mask"), innocent, self.subjects, ratio,
                       self.root / "protect", self.cfg, device="auto")

    def finetune(self, method: str, ratio: float, seed: int, domain: str, subjects: tuple[str, ...],
                 attack: str = "default") -> tuple[Path, dict]:
        """One user's fine-tune under the method, with the attack's recipe, on its subjects together
        (their images pooled, the steps times their number: each gets a one-subject run's exposure).
        An attack with no module left to train (a targeted LoRA on frozen modules) leaves the user
        the starting model: returned as it is, with the reason."""
        recipe = resolve_attack(attack, self.cfg.attack_recipes)
        out = self.finetune_dir(method, ratio, seed, domain, subjects, attack)
        shorter = shorter_recipe(attack, self.cfg.attacks, self.cfg.attack_recipes)

        def run():
            self.loaded.drop()          # a fine-tune needs the memory an idle pipeline holds
            if shorter is not None:     # its first steps are the shorter recipe's: start from its checkpoint
                self.finetune(method, ratio, seed, domain, subjects, shorter)
                start_from_checkpoint(self.finetune_dir(method, ratio, seed, domain, subjects, shorter), out)
            chosen = self.protection(method, ratio)
            model, kwargs = chosen.model or self.model, chosen.finetune_kwargs()
            steps = self.cfg.finetune_steps * max(1, len(subjects))
            cfg = recipe.finetune_config(self.cfg.finetune_lr, steps, self.cfg.finetune_batch, seed,
                                         checkpoint_every=25)
            data = self.data(domain, "finetune", subjects, recipe.images(self.cfg.finetune_images))
            prior = self.class_images(model) if recipe.prior_weight else None
            try:
                r = guarded_finetune(model, data, out, cfg, resume=True, lora=recipe.lora(), prior_data=prior,
                                     lora_as_attacker=True, components=self.starting.copy_of(model), **kwargs)
            except NoAllowedModules as exc:
                logger.warning("attack %s under %s: %s; the user keeps the starting model", attack, method, exc)
                return {"skipped": str(exc), "model": str(model), "frozen_tensors": None,
                        "frozen_param_fraction": None, "final_loss": None}
            return {"frozen_tensors": r.frozen_tensors, "frozen_param_fraction": r.frozen_param_fraction,
                    "final_loss": r.history[-1]["loss_data"] if r.history else None}
        info = self.stage(f"finetune-{out.name}", run,
                          valid=lambda r: bool(r.get("skipped")) or (out / "freezeasguard_manifest.json").exists())
        return (Path(info["model"]) if info.get("skipped") else out), info

    def finetune_dir(self, method: str, ratio: float, seed: int, domain: str, subjects: tuple[str, ...],
                     attack: str) -> Path:
        tag = f"{method}-{ratio:g}-s{seed}-{domain}-{group_tag(subjects)}".replace(" ", "_").rstrip("-")
        return self.root / "finetunes" / (tag + attack_suffix(attack))

    def class_images(self, model: Path) -> Path:
        """DreamBooth's prior images: the starting model's own samples of the class prompt."""
        name = "class-" + hashlib.blake2b(str(Path(model).resolve()).encode(), digest_size=6).hexdigest()
        path = self.root / "data" / name

        def run():
            n = self.cfg.finetune_images
            images = generate_images(self.loaded.get(model), [self.cfg.attack_class_prompt] * n,
                                     steps=self.cfg.generate_steps, seed=777, guidance=self.cfg.guidance)
            rows = [{"file_name": f"{i:05d}.png", "text": self.cfg.attack_class_prompt} for i in range(n)]
            return str(write_image_folder(path, images, rows, "experiment", overwrite=True))
        self.stage(f"data-{name}", run, valid=lambda _: (path / "metadata.jsonl").exists())
        return path

    def generate(self, model_dir: Path, prompts: list[str], seed: int, out: Path):

        def run():
            images = generate_images(self.loaded.get(model_dir), prompts, steps=self.cfg.generate_steps, seed=seed * 1000,
                                     guidance=self.cfg.guidance)
            out.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images):
                im.save(out / f"{i:03d}.png")
            save_grid(images, out / "grid.png")
            return len(images)
        self.stage(f"generate-{out.relative_to(self.root)}".replace("/", "_"), run,
                   valid=lambda n: all((out / f"{i:03d}.png").exists() for i in range(n)))
        return [Image.open(out / f"{i:03d}.png").convert("RGB") for i in range(len(prompts))]

    # ---- evaluation of one fine-tuned model -------------------------------------------------
    @staticmethod
    def people_tag(method, ratio, seed, subject, attack) -> str:
        """How one person's evaluation of a fine-tune is named (stages, image folders)."""
        return f"{method}-{ratio:g}-s{seed}-{subject}".replace(" ", "_") + attack_suffix(attack)

    @staticmethod
    def innocent_tag(method, ratio, seed, domain, attack) -> str:
        return f"{method}-{ratio:g}-s{seed}-{domain}" + attack_suffix(attack)

    def eval_people(self, model_dir, method, ratio, seed, subject, attack: str = "default") -> list[dict]:
        tag = self.people_tag(method, ratio, seed, subject, attack)

        def run():
            prompts, real = self.world.people_prompts(subject, self.cfg.eval_images, seed)
            images = self.generate(model_dir, prompts, seed, self.root / "images" / tag)
            loss = heldout_loss(model_dir, self.world, subject, seed, self.root / "data", self.cfg.heldout_draws,
                                self.loaded.get(model_dir), self.cfg.heldout_images)
            return self.world.score_people(images, subject, real) + [{"metric": "heldout_loss", "value": loss}]
        rows = self.stage(f"eval-{tag}", run)

        def run_unnamed():
            """Name binding: the same prompts and seeds with "a person" for the name. A fine-tune
            that learned the face without binding it to the name draws it here too."""
            prompts, real = self.world.people_prompts(subject, self.cfg.eval_images, seed)
            unnamed = [neutral_caption(p, subject, "a person") for p in prompts]
            if None in unnamed:          # a caption without the name: nothing to replace
                return []
            images = self.generate(model_dir, unnamed, seed, self.root / "images" / f"{tag}-unnamed")
            return [{"metric": r["metric"] + "_unnamed", "value": r["value"]}
                    for r in self.world.score_people(images, subject, real) if r["metric"] in NAME_BINDING_METRICS]
        rows = rows + self.stage(f"eval-unnamed-{tag}", run_unnamed)
        return [{"method": method, "ratio": ratio, "attack": attack, "seed": seed, "subject": subject,
                 "domain": "people", **r} for r in rows]

    def eval_innocent(self, model_dir, method, ratio, seed, domain, attack: str = "default",
                      subjects: tuple[str, ...] = ()) -> list[dict]:
        """An innocent user's model: each of its innocent subjects (where the world has them: the
        brands the user fine-tuned on), judged on its own, and the domain's attribute prompts (what
        the rest of the domain still draws)."""
        tag = self.innocent_tag(method, ratio, seed, domain, attack)

        def run():
            prompts, attrs, real = self.world.innocent_prompts(domain, self.cfg.eval_images, seed)
            images = self.generate(model_dir, prompts, seed, self.root / "images" / tag)
            return self.world.score_innocent(domain, images, prompts, attrs, real)
        rows = [{**r, "subject": group_tag(subjects) or None} for r in self.stage(f"eval-{tag}", run)]
        for subject in reversed(subjects):
            subject_tag = f"{tag}-{subject}".replace(" ", "_")

            def run_subject(subject=subject, subject_tag=subject_tag):
                prompts, expected, _ = self.world.innocent_subject_prompts(subject, self.cfg.eval_images, seed)
                images = self.generate(model_dir, prompts, seed, self.root / "images" / subject_tag)
                return self.world.score_innocent_subject(domain, images, expected)
            rows = [{**r, "subject": subject} for r in self.stage(f"eval-{subject_tag}", run_subject)] + rows
        return [{"method": method, "ratio": ratio, "attack": attack, "seed": seed, "domain": domain, **r} for r in rows]

    def innocent_user(self, domain: str) -> tuple[str, ...]:
        """The innocent user's subjects in this domain, fine-tuned together, where the world has
        them (the built-in one); none: the user fine-tunes on the domain's data."""
        if not hasattr(self.world, "innocent_subjects"):
            return ()
        return tuple(self.world.innocent_subjects(domain, self.cfg.innocent_subjects_per_user()))

    def sanity(self) -> dict:
        """The judges on real data, and (where the world can say) the untouched model's prior."""
        out = dict(self.stage("sanity", lambda: self.world.sanity(self.subjects, self.cfg.innocent)))
        if hasattr(self.world, "generic_people_prompts"):
            def prior():
                prompts, expected = self.world.generic_people_prompts(self.cfg.eval_images * 2, seed=0)
                images = self.generate(self.model, prompts, 0, self.root / "images" / "pretrained-generic-people")
                return self.world.score_traits(images, expected)
            out["prior_trait_accuracy"] = self.stage("prior", prior)
        return out

    def add_elapsed(self, seconds: float) -> float:
        """The experiment's time over all its runs (a resumed run reuses finished stages, so its
        own time alone would understate what the results cost)."""
        path = self.root / "elapsed.json"
        total = (json.loads(path.read_text())["seconds"] if path.exists() else 0.0) + seconds
        atomic_write_json(path, {"seconds": total})
        return total

    # ---- the whole experiment ---------------------------------------------------------------
    def run(self) -> list[dict]:
        t0 = time.time()
        cfg = self.cfg
        atomic_write_json(self.root / "config.json", asdict(cfg))
        if cfg.workers > 1 and self._own_world:
            start_worker_server()
        sanity = self.sanity()
        # the untouched model (recognition should be near zero), then one job per user fine-tune
        baseline = [("pretrained", 0.0, seed, "people", forger, "default") for seed in cfg.seeds
                    for forger in self.forgers]
        baseline += [("pretrained", 0.0, seed, domain, self.innocent_user(domain), "default") for seed in cfg.seeds
                     for domain in cfg.innocent]
        # a job runs a chain of recipes, each longer one continuing the one before (steps-x5 after default)
        chains = recipe_chains(cfg.attacks, cfg.attack_recipes)
        innocent_chains = chains if cfg.attack_innocent else [("default",)]
        jobs = []
        for method in cfg.methods:
            for ratio in (cfg.ratios if chain_uses_ratio(method) else [0.0]):
                for seed in cfg.seeds:
                    jobs += [(method, ratio, seed, "people", forger, chain) for chain in chains
                             for forger in self.forgers]
                    jobs += [(method, ratio, seed, domain, self.innocent_user(domain), chain)
                             for chain in innocent_chains for domain in cfg.innocent]
        if cfg.workers > 1 and self._own_world:
            self._prepare_shared(jobs)
            rows = run_jobs_in_processes(cfg, baseline + jobs, protection_groups(jobs), Runner)
        else:
            if cfg.workers > 1:
                logger.warning("workers > 1 needs the runner to build its own world; running jobs one by one")
            rows = [r for job in baseline + jobs for r in self.run_job(*job)]
        rows += self.release_priors(sanity)
        write_report(self.root, rows, sanity, self.subjects, cfg, self.add_elapsed(time.time() - t0))
        write_timings(self.root)
        return rows

    def release_priors(self, sanity: dict) -> list[dict]:
        """What each method's release draws untouched: the prior's trait accuracy (generic people,
        as sanity measures the base's) of the model a method hands users, for the methods that
        change the model (uce, imma, immunised releases); the others release the base itself."""
        if "prior_trait_accuracy" not in sanity:
            return []
        rows = []
        for method in ["pretrained"] + list(self.cfg.methods):
            for ratio in (self.cfg.ratios if method != "pretrained" and chain_uses_ratio(method) else [0.0]):
                model = None if method == "pretrained" else self.protection(method, ratio).model
                value = sanity["prior_trait_accuracy"] if model is None else self.prior_of(Path(model))
                rows.append({"method": method, "ratio": ratio, "attack": "default", "seed": 0, "subject": None,
                             "domain": "release", "metric": "prior_trait_accuracy", "value": value})
        return rows

    def prior_of(self, model: Path) -> float:
        name = "prior-" + hashlib.blake2b(str(model.resolve()).encode(), digest_size=6).hexdigest()

        def prior():
            prompts, expected = self.world.generic_people_prompts(self.cfg.eval_images * 2, seed=0)
            images = self.generate(model, prompts, 0, self.root / "images" / f"{name}-generic-people")
            return self.world.score_traits(images, expected)
        return self.stage(name, prior)

    def run_job(self, method: str, ratio: float, seed: int, domain: str, subjects: tuple[str, ...],
                attack: str | tuple[str, ...] = "default") -> list[dict]:
        """One user's fine-tune on its subjects with the attack's recipe and its evaluation, each
        subject judged on its own: the illegal user (people) or an innocent one; method
        "pretrained" evaluates the untouched model. A tuple of recipes is a chain
        (recipe_chains), run in order in this process."""
        if isinstance(attack, tuple):
            return [r for a in attack for r in self.run_job(method, ratio, seed, domain, subjects, a)]
        if method == "pretrained":
            if domain == "people":
                return [r for s in subjects for r in self.eval_people(self.model, method, ratio, seed, s)]
            return self.eval_innocent(self.model, method, ratio, seed, domain, subjects=subjects)
        done = self.finished_fine_tune(method, ratio, seed, domain, subjects, attack)
        ft, info = (self.finetune_dir(method, ratio, seed, domain, subjects, attack), done) if done is not None else \
            self.finetune(method, ratio, seed, domain, subjects, attack)
        if domain == "people":
            rows = [] if info.get("skipped") else [
                {"method": method, "ratio": ratio, "attack": attack, "seed": seed, "subject": group_tag(subjects),
                 "domain": domain, "metric": m, "value": info[m]} for m in ("frozen_param_fraction", "frozen_tensors")]
            return rows + [r for s in subjects for r in self.eval_people(ft, method, ratio, seed, s, attack)]
        return self.eval_innocent(ft, method, ratio, seed, domain, attack, subjects)

    def finished_fine_tune(self, method, ratio, seed, domain, subjects, attack) -> dict | None:
        """The fine-tune's recorded result when it and every evaluation of it are done (its model
        need not be on disk: nothing reads it again), else None. A chain's longer recipe that is
        not done yet asks for its shorter one's checkpoint, so the shorter one counts as done only
        when the longer ones are too."""
        out = self.finetune_dir(method, ratio, seed, domain, subjects, attack)
        names = [f"finetune-{out.name}"]
        if domain == "people":
            for s in subjects:
                tag = self.people_tag(method, ratio, seed, s, attack)
                names += [f"eval-{tag}", f"eval-unnamed-{tag}"]
        else:
            tag = self.innocent_tag(method, ratio, seed, domain, attack)
            names += [f"eval-{tag}"] + [f"eval-{tag}-{s}".replace(" ", "_") for s in subjects]
        recipes = self.cfg.attacks if domain == "people" or self.cfg.attack_innocent else ["default"]
        for longer in recipes:
            if longer != attack and shorter_recipe(longer, recipes, self.cfg.attack_recipes) == attack:
                names.append(f"finetune-{self.finetune_dir(method, ratio, seed, domain, subjects, longer).name}")
        stages = self.root / "stages"
        if not all((stages / f"{n}.done.json").exists() for n in names):
            return None
        return json.loads((stages / f"{names[0]}.done.json").read_text())["result"]

    def _prepare_shared(self, jobs):
        """What several jobs read, made once before they run side by side (no two processes write
        the same file): data exports, held-out sets, judges. Protections are made by the workers
        (run_jobs_in_processes), each group by one process."""
        self.data("people", "mask")
        for domain in self.cfg.innocent + (["generic-people"] if self.cfg.mask_generic_people else []):
            self.data(domain, "mask")
        for _, _, _, domain, subjects, chain in jobs:
            for attack in chain:
                self.data(domain, "finetune", subjects,
                          resolve_attack(attack, self.cfg.attack_recipes).images(self.cfg.finetune_images))
        for subject in self.subjects:
            heldout_data(self.world, subject, self.root / "data", self.cfg.heldout_images)
        if any(resolve_attack(a, self.cfg.attack_recipes).prior_weight for a in self.cfg.attacks):
            self.class_images(self.model)    # methods that edit the model (uce, imma) make theirs in their job
        if hasattr(self.world, "recogniser"):      # trains and caches the judge for a new cast, once
            self.world.recogniser()
