"""The illegal user's fine-tuning recipes (recipes.py) and the attack sweep's worst-case report
(sweep.py)."""
from freezeasguard.attacks.recipes import (BUILTIN_ATTACKS, SWEEP_ATTACKS, Attack, continues, describe, recipe_chains,
                                           resolve_attack)

__all__ = ["Attack", "BUILTIN_ATTACKS", "SWEEP_ATTACKS", "continues", "describe", "recipe_chains", "resolve_attack"]
