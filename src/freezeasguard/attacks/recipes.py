"""The illegal user's fine-tuning recipes: named attacks the experiment runner sweeps.

An attack is a fine-tuning recipe the illegal user may choose within what the mask allows, set
relative to the experiment's users' settings (``finetune_lr``, ``finetune_steps``,
``finetune_batch``, ``finetune_images``), so one list of attacks serves the tiny demo (lr 1e-4,
100 steps) and the paper's SD setting (lr 1e-5, 2,000 steps) alike. Work on tamper-resistance
since the paper (TAR, Antidote, Qi et al. 2024) found defences that hold at one recipe and fail
at a larger learning rate, more steps, another optimizer or a LoRA; the built-in list covers
those axes. A config adds its own under ``attack_recipes``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from freezeasguard.training.finetune import FinetuneConfig
from freezeasguard.training.optim import OPTIMIZERS
from freezeasguard.training.lora import LoraSettings


@dataclass(frozen=True)
class Attack:
    """One recipe. Factors multiply the experiment's users' settings; ``lr``, when given,
    replaces the learning rate outright (Prodigy is run at 1.0, as its authors advise)."""
    name: str
    optimizer: str = "adamw"
    lr_factor: float = 1.0
    lr: float | None = None
    steps_factor: float = 1.0
    batch_factor: float = 1.0
    data_factor: float = 1.0          # more images of the person (2x, 4x)
    lora_rank: int = 0                # 0: full fine-tuning of every tensor the mask leaves trainable
    lora_targets: str | None = None   # peft's rules (a full-match regex or names); none: every attention projection
    prior_weight: float = 0.0         # DreamBooth's prior preservation: weight of the class-prior loss (0: off)
    summary: str = ""

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"attack {self.name}: optimizer {self.optimizer!r}, use one of {OPTIMIZERS}")
        for name in ("lr_factor", "steps_factor", "batch_factor", "data_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"attack {self.name}: {name} must be > 0, got {getattr(self, name)}")
        if self.lora_rank < 0 or self.prior_weight < 0:
            raise ValueError(f"attack {self.name}: lora_rank and prior_weight must be >= 0")

    def finetune_config(self, lr: float, steps: int, batch: int, seed: int, **kw) -> FinetuneConfig:
        """The FinetuneConfig of this attack, from the experiment's users' lr, steps and batch."""
        return FinetuneConfig(steps=max(1, round(steps * self.steps_factor)),
                              batch_size=max(1, round(batch * self.batch_factor)),
                              lr=self.lr if self.lr is not None else lr * self.lr_factor,
                              optimizer=self.optimizer, prior_weight=self.prior_weight or 1.0, seed=seed, **kw)

    def lora(self) -> LoraSettings | None:
        return LoraSettings(rank=self.lora_rank, targets=self.lora_targets) if self.lora_rank else None

    def images(self, n: int) -> int:
        return max(1, round(n * self.data_factor))

    def cost(self) -> float:
        """Samples processed, relative to the default recipe (prior preservation doubles each
        step's batch). A LoRA step is counted as a full step: its forward and backward through
        the UNet are the same passes."""
        return self.steps_factor * self.batch_factor * (2.0 if self.prior_weight else 1.0)


# the cross-attention projections of the up blocks: where a name meets the image (targeted LoRA)
UP_CROSS_ATTENTION = r"up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)"

BUILTIN_ATTACKS = {a.name: a for a in [
    Attack("default", summary="the experiment's users' recipe (the paper's: AdamW)"),
    Attack("lr-x10", lr_factor=10, summary="AdamW at 10x the learning rate"),
    Attack("lr-x0.1", lr_factor=0.1, summary="AdamW at a tenth of the learning rate"),
    Attack("steps-x2", steps_factor=2, summary="twice the steps"),
    Attack("steps-x5", steps_factor=5, summary="5x the steps"),
    Attack("batch-x4", batch_factor=4, summary="4x the batch"),
    Attack("sgd", optimizer="sgd", lr_factor=100, summary="SGD with momentum 0.9 at 100x the learning rate"),
    Attack("adafactor", optimizer="adafactor", summary="Adafactor (transformers'), fixed learning rate"),
    Attack("prodigy", optimizer="prodigy", lr=1.0, summary="Prodigy (learning-rate free, lr 1.0)"),
    Attack("lora-4", lora_rank=4, lr_factor=10, summary="LoRA rank 4 on every allowed attention projection, 10x lr"),
    Attack("lora-32", lora_rank=32, lr_factor=10, summary="LoRA rank 32 on every allowed attention projection, 10x lr"),
    Attack("lora-128", lora_rank=128, lr_factor=10,
           summary="LoRA rank 128 (capped at each module's size) on every allowed attention projection, 10x lr"),
    Attack("lora-16-xattn", lora_rank=16, lr_factor=10, lora_targets=UP_CROSS_ATTENTION,
           summary="LoRA rank 16 on the up blocks' cross-attention only (the allowed ones), 10x lr"),
    Attack("data-x2", data_factor=2, summary="twice the images of the person"),
    Attack("data-x4", data_factor=4, summary="4x the images of the person"),
    Attack("dreambooth", prior_weight=1.0,
           summary="DreamBooth prior preservation: the model's own 'a photo of a person' samples, weight 1"),
]}

# what `freezeasguard attack-sweep` runs by default: every axis once, on CPU in well under an hour
SWEEP_ATTACKS = ["default", "lr-x10", "steps-x5", "sgd", "adafactor", "prodigy", "lora-4", "lora-32",
                 "lora-16-xattn", "data-x4", "dreambooth"]

ATTACK_FIELDS = tuple(f.name for f in fields(Attack) if f.name != "name")


def resolve_attack(name: str, recipes: dict[str, dict] | None = None) -> Attack:
    """A built-in attack or one defined in the config's ``attack_recipes`` (which wins)."""
    recipes = recipes or {}
    if name in recipes:
        spec = recipes[name]
        unknown = set(spec) - set(ATTACK_FIELDS)
        if unknown:
            raise ValueError(f"attack_recipes.{name}: unknown keys {sorted(unknown)}; known: {', '.join(ATTACK_FIELDS)}")
        return Attack(name=name, **spec)
    if name in BUILTIN_ATTACKS:
        return BUILTIN_ATTACKS[name]
    raise ValueError(f"attack {name!r} is neither built in ({', '.join(BUILTIN_ATTACKS)}) nor defined under "
                     f"attack_recipes in the config")


def continues(longer: Attack, shorter: Attack) -> bool:
    """``longer`` is ``shorter`` run for more steps, every other setting the same. With a constant
    learning rate and one seed the two runs take the same first steps, so ``longer`` may start
    from ``shorter``'s checkpoint instead of from the model (exactly: a resume is bit-exact)."""
    if longer.steps_factor <= shorter.steps_factor:
        return False
    same = [f for f in ATTACK_FIELDS if f not in ("steps_factor", "summary")]
    return all(getattr(longer, f) == getattr(shorter, f) for f in same)


def recipe_chains(names: list[str], recipes: dict[str, dict] | None = None) -> list[tuple[str, ...]]:
    """The attacks grouped into chains that one job runs in order, each recipe after the shorter
    one it continues (``default, lr-x10, steps-x5`` -> ``(default, steps-x5), (lr-x10,)``), in the
    order of each chain's first member."""
    attacks = [resolve_attack(n, recipes) for n in dict.fromkeys(names)]
    chains: list[list[Attack]] = []
    for attack in sorted(attacks, key=lambda a: a.steps_factor):     # stable: ties keep their order
        chain = next((c for c in chains if continues(attack, c[-1])), None)
        if chain is None:
            chains.append([attack])
        else:
            chain.append(attack)
    first = {a.name: i for i, a in enumerate(attacks)}
    return [tuple(a.name for a in c) for c in sorted(chains, key=lambda c: min(first[a.name] for a in c))]


def describe(attack: Attack) -> dict:
    return {**asdict(attack), "cost": attack.cost()}
