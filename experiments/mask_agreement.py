"""Does the learned mask depend on the data or on its random start? Learn masks from two seeds
(different logit initialisation, data order and noise; the same warm start) and report their
Jaccard index beside the chance level of two random k-subsets, for several sparsity weights and
for the paper's raw gradient with the official weight (c = 5e3, step 10).

    python experiments/mask_agreement.py --out mask_agreement.json [--steps 25 --inner-steps 4]

With --world, on the shipped tiny pipeline and the built-in world instead: `freezeasguard learn`
exactly as a user runs it, at the demo's mask-learning budget (--warm-start-steps 100
--warm-start-lr 1e-4 --steps 30 --inner-steps 5 --batch-size 4 --user-lr 1e-4, every other flag at
its default), on one person of a cast and one innocent domain: seeds 1 and 2, then seed 1 with the
illegal and innocent roles swapped. A mask that follows the data agrees across seeds and changes
when the roles swap.

    python experiments/mask_agreement.py --world 0:logos 1:clothes --out experiments/results/agreement-w3/agreement.json

(writes the JSON and a results.md table beside it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # print_table

from _common import print_table  # noqa: E402


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def chance_jaccard(k: int, n: int) -> float:
    overlap = k * k / n
    return overlap / (2 * k - overlap) if k else 1.0


WORLD_COLUMNS = ["cast_seed", "subject", "innocent", "frozen_tensors", "param_fraction", "jaccard_seeds",
                 "jaccard_swapped", "chance"]
def demo_budget_flags() -> list[str]:
    """The demo's mask-learning budget as `freezeasguard learn` flags (--warm-start-steps 100
    --warm-start-lr 0.0001 --steps 30 --inner-steps 5 --batch-size 4 --user-lr 0.0001), from the
    demo preset; every other flag keeps its default."""
    from dataclasses import fields

    from freezeasguard.experiment import DEMO
    from freezeasguard.guard.learn import LearnConfig
    from freezeasguard.settings import flag_name
    names = ("warm_start_steps", "warm_start_lr", "mask_steps", "inner_steps", "mask_batch", "user_lr")
    by_name = {f.name: f for f in fields(LearnConfig)}
    return [x for n in names for x in (flag_name(by_name[n]), str(DEMO[n]))]


def world_agreement(work: Path, cast_seed: int, innocent_domain: str, ratio: float) -> dict:
    """Seed agreement and role-swap change of `freezeasguard learn` on the built-in world."""
    from freezeasguard.cli import main as cli
    from freezeasguard.experiment.synthetic_world import SyntheticWorld
    from freezeasguard.guard.mask import Mask
    from freezeasguard.synthetic import TINY_SD

    root = work / f"cast{cast_seed}-{innocent_domain}"
    world = SyntheticWorld(cast_seed)
    subject = world.subjects(1)[0]
    person, innocent = root / "person", root / innocent_domain
    if not person.exists():
        world.export(person, "people", 48, "mask", [subject], command="benchmark")
    if not innocent.exists():
        world.export(innocent, innocent_domain, 48, "mask", command="benchmark")
    runs = {"seed1": (person, innocent, 1), "seed2": (person, innocent, 2), "swapped_seed1": (innocent, person, 1)}
    masks = {}
    for name, (illegal, inn, seed) in runs.items():
        out = root / f"{name}.safetensors"
        if not out.exists():
            code = cli(["learn", "--model", str(TINY_SD), "--illegal", str(illegal), "--innocent", str(inn),
                        "--ratio", str(ratio), "--seed", str(seed), "--out", str(out), "--device", "cpu",
                        *demo_budget_flags()])
            if code != 0:
                raise SystemExit(f"freezeasguard learn failed for {name} (exit {code})")
        masks[name] = Mask.load(out)
    sets = {k: set(m.frozen_names) for k, m in masks.items()}
    k, n = len(sets["seed1"]), len(masks["seed1"].names)
    return {"cast_seed": cast_seed, "subject": subject, "innocent": innocent_domain, "ratio": ratio,
            "flags": demo_budget_flags(), "frozen_tensors": k, "tensors": n,
            "param_fraction": masks["seed1"].param_fraction,
            "jaccard_seeds": jaccard(sets["seed1"], sets["seed2"]),
            "jaccard_swapped": jaccard(sets["seed1"], sets["swapped_seed1"]),
            "chance": chance_jaccard(k, n)}


def main():
    import logging

    import torch

    from freezeasguard import FinetuneConfig, LearnConfig, guarded_finetune, learn_mask
    from freezeasguard.models.families.tiny import save_tiny_pipeline
    from freezeasguard.toydata import COLORS, make_logos, make_people

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mask_agreement.json")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--inner-steps", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, nargs=2, default=(1, 2))
    ap.add_argument("--only", type=int, nargs="*", help="run only these settings (indices into the list)")
    ap.add_argument("--world", nargs="+", metavar="CAST:DOMAIN",
                    help="the shipped pipeline and built-in world (see above), e.g. 0:logos 1:clothes")
    ap.add_argument("--work", default="mask_agreement-work", help="--world: data and masks (reused if there)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.world:
        rows = []
        for spec in a.world:
            cast, domain = spec.split(":")
            rows.append(world_agreement(Path(a.work), int(cast), domain, a.ratio))
            print_table(rows[-1:], WORLD_COLUMNS)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
        lines = ["Seed agreement and role swap of `freezeasguard learn` on the shipped pipeline "
                 f"(flags: {' '.join(demo_budget_flags())}, ratio {a.ratio}).", "",
                 "| cast | subject | innocent | frozen tensors | frozen params | Jaccard seeds 1-2 | "
                 "Jaccard seed 1 vs swapped roles | chance |", "|---" * 8 + "|"]
        lines += [f"| {r['cast_seed']} | {r['subject']} | {r['innocent']} | {r['frozen_tensors']}/{r['tensors']} | "
                  f"{r['param_fraction']:.3f} | {r['jaccard_seeds']:.3f} | {r['jaccard_swapped']:.3f} | "
                  f"{r['chance']:.3f} |" for r in rows]
        out.with_name("results.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out} and {out.with_name('results.md')}")
        return 0
    wide = dict(init_logit_low=-3.0, init_logit_high=-1.0)
    settings = [("ours c=5, wide init w/T~U(-3,-1)", dict(sparsity_weight=5.0, **wide)),
                ("ours c=0.5", dict(sparsity_weight=0.5)), ("ours c=5 (default)", dict(sparsity_weight=5.0)),
                ("paper raw, c=5e3, step 10, wide init", dict(normalize_mask_grad=False, sparsity_weight=5e3,
                                                              mask_lr=10.0, **wide))]
    if a.only:
        settings = [settings[i] for i in a.only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_pipeline(tmp / "sd", layout="sd15", image_size=32, seed=0, extra_words=["mara", "quell"])
        person = {"skin": (200, 150, 110), "hair": COLORS["orange"], "eyes": (30, 30, 120), "mark": "glasses"}
        people = make_people(tmp / "people", "Mara Quell", 48, 32, 0, traits=person)
        logos = make_logos(tmp / "logos", 48, 32, 1)
        ws = guarded_finetune(model, people, tmp / "ws", FinetuneConfig(steps=60, batch_size=8, lr=1e-4,
                                                                        device="cpu", checkpoint_every=0),
                              full=True).out_dir
        for label, kw in settings:
            masks = []
            for seed in a.seeds:
                cfg = LearnConfig(ratio=a.ratio, mask_steps=a.steps, inner_steps=a.inner_steps, mask_batch=4,
                                  user_lr=1e-4, seed=seed, device="cpu", checkpoint_every=0, **kw)
                r = learn_mask(model, people, [logos], tmp / f"{label}-{seed}.safetensors".replace(" ", "_"), cfg,
                               finetuned_dir=ws)
                masks.append(r)
            sets = [set(r.mask.frozen_names) for r in masks]
            k, n = len(sets[0]), len(masks[0].mask.names)
            lo, hi = cfg.init_logit_low, cfg.init_logit_high
            init = [set(torch.topk(lo + (hi - lo) * torch.rand(n, generator=torch.Generator().manual_seed(s)),
                                   k).indices.tolist()) for s in a.seeds]
            idx = [{i for i, f in enumerate(r.mask.frozen.tolist()) if f} for r in masks]
            last = masks[0].history[-1]
            rows.append({"setting": label, "jaccard": jaccard(*sets), "chance": chance_jaccard(k, n),
                         "overlap_with_own_init_topk": sum(jaccard(i, j) for i, j in zip(idx, init)) / 2,
                         "soft_ratio": last["soft_ratio"], "hard_ratio": last["hard_ratio"],
                         "data_grad_rms": last["data_grad_rms"], "sparsity_grad_rms": last["sparsity_grad_rms"]})
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    Path(a.out).write_text(json.dumps({"rows": rows, "steps": a.steps, "inner_steps": a.inner_steps,
                                       "ratio": a.ratio, "seeds": list(a.seeds)}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
