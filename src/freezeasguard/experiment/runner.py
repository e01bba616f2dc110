"""The experiment runner: methods x ratios x subjects x seeds, every stage resumable.

Each stage writes its outputs and then a done-marker (``.done.json`` holding its result); a
stage whose marker exists is never redone, and a killed stage restarts (fine-tunes and mask
learning resume from their own checkpoints). Results: results.json (long format, one number per
row), results.csv, results.md (laid out like the paper's Table 2: mean ± std over seeds),
image grids per method, the mask plot and a trade-off plot.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import time
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import yaml
from PIL import Image
from tqdm.auto import tqdm

from ..batches import Domain, DomainMix, weighted_loss
from ..data import EncodedData, load_image_captions
from ..diffusion import NoiseSchedule
from ..finetune import FinetuneConfig, guarded_finetune
from ..generate import generate_images, load_pipeline, save_grid
from ..io import atomic_write_json
from ..lora import LoraSettings, lora_base
from ..mask import BUDGETS, check_ratio
from ..methods import ProtectSettings, chain_uses_ratio, parse_chain, protect
from ..models import SDComponents, load_sd
from ..outputs import mark_output, prepare_output_dir
from ..settings import setting
from ..synthetic import TINY_SD
from .folder_world import FolderWorld
from .report import write_report
from .synthetic_world import SyntheticWorld

logger = logging.getLogger(__name__)


_PAPER_FINETUNE = FinetuneConfig()     # the illegal and innocent users' fine-tune defaults: the paper's


@dataclass
class ExperimentConfig(ProtectSettings):
    """One experiment; every field (these and the methods' settings, ProtectSettings) is a key of
    its YAML file. ``preset: demo`` takes the demo's values for every key the file does not set."""
    out: str = setting("experiment-out", "output folder")
    preset: str | None = setting(None, "demo: the built-in demo's settings (PRESETS) for keys not set here")
    model: str | None = setting(None, "base pipeline folder; none: the shipped tiny pipeline")
    methods: list[str] = setting(["full", "random", "learned"], "methods or chains (uce+learned)")
    ratios: list[float] = setting([0.3], "freezing ratios, for methods that freeze")
    subjects: list[str] | None = setting(None, "illegal subjects; none: the first n_subjects of the cast/data")
    n_subjects: int = setting(1, "how many subjects when subjects is not given")
    innocent: list[str] = setting(["logos"], "innocent domains")
    seeds: list[int] = setting([0, 1, 2], "fine-tuning and generation seeds")
    cast_seed: int = setting(0, "which cast of the built-in world")
    mask_images: int = setting(48, "images per subject and innocent domain for the protection methods")
    finetune_images: int = setting(48, "images per subject / innocent domain for the users' fine-tunes")
    eval_images: int = setting(16, "images generated per subject / domain and seed")
    finetune_steps: int = setting(_PAPER_FINETUNE.steps, "users' fine-tuning steps")
    finetune_batch: int = setting(_PAPER_FINETUNE.batch_size, "users' fine-tuning batch")
    finetune_lr: float = setting(_PAPER_FINETUNE.lr, "users' AdamW learning rate")
    generate_steps: int = setting(50, "PNDM steps per generated image (the paper's 50)")
    guidance: float = setting(7.5, "classifier-free guidance scale")
    attack: str = setting("full", "how the users fine-tune: full (every weight the method leaves trainable) or lora "
                                  "(a LoRA on the modules it leaves trainable)", choices=("full", "lora"))
    attack_lora_rank: int = setting(8, "attack lora: the LoRA's rank")
    # real data instead of the synthetic world (see experiment/folder_world.py)
    people_data: str | None = setting(None, "FF25-style folder: metadata with file_name, text, name")
    innocent_data: dict[str, str] = setting({}, "domain -> image folder or saved dataset")
    clip_weights: str | None = setting(None, "local CLIP folder: CLIP score of innocent images")
    fid_inception: str | None = setting(None, "FID Inception-v3 weights (.safetensors): the paper's FID and KID")
    fid_features: str | None = setting(None, "or a local vision model folder: FID/KID in its feature space")
    topiq_fr: str | None = setting(None, "TOPIQ-FR weights (.safetensors, converted from pyiqa's)")
    face_identity: bool = setting(False, "also score face identity with dlib (the faces extra)")
    workers: int = setting(1, "processes for the jobs, one thread each (on a small CPU model 2 x 1 thread beats "
                              "1 x 2 threads)")

    def __post_init__(self):
        """Every setting is checked here, before any work: a bad value fails at load, not after a
        minute of fine-tuning."""
        for m in self.methods:
            parse_chain(m)
        for r in self.ratios:
            check_ratio(r, "ratios")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.attack not in ("full", "lora"):
            raise ValueError(f"attack {self.attack!r}: use full or lora")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget {self.budget!r}: use one of {BUDGETS}")
        positive = ("mask_images", "finetune_images", "eval_images", "finetune_batch", "generate_steps", "workers",
                    "n_subjects", "mask_batch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("finetune_steps", "warm_start_steps", "mask_steps", "inner_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("finetune_lr", "warm_start_lr", "user_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.people_data:
            unknown = [d for d in self.innocent if d not in ("logos", "clothes")]
            if unknown:
                raise ValueError(f"innocent {unknown}: the built-in world has logos and clothes; for other domains "
                                 f"set people_data and innocent_data")

    @classmethod
    def from_yaml(cls, path, **overrides) -> "ExperimentConfig":
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: an experiment config is a mapping of settings (key: value), "
                             f"got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        if raw.get("preset") is not None:
            if raw["preset"] not in PRESETS:
                raise ValueError(f"{path}: preset {raw['preset']!r} is unknown; presets: {', '.join(PRESETS)}")
            raw = {**PRESETS[raw["preset"]], **raw}
        hints = typing.get_type_hints(cls)
        return cls(**{k: coerce_setting(k, v, hints[k], path) for k, v in raw.items()})


def coerce_setting(name: str, value, hint, source="config"):
    """``value`` as the field's type, or a ValueError naming the setting. YAML reads ``1e-3``
    (no dot) as a string, so numeric strings become numbers; anything else of the wrong kind
    is refused here rather than failing deep inside a worker."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_setting(name, value, inner[0], source) if len(inner) == 1 else value
    if origin is list:
        if not isinstance(value, list):
            value = [value]     # `seeds: 0` means one seed
        return [coerce_setting(f"{name}[{i}]", v, args[0], source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{source}: setting {name} must be a mapping, got {value!r}")
        return {coerce_setting(name, k, args[0], source): coerce_setting(f"{name}.{k}", v, args[1], source)
                for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if hint is float:
                return float(value)
            if float(value).is_integer():
                return int(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ValueError(f"{source}: setting {name} must be {hint.__name__}, got {value!r}")


# The demo's settings: the experiment config's fields it sets (every other field keeps its
# default). Mask learning at a CPU budget: 100 warm-start steps and 30 mask updates of 5 inner
# steps at batch 4 (the paper's SD budget, 200 / 100 x 10 at batch 16, takes hours on a CPU).
DEMO = dict(warm_start_steps=100, warm_start_lr=1e-4, warm_start_batch=4, mask_steps=30, inner_steps=5, mask_batch=4,
            user_lr=1e-4, finetune_steps=100, finetune_batch=4, finetune_lr=1e-4, generate_steps=20,
            # guidance 3: at SD's 7.5 the tiny model's samples come out over-saturated
            guidance=3.0,
            # Adam moves each weight ~lr per step: 50 IMMA steps of 1e-5 leave the tiny model as it was
            imma_lr=1e-4)
PRESETS = {"demo": DEMO}

# settings that may change between a run and its resume (they do not change any result)
RESUMABLE_SETTINGS = ("out", "workers")


def check_same_config(root: Path, cfg: ExperimentConfig):
    """A resumed experiment must have the settings of the run that made the folder: its finished
    stages would otherwise be mixed with stages made under other settings."""
    path = root / "config.json"
    if not path.exists():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(asdict(cfg)))
    differ = sorted(k for k in set(before) | set(now)
                    if k not in RESUMABLE_SETTINGS and before.get(k) != now.get(k))
    if differ:
        raise ValueError(f"{root} holds an experiment run with other settings ({', '.join(differ)}); its finished "
                         f"stages would be mixed with these. Use another out folder.")


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
        self.world = world or SyntheticWorld(cfg.cast_seed)
        self.subjects = cfg.subjects or self.world.subjects(cfg.n_subjects)
        for s in self.subjects:
            self.world.check_subject(s)
        if cfg.model is None:
            self.model = TINY_SD
        else:
            self.model = Path(cfg.model)
        self.timings: dict[str, float] = {}

    # stage bookkeeping
    def stage(self, name: str, fn):
        marker = self.root / "stages" / f"{name}.done.json"
        if marker.exists():
            return json.loads(marker.read_text())["result"]
        t = time.time()
        result = fn()
        self.timings[name] = time.time() - t
        atomic_write_json(marker, {"result": result, "seconds": time.time() - t})
        return result

    def data(self, domain: str, split: str, subject: str | None = None) -> Path:
        name = f"{domain}-{subject or 'all'}-{split}".replace(" ", "_")
        path = self.root / "data" / name
        n = self.cfg.mask_images if split == "mask" else self.cfg.finetune_images
        subjects = [subject] if subject else self.subjects
        self.stage(f"data-{name}", lambda: str(self.world.export(path, domain, n, split, subjects)))
        return path

    def protection(self, method: str, ratio: float):
        """The method's output for this ratio (cached under protect/ by the registry)."""
        return protect(method, self.model, self.data("people", "mask"),
                       [self.data(d, "mask") for d in self.cfg.innocent], self.subjects, ratio,
                       self.root / "protect", self.cfg, device="cpu" if not torch.cuda.is_available() else "auto")

    def finetune(self, method: str, ratio: float, seed: int, domain: str, subject: str | None) -> tuple[Path, dict]:
        tag = f"{method}-{ratio:g}-s{seed}-{domain}-{subject or ''}".replace(" ", "_").rstrip("-")
        out = self.root / "finetunes" / tag

        def run():
            chosen = self.protection(method, ratio)
            model, kwargs = chosen.model or self.model, chosen.finetune_kwargs()
            cfg = FinetuneConfig(steps=self.cfg.finetune_steps, batch_size=self.cfg.finetune_batch,
                                 lr=self.cfg.finetune_lr, seed=seed, checkpoint_every=25)
            data = self.data(domain, "finetune", subject)
            lora = LoraSettings(rank=self.cfg.attack_lora_rank) if self.cfg.attack == "lora" else None
            r = guarded_finetune(model, data, out, cfg, resume=True, lora=lora, **kwargs)
            return {"frozen_tensors": r.frozen_tensors, "frozen_param_fraction": r.frozen_param_fraction,
                    "final_loss": r.history[-1]["loss_data"] if r.history else None}
        return out, self.stage(f"finetune-{tag}", run)

    def generate(self, model_dir: Path, prompts: list[str], seed: int, out: Path):

        def run():
            pipe = load_pipeline(model_dir)
            images = generate_images(pipe, prompts, steps=self.cfg.generate_steps, seed=seed * 1000,
                                     guidance=self.cfg.guidance)
            out.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images):
                im.save(out / f"{i:03d}.png")
            save_grid(images, out / "grid.png")
            return len(images)
        self.stage(f"generate-{out.relative_to(self.root)}".replace("/", "_"), run)
        return [Image.open(out / f"{i:03d}.png").convert("RGB") for i in range(len(prompts))]

    # ---- evaluation of one fine-tuned model -------------------------------------------------
    def eval_people(self, model_dir, method, ratio, seed, subject) -> list[dict]:
        tag = f"{method}-{ratio:g}-s{seed}-{subject}".replace(" ", "_")

        def run():
            prompts, real = self.world.people_prompts(subject, self.cfg.eval_images, seed)
            images = self.generate(model_dir, prompts, seed, self.root / "images" / tag)
            loss = heldout_loss(model_dir, self.world, subject, seed, self.root / "data")
            return self.world.score_people(images, subject, real) + [{"metric": "heldout_loss", "value": loss}]
        rows = self.stage(f"eval-{tag}", run)
        return [{"method": method, "ratio": ratio, "seed": seed, "subject": subject, "domain": "people", **r}
                for r in rows]

    def eval_innocent(self, model_dir, method, ratio, seed, domain) -> list[dict]:
        tag = f"{method}-{ratio:g}-s{seed}-{domain}"

        def run():
            prompts, attrs, real = self.world.innocent_prompts(domain, self.cfg.eval_images, seed)
            images = self.generate(model_dir, prompts, seed, self.root / "images" / tag)
            return self.world.score_innocent(domain, images, prompts, attrs, real)
        rows = self.stage(f"eval-{tag}", run)
        return [{"method": method, "ratio": ratio, "seed": seed, "subject": None, "domain": domain, **r} for r in rows]

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

    # ---- the whole experiment ---------------------------------------------------------------
    def run(self) -> list[dict]:
        t0 = time.time()
        cfg = self.cfg
        atomic_write_json(self.root / "config.json", asdict(cfg))
        sanity = self.sanity()
        # the untouched model (recognition should be near zero), then one job per user fine-tune
        baseline = [("pretrained", 0.0, seed, "people", subject) for seed in cfg.seeds for subject in self.subjects]
        jobs = []
        for method in cfg.methods:
            for ratio in (cfg.ratios if chain_uses_ratio(method) else [0.0]):
                for seed in cfg.seeds:
                    jobs += [(method, ratio, seed, "people", subject) for subject in self.subjects]
                    jobs += [(method, ratio, seed, domain, None) for domain in cfg.innocent]
        if cfg.workers > 1 and self._own_world:
            self._prepare_shared(jobs)
            rows = run_jobs_in_processes(cfg, baseline + jobs, protection_groups(jobs))
        else:
            if cfg.workers > 1:
                logger.warning("workers > 1 needs the runner to build its own world; running jobs one by one")
            rows = [r for job in baseline + jobs for r in self.run_job(*job)]
        write_report(self.root, rows, sanity, self.subjects, cfg, time.time() - t0)
        return rows

    def run_job(self, method: str, ratio: float, seed: int, domain: str, subject: str | None) -> list[dict]:
        """One user's fine-tune and its evaluation: the illegal user (people) or an innocent one;
        method "pretrained" evaluates the untouched model."""
        if method == "pretrained":
            return self.eval_people(self.model, method, ratio, seed, subject)
        ft, info = self.finetune(method, ratio, seed, domain, subject)
        if domain == "people":
            frozen = {"method": method, "ratio": ratio, "seed": seed, "subject": subject, "domain": domain,
                      "metric": "frozen_param_fraction", "value": info["frozen_param_fraction"]}
            return [frozen] + self.eval_people(ft, method, ratio, seed, subject)
        return self.eval_innocent(ft, method, ratio, seed, domain)

    def _prepare_shared(self, jobs):
        """What several jobs read, made once before they run side by side (no two processes write
        the same file): data exports, held-out sets, judges. Protections are made by the workers
        (run_jobs_in_processes), each group by one process."""
        self.data("people", "mask")
        for domain in self.cfg.innocent:
            self.data(domain, "mask")
        for _, _, _, domain, subject in jobs:
            self.data(domain, "finetune", subject)
        for subject in self.subjects:
            heldout_data(self.world, subject, self.root / "data")
        if hasattr(self.world, "recogniser"):      # trains and caches the judge for a new cast, once
            self.world.recogniser()


# ---- jobs in worker processes ----------------------------------------------------------------
_WORKER_RUNNER: "Runner | None" = None


def _init_worker(cfg_dict: dict):
    global _WORKER_RUNNER
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    _WORKER_RUNNER = Runner(ExperimentConfig(**cfg_dict))


def _worker_job(job) -> list[dict]:
    return _WORKER_RUNNER.run_job(*job)


def _worker_protections(group) -> None:
    for method, ratio in group:
        _WORKER_RUNNER.protection(method, ratio)


def protection_groups(jobs) -> list[list[tuple[str, float]]]:
    """The (method, ratio) pairs the jobs need, grouped by the first link of their chain. Chains
    with a common first link share its cached output (learned's warm start serves every ratio;
    uce and uce+learned share the edited model), so one process makes a group's members in turn
    and no two processes write one cache."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for method, ratio, *_ in jobs:
        group = groups.setdefault(method.split("+")[0].strip(), [])
        if (method, ratio) not in group:
            group.append((method, ratio))
    return list(groups.values())


def run_jobs_in_processes(cfg: ExperimentConfig, jobs, groups) -> list[dict]:
    """Jobs in ``cfg.workers`` spawned processes (spawn, not fork: a forked OpenMP runtime can
    hang), rows in job order. Protections are tasks too: a job is queued once its protection
    group is made, so Full FT and Random fine-tunes and the untouched model's evaluation run
    while another process learns a mask. Every stage keeps its done-marker, so a killed run
    resumes as usual."""
    group_of = {pair: g for g, group in enumerate(groups) for pair in group}
    waiting: dict[int, list[int]] = {}
    results: dict[int, list[dict]] = {}
    with cf.ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                initargs=(asdict(cfg),)) as pool:
        # protections first: they gate the jobs, and a mask learning is the longest single task
        pending = {pool.submit(_worker_protections, group): ("group", g) for g, group in enumerate(groups)}
        for i, job in enumerate(jobs):
            g = group_of.get((job[0], job[1]))
            if g is None:
                pending[pool.submit(_worker_job, job)] = ("job", i)
            else:
                waiting.setdefault(g, []).append(i)
        bar = tqdm(total=len(groups) + len(jobs), desc=f"protections and jobs ({cfg.workers} processes)")
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in done:
                kind, index = pending.pop(f)
                result = f.result()
                if kind == "group":
                    for i in waiting.pop(index, []):
                        pending[pool.submit(_worker_job, jobs[i])] = ("job", i)
                else:
                    results[index] = result
                bar.update()
        bar.close()
    return [r for i in range(len(jobs)) for r in results[i]]


def heldout_data(world, subject, data_root) -> Path:
    path = Path(data_root) / f"heldout-{subject}".replace(" ", "_")
    if not (path / "metadata.jsonl").exists():
        world.export(path, "people", 16, "eval", [subject])
    return path


def heldout_loss(model_dir, world, subject, seed, data_root, draws: int = 4) -> float:
    """Mean diffusion loss of a model on held-out renders of the subject (fixed noise)."""

    path = heldout_data(world, subject, data_root)
    if lora_base(model_dir) is None:
        comps = load_sd(model_dir)
    else:       # a LoRA output: its base with the adapter loaded
        pipe = load_pipeline(model_dir)
        comps = SDComponents(Path(model_dir), pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                             dict(pipe.scheduler.config))
    schedule = NoiseSchedule.from_scheduler_config(comps.scheduler_config)
    data = load_image_captions(path)
    mix = DomainMix([Domain("heldout", EncodedData(data, comps), len(data), 1.0)], schedule, seed=12345)
    comps.unet.eval()
    with torch.no_grad():
        return sum(float(weighted_loss(comps.unet, mix.draw("cpu"), schedule)[0]) for _ in range(draws)) / draws
