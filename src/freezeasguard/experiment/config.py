"""An experiment's settings: ExperimentConfig (every field a key of the YAML file), how YAML
values are read, the presets (the demo's settings), and the check that a resumed run has the
settings of the run that made its folder."""
from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from freezeasguard.attacks import SWEEP_ATTACKS, resolve_attack
from freezeasguard.training.finetune import FinetuneConfig
from freezeasguard.guard.mask import BUDGETS, check_ratio
from freezeasguard.methods import ProtectSettings, parse_chain
from freezeasguard.settings import setting
from freezeasguard.experiment.synthetic_world import USER_BRANDS as MAX_INNOCENT_PER_USER

_PAPER_FINETUNE = FinetuneConfig()
     # the illegal and innocent users' fine-tune defaults: the paper's


@dataclass
class ExperimentConfig(ProtectSettings):
    """One experiment; every field (these and the methods' settings, ProtectSettings) is a key of
    its YAML file. ``preset: demo`` takes the demo's values for every key the file does not set."""
    out: str = setting("experiment-out", "output folder")
    preset: str | None = setting(None, "demo or attack-sweep: the built-in run's settings (EXPERIMENT_PRESETS) for keys "
                                            "not set here")
    model: str | None = setting(None, "base pipeline folder; none: the shipped tiny pipeline")
    methods: list[str] = setting(["full", "random", "learned"], "methods or chains (uce+learned)")
    ratios: list[float] = setting([0.3], "freezing ratios, for methods that freeze")
    subjects: list[str] | None = setting(None, "illegal subjects; none: the first n_subjects of the cast/data")
    n_subjects: int = setting(1, "how many subjects when subjects is not given (at least people_per_forger)")
    people_per_forger: int = setting(1, "how many people one illegal user fine-tunes on together: 1, one forger per "
                                        "person (a LoRA per celebrity); 10, the paper's Table 2 (2, 5, 10: its Table "
                                        "4). The forger's steps are multiplied by it, so each person gets a "
                                        "one-person run's exposure; every person is judged on their own")
    innocent_per_user: int | None = setting(None, "built-in world: how many of the domain's subjects (brands, clothing "
                                                  "lines) one innocent user fine-tunes on together, steps multiplied "
                                                  "likewise; none: 1 beside a one-person forger, else "
                                                  "min(people_per_forger, 4) (the 4 the mask-learning data never names)")
    innocent: list[str] = setting(["logos"], "innocent domains")
    seeds: list[int] = setting([0, 1, 2], "fine-tuning and generation seeds")
    cast_seed: int = setting(0, "which cast of the built-in world")
    cast_size: int | None = setting(None, "people in the built-in world's cast (its recogniser tells them and "
                                          "'other' apart); none: 8, or the illegal subjects + 2 where they are more "
                                          "than 6, so that some people are never forged")
    mask_images: int = setting(48, "images per subject and innocent domain for the protection methods")
    finetune_images: int = setting(48, "images per subject / innocent domain for the users' fine-tunes")
    eval_images: int = setting(16, "images generated per subject / domain and seed")
    heldout_images: int = setting(16, "held-out renders per person for the held-out loss (never trained on)")
    heldout_draws: int = setting(4, "noise draws per held-out render for the held-out loss (fixed noise, the "
                                    "same for every model)")
    finetune_steps: int = setting(_PAPER_FINETUNE.steps, "users' fine-tuning steps")
    finetune_batch: int = setting(_PAPER_FINETUNE.batch_size, "users' fine-tuning batch")
    finetune_lr: float = setting(_PAPER_FINETUNE.lr, "users' AdamW learning rate")
    generate_steps: int = setting(50, "sampler steps per generated image, with the model's own scheduler (the paper's 50 PNDM steps)")
    guidance: float = setting(7.5, "classifier-free guidance scale")
    attacks: list[str] = setting(["default"], "the illegal user's fine-tuning recipes, each run for every method, "
                                              "ratio and seed: built-in names (listed by freezeasguard attack-sweep --help) or "
                                              "ones defined under attack_recipes")
    attack_recipes: dict[str, dict] = setting({}, "name -> recipe (keys: the fields of attacks.Attack, e.g. "
                                                   "{optimizer: sgd, lr_factor: 100, lora_rank: 8})")
    attack_innocent: bool = setting(False, "fine-tune the innocent users with every attack too (default: the "
                                           "default recipe only)")
    attack_class_prompt: str = setting("a photo of a person", "the class prompt of DreamBooth-style attacks: the "
                                                              "starting model's samples of it are the prior images")
    mask_generic_people: bool = setting(False, "built-in world: the mask-learning innocent data also holds photos of "
                                               "unnamed people (portraits in general stay legal), so that what the "
                                               "mask learns to block is the named person, not drawing people")
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
        if not self.attacks:
            raise ValueError("attacks: give at least one attack (default: the users' recipe)")
        for name in self.attacks:
            resolve_attack(name, self.attack_recipes)
        if self.budget not in BUDGETS:
            raise ValueError(f"budget {self.budget!r}: use one of {BUDGETS}")
        positive = ("mask_images", "finetune_images", "eval_images", "heldout_images", "heldout_draws",
                    "finetune_batch", "generate_steps", "workers", "n_subjects", "mask_batch", "people_per_forger")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("finetune_steps", "warm_start_steps", "mask_steps", "inner_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("finetune_lr", "warm_start_lr", "user_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.innocent_per_user is not None and not 1 <= self.innocent_per_user <= MAX_INNOCENT_PER_USER:
            raise ValueError(f"innocent_per_user must be 1-{MAX_INNOCENT_PER_USER} (the built-in world's brands that "
                             f"the mask-learning data never names), got {self.innocent_per_user}")
        if self.subjects and len(self.subjects) % self.people_per_forger:
            raise ValueError(f"subjects: {len(self.subjects)} people do not split into forgers of people_per_forger = "
                             f"{self.people_per_forger}; give a multiple of it")
        if self.cast_size is not None and self.cast_size < self.n_people():
            raise ValueError(f"cast_size {self.cast_size} is smaller than the {self.n_people()} illegal subjects; "
                             f"set cast_size to at least {self.n_people()} (or leave it out)")
        if self.mask_generic_people and self.people_data:
            raise ValueError("mask_generic_people: only the built-in world draws unnamed people; with people_data, add "
                             "a folder of such portraits under innocent_data instead")
        if not self.people_data:
            unknown = [d for d in self.innocent if d not in ("logos", "clothes")]
            if unknown:
                raise ValueError(f"innocent {unknown}: the built-in world has logos and clothes; for other domains "
                                 f"set people_data and innocent_data")

    def n_people(self) -> int:
        """How many illegal subjects: the listed ones, or the first n_subjects (at least one forger's)
        of the cast or data."""
        if self.subjects:
            return len(self.subjects)
        k = self.people_per_forger
        return max(k, -(-self.n_subjects // k) * k)

    def world_cast_size(self) -> int:
        return self.cast_size or (8 if self.n_people() <= 6 else self.n_people() + 2)

    def innocent_subjects_per_user(self) -> int:
        if self.innocent_per_user is not None:
            return self.innocent_per_user
        return 1 if self.people_per_forger == 1 else min(self.people_per_forger, MAX_INNOCENT_PER_USER)

    def protocol(self) -> str:
        """The illegal user's protocol in words, for every report."""
        k = self.people_per_forger
        if k == 1:
            return f"one person per forger ({self.finetune_steps} steps each; people_per_forger: 1)"
        return (f"the paper's, each forger fine-tunes on {k} people together ({k} x {self.finetune_steps} = "
                f"{k * self.finetune_steps} steps, a one-person run's exposure per person; people_per_forger: {k})")

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
            if raw["preset"] not in EXPERIMENT_PRESETS:
                raise ValueError(f"{path}: preset {raw['preset']!r} is unknown; presets: {', '.join(EXPERIMENT_PRESETS)}")
            raw = {**EXPERIMENT_PRESETS[raw["preset"]], **raw}
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
            # no classifier-free guidance: on the shipped zero-terminal-SNR model, guidance pushes a
            # fine-tuned person's colours past the photos' (brown skin drawn dark): Full FT of cast 2's
            # first person was recognised in 13/16 samples at guidance 1, 7/16 at 1.5, 1/16 at 3.
            # The untouched prior's trait accuracy is 0.89 at 1 (0.91 at 3), logos 13/16 (15/16 at 3).
            guidance=1.0,
            # Adam moves each weight ~lr per step: 50 IMMA steps of 1e-5 leave the tiny model as it was
            imma_lr=1e-4)
# the attack sweep on the built-in world: the demo's settings, every baseline that freezes, every axis of attack
ATTACK_SWEEP = dict(DEMO, methods=["full", "random", "saliency", "learned"], attacks=list(SWEEP_ATTACKS))
# an experiment's `preset:` (not a model preset: those are presets.PRESETS, the published models' settings)
EXPERIMENT_PRESETS = {"demo": DEMO, "attack-sweep": ATTACK_SWEEP}

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
    # a setting added since the run started reads as its default there: the run made it so
    defaults = json.loads(json.dumps(asdict(ExperimentConfig(out=cfg.out))))
    before = {**{k: v for k, v in defaults.items() if k not in before}, **before}
    differ = sorted(k for k in set(before) | set(now)
                    if k not in RESUMABLE_SETTINGS and before.get(k) != now.get(k))
    if differ:
        raise ValueError(f"{root} holds an experiment run with other settings ({', '.join(differ)}); its finished "
                         f"stages would be mixed with these. Use another out folder.")
