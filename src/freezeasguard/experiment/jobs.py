"""The runner's jobs: what each costs, which protections one process makes together, and chains
of recipes. A recipe that differs from a shorter one only by running longer (steps-x5 after
default) continues the shorter run's checkpoint instead of starting again (bit for bit the same
result); a job runs such a chain in order (attacks.recipe_chains).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from freezeasguard.attacks import recipe_chains, resolve_attack
from freezeasguard.outputs import PROVENANCE


def job_cost(job, recipes: dict) -> float:
    """A job's fine-tuning samples relative to one default fine-tune (a chain costs its longest
    recipe: the others are its first steps); the untouched model's evaluation costs nothing."""
    method, *_, attacks = job
    if method == "pretrained":
        return 0.0
    return max(resolve_attack(a, recipes).cost() for a in ((attacks,) if isinstance(attacks, str) else attacks))


def protection_groups(jobs) -> list[list[tuple[str, float]]]:
    """The (method, ratio) pairs the jobs need, grouped by the first link of their chain. Chains
    with a common first link share its cached output (learned's warm start serves every ratio;
    uce and uce+learned share the edited model), so one process makes a group's members in turn
    and no two processes write one cache."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for method, ratio, *_ in jobs:
        # a method and its variant (learned, learned-identity) share the first link's warm start
        group = groups.setdefault(method.split("+")[0].strip().split("-")[0], [])
        if (method, ratio) not in group:
            group.append((method, ratio))
    return list(groups.values())


def shorter_recipe(attack: str, attacks: list[str], recipes: dict) -> str | None:
    """The recipe of the experiment's ``attacks`` that ``attack`` continues (steps-x5 continues
    default), if any."""
    chain = next(c for c in recipe_chains(attacks + [attack], recipes) if attack in c)
    return chain[chain.index(attack) - 1] if chain.index(attack) else None


def attack_suffix(attack: str) -> str:
    """What an attack adds to a stage's name (nothing for the default recipe: earlier runs' stages keep theirs)."""
    return "" if attack == "default" else f"-{attack}"


def start_from_checkpoint(shorter: Path, out: Path):
    """Give a fine-tune (``out``, not started) the checkpoint of a shorter run it continues, with
    that run's record of its inputs: guarded_finetune then resumes from it, and refuses (naming
    what differs) if the two runs' inputs or settings other than the steps are not the same."""
    src, dst = Path(str(shorter) + ".work"), Path(str(out) + ".work")
    if (dst / "checkpoint.safetensors").exists() or not (src / "checkpoint.safetensors").exists():
        return          # already under way (a resumed job), or the shorter run was skipped
    dst.mkdir(parents=True, exist_ok=True)
    for name in (PROVENANCE, "checkpoint.safetensors"):     # the checkpoint last: its presence means complete
        tmp = dst / f".{name}.partial"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)
