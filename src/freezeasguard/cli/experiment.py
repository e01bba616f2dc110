"""The experiment side of the freezeasguard command: world, protect, experiment, demo.
(cli.py holds the publisher's commands and main(); it adds these parsers and dispatches here.)"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path

import torch
import yaml

from freezeasguard.attacks import BUILTIN_ATTACKS, SWEEP_ATTACKS
from freezeasguard.training.data import load_image_captions
from freezeasguard.experiment.config import ATTACK_SWEEP, DEMO, ExperimentConfig
from freezeasguard.experiment.runner import Runner
from freezeasguard.experiment.synthetic_world import SyntheticWorld
from freezeasguard.io import atomic_write_json, convert_to_safetensors
from freezeasguard.guard.mask import BUDGETS, check_ratio
from freezeasguard.methods import METHODS, ProtectSettings, chain_uses_ratio, protect
from freezeasguard.metrics.score import score_folder
from freezeasguard.settings import add_flags, from_args
from freezeasguard.synthetic.world import export_imagefolder, make_cast, trait_phrase


def add_parsers(sub):
    """The experiment side's subcommands, one builder each."""
    _add_world_parser(sub)
    _add_protect_parser(sub)
    _add_experiment_parser(sub)
    _add_score_parser(sub)
    _add_convert_weights_parser(sub)
    _add_demo_parser(sub)
    _add_attack_sweep_parser(sub)


def _add_world_parser(sub):
    """`freezeasguard world`: its subcommand and flags."""
    p = sub.add_parser("world", help="the built-in synthetic world: export people, logos or clothes as image folders")
    wsub = p.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    w = wsub.add_parser("export", help="write a domain as an image folder with metadata.jsonl")
    w.add_argument("domain", choices=["people", "logos", "clothes"])
    w.add_argument("--out", required=True)
    w.add_argument("-n", type=int, default=100, help="images (per subject for people; default 100)")
    w.add_argument("--seed", type=int, default=0, help="render seed (default 0)")
    w.add_argument("--cast-seed", type=int, default=0, help="which world: its cast of people, brands and clothing "
                                                             "lines (default 0)")
    w.add_argument("--subject", action="append", help="a cast member's name (people) or a brand / clothing line "
                                                      "(logos / clothes: renders of it, captioned by its name); "
                                                      "repeatable; see `world cast`")
    w.add_argument("--generic", action="store_true",
                   help="people only: random unnamed people, captioned 'a person with <traits>'")
    w.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    w.add_argument("--overwrite", action="store_true", help="replace an earlier `world export` output in --out")
    c = wsub.add_parser("cast", help="list a world's people, brands and clothing lines (the first of each is the "
                                     "demo's subject)")
    c.add_argument("--cast-seed", type=int, default=0)
    c.add_argument("--cast-size", type=int, default=8, help="people in the cast (default 8; the paper's protocol with 10 "
                                                            "people per forger uses 12, whose first 8 are these)")


def _add_protect_parser(sub):
    """`freezeasguard protect`: its subcommand and flags."""
    table = "\n".join(f"  {m.name:<9} {m.summary}" for m in METHODS.values())
    p = sub.add_parser("protect", help="run a protection method or baseline (uce, imma, saliency, learned; chains)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Turn a base model into what an illegal user will fine-tune: an edited base "
                                   "model, a mask to enforce, or both. Methods:\n" + table + "\n\nChain with '+', "
                                   "e.g. uce+learned (learn the mask on the UCE-edited model). Finished links are "
                                   "cached in OUT/work and reused when the command is run again.",
                       epilog="then: freezeasguard finetune --model <printed model> --mask <printed mask> ...")
    p.add_argument("method", help="a method name or a chain such as uce+learned")
    p.add_argument("--model", required=True, help="local diffusers pipeline folder (the base model)")
    p.add_argument("--illegal", required=True, help="data of the illegal domain")
    p.add_argument("--innocent", action="append", default=[], help="data of an innocent domain (repeatable)")
    p.add_argument("--subject", action="append",
                   help="a name to erase (uce; repeatable; default: the distinct 'name' values of --illegal)")
    p.add_argument("--ratio", type=float, default=0.3, help="share to freeze for random/learned/saliency (default 0.3)")
    p.add_argument("--out", required=True, help="output folder: protection.json (what to fine-tune), mask.safetensors, work/ (edited models, caches)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    add_flags(p.add_argument_group("method settings (each flag is a field of ProtectSettings)"), ProtectSettings)


def _add_experiment_parser(sub):
    """`freezeasguard experiment`: its subcommand and flags."""
    p = sub.add_parser("experiment", help="run an experiment from a YAML config (resumable)",
                       description="Methods x ratios x subjects x seeds: mask learning, fine-tunes, generation, "
                                   "metrics, report. Every stage writes a done-marker; rerunning resumes.")
    p.add_argument("config", help="YAML file; keys are the fields of ExperimentConfig")
    p.add_argument("--out", help="override the output folder")
    p.add_argument("--people-per-forger", type=int, metavar="K",
                   help="override the YAML's people_per_forger: people one illegal user fine-tunes on together")


def _add_score_parser(sub):
    """`freezeasguard score`: its subcommand and flags."""
    p = sub.add_parser("score", help="score a folder of generated images: FID/KID, CLIP score, TOPIQ-FR, faces",
                       description="Real-model metrics on any folder of generated images (e.g. from freezeasguard "
                                   "generate). Each metric runs when its weights are given; all are local paths "
                                   "(nothing is downloaded). Needs the eval extra (faces: the faces extra).",
                       epilog="example: freezeasguard score gen/ --real ff25/test/Bill_Gates "
                              "--fid-inception-weights fid-inception.safetensors --out gates.json")
    p.add_argument("generated", help="folder of generated images (prompts from prompts.json or metadata.jsonl)")
    p.add_argument("--real", help="folder of real images (searched recursively): FID/KID, TOPIQ-FR and face identity")
    p.add_argument("--fid-inception-weights", help="FID Inception-v3 .safetensors (see convert-weights): the paper's FID")
    p.add_argument("--fid-features", help="or a local transformers vision model folder: FID/KID in its feature space")
    p.add_argument("--clip-weights", help="local transformers CLIP folder: CLIP score against each image's prompt")
    p.add_argument("--faces", action="store_true", help="face identity vs the real photos, and face-detection failures")
    p.add_argument("--topiq-fr-weights", help="TOPIQ-FR .safetensors (pyiqa's cfanet_fr_kadid_res50, see "
                                              "convert-weights): generated image k against real image k")
    p.add_argument("--out", help="write the scores as JSON here (default: print only)")


def _add_convert_weights_parser(sub):
    """`freezeasguard convert-weights`: its subcommand and flags."""
    p = sub.add_parser("convert-weights", help="turn a .pth state dict (e.g. the FID Inception) into .safetensors",
                       description="Read a PyTorch state dict with torch.load(weights_only=True) (a restricted "
                                   "unpickler: tensors and containers only, nothing in the file runs) and write it "
                                   "as .safetensors, the only checkpoint format freezeasguard loads. Example: "
                                   "freezeasguard convert-weights pt_inception-2015-12-05-6726825d.pth "
                                   "fid-inception.safetensors, then fid_inception: fid-inception.safetensors in an "
                                   "experiment config; pyiqa's TOPIQ-FR checkpoint (its 'params' dict is "
                                   "unwrapped) likewise for topiq_fr / --topiq-fr-weights.")
    p.add_argument("src", help=".pth / .pt / .bin state dict")
    p.add_argument("dst", help="output .safetensors file")


def _add_demo_parser(sub):
    """`freezeasguard demo`: its subcommand and flags."""
    p = sub.add_parser("demo", help="the built-in experiment: FreezeAsGuard against the baselines at an equal "
                                    "share of parameters, on synthetic people, brands and clothing lines",
                       description="On the shipped tiny pipeline, the paper's protocol: mask learning, then the "
                                   "illegal user (portraits of the cast's first 2 people, fine-tuned together; "
                                   "--people-per-forger 1 for one forger per person) and an innocent user (2 brands' "
                                   "logos or clothing lines, never named in pre-training) fine-tune under Full FT and "
                                   "under each mask, with the default recipe and three stronger ones; the untouched "
                                   "model, generation (each portrait prompt also with \"a person\" for the name), "
                                   "judges and a report. The table compares the freezing methods (FreezeAsGuard, "
                                   "Saliency, Random; --baselines adds the rest) at the same share of parameters "
                                   "(--budget tensors: the paper's share of tensors); --frontier sweeps the share.")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    _add_world_flags(p)
    p.add_argument("--baselines", action="store_true",
                   help="also run " + ", ".join(DEMO_EXTRA_METHODS) + " (about 3 times as long)")
    p.add_argument("--budget", choices=BUDGETS, default="params",
                   help="what the ratio counts. params (default): every freezing method freezes the same share of "
                        "parameters, the comparison at an equal cost; tensors: the paper's table (FreezeAsGuard "
                        "and Random at a share of tensors: the learned tensors are large ones, so it freezes far "
                        "more parameters than Random)")
    p.add_argument("--frontier", action="store_true",
                   help="the trade-off frontier: every freezing method at 10, 20, 30, 50 and 70%% of the parameters "
                        "(--ratios to choose), forgeries against innocent subjects recognised: frontier.md/.json/"
                        ".csv/.png (about 30 minutes on a 2-core CPU)")
    p.add_argument("--ratios", help="comma-separated frozen shares for --frontier (default 0.1,0.2,0.3,0.5,0.7)")
    p.add_argument("--attacks", default=",".join(DEMO_ATTACKS),
                   help="the illegal user's recipes, comma-separated: the table shows the default recipe with the "
                        "worst of these beside it (default %(default)s; 'default' alone skips the sweep; "
                        "`freezeasguard attack-sweep` runs all 11)")


def _add_attack_sweep_parser(sub):
    """`freezeasguard attack-sweep`: its subcommand and flags."""
    names = "\n".join(f"  {a.name:<14} {a.summary} (cost {a.cost():g}x)" for a in BUILTIN_ATTACKS.values())
    p = sub.add_parser("attack-sweep", help="does the protection hold against a stronger attacker? every method "
                                            "under every attack recipe, and the worst case",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill("Full FT, Random, Saliency and FreezeAsGuard at the ratio, each fine-tuned by the "
                                   "illegal user with every attack recipe (innocent users keep the default recipe). "
                                   "Writes the experiment's report plus attack_sweep.md/.csv/.json (per method: the "
                                   "default recipe, the worst case over attacks, which attacks reach Full FT's "
                                   "default result and the cheapest of them) and attack_sweep.png. Resumable like "
                                   "every experiment. Built-in attacks (factors multiply the users' lr, steps, batch, "
                                   "images; cost = samples processed vs the default):", 100) + "\n" + names +
                                   "\n\n" + textwrap.fill("Default sweep: " + ", ".join(SWEEP_ATTACKS) + ".", 100))
    p.add_argument("config", nargs="?", help="an experiment YAML (e.g. real SD data); its attacks: list is used, or "
                                             "the default sweep when it sets none. Without: the built-in world with "
                                             "the demo's settings")
    p.add_argument("--out", default="attack-sweep-out", help="output folder (default attack-sweep-out)")
    p.add_argument("--attacks", help="comma-separated attack names instead of the default sweep")
    p.add_argument("--budget", choices=BUDGETS, default="params",
                   help="what the ratio counts (built-in world): params (default, every mask at the same share of "
                        "parameters, as the demo) or tensors (the paper's)")
    _add_world_flags(p)


def _add_world_flags(p):
    """The built-in world's flags, shared by demo and attack-sweep."""
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, one seed (CI)")
    p.add_argument("--cast-seed", type=int, default=0, help="another world: its cast of people, brands and clothing "
                                                             "lines (a recogniser is trained for a new cast, ~1 min)")
    p.add_argument("--innocent", choices=["logos", "clothes"], default="logos",
                   help="the innocent domain: its user fine-tunes on the world's first brands (logos) or clothing "
                        "lines (clothes), as many as the forger's people up to 4; default logos")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: demo 1, attack-sweep 3; "
                                                           "quick 1)")
    p.add_argument("--ratio", type=float, default=0.3, help="freezing ratio (default 0.3)")
    p.add_argument("--people-per-forger", type=int, default=None, metavar="K",
                   help="people one illegal user fine-tunes on together (default: demo 2, the paper's protocol, "
                        "where each name is bound to its face; attack-sweep 1. 1: one forger per person; 10: the "
                        "paper's Table 2). Steps scale with K so each person gets a one-person run's exposure; the "
                        "innocent user likewise fine-tunes on min(K, 4) brands or clothing lines")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the fine-tune/evaluation jobs, one thread each (default: the CPU count "
                        "up to 4, or 1 with a GPU)")


def cmd_world(args) -> int:

    if args.world_command == "cast":
        print("people (illegal subjects):")
        for p in make_cast(args.cast_seed, args.cast_size):
            print(f"  {p.name:<18} {trait_phrase(p.traits())}")
        world = SyntheticWorld(args.cast_seed)
        for domain, what in (("logos", "brands"), ("clothes", "clothing lines")):
            print(f"{what} (innocent subjects; the last {len(world.publisher_brands(domain))} are named in the "
                  f"mask-learning data):")
            for b in world.brands[domain]:
                print(f"  {b.name:<18} " + ", ".join(f"{k} {v}" for k, v in b.design))
        return 0
    if args.subject:
        out = SyntheticWorld(args.cast_seed, size=args.size).export(args.out, args.domain, args.n, "export", args.subject,
                                                                     command="world export", overwrite=args.overwrite)
    else:
        out = export_imagefolder(args.out, args.domain, args.n, args.seed, args.size, args.cast_seed,
                                 generic=args.generic, overwrite=args.overwrite)
    print(f"wrote {args.domain} to {out} (metadata.jsonl)")
    return 0


def cmd_protect(args) -> int:

    if chain_uses_ratio(args.method):
        check_ratio(args.ratio)
    settings = from_args(ProtectSettings, args)
    subjects = args.subject or sorted({r.subject for r in load_image_captions(args.illegal, check_images=False).records
                                       if r.subject})
    if "uce" in args.method.split("+") and not subjects:
        raise ValueError(f"--illegal {args.illegal} has no 'name' column: pass the names to erase with --subject")
    if not args.innocent and any(m in args.method.split("+") for m in ("learned", "uce")):
        raise ValueError(f"{args.method} needs innocent data: pass --innocent DIR")
    out = Path(args.out)
    result = protect(args.method, Path(args.model), Path(args.illegal), [Path(p) for p in args.innocent], subjects,
                     args.ratio, out / "work", settings, args.device)
    mask_path = None
    if result.mask is not None:
        mask_path = result.mask.save(out / "mask.safetensors")
    summary = {"method": args.method, "ratio": args.ratio, "subjects": subjects,
               "model": str(result.model or args.model), "mask": str(mask_path) if mask_path else None,
               "random_ratio": result.random_ratio}
    atomic_write_json(out / "protection.json", summary)
    print(f"{args.method}: model to fine-tune {summary['model']}" +
          (f", mask {mask_path} ({result.mask.tensor_ratio:.1%} of tensors, {result.mask.param_fraction:.1%} of "
           f"parameters frozen)" if mask_path else "") +
          (f", random mask of {result.random_ratio:.0%} drawn at fine-tuning" if result.random_ratio else "") +
          f"\nsummary: {out / 'protection.json'}")
    return 0


def cmd_experiment(args) -> int:
    cfg = ExperimentConfig.from_yaml(args.config, out=args.out, people_per_forger=args.people_per_forger)
    Runner(cfg).run()
    print((Path(cfg.out) / "results.md").read_text())
    print(f"report: {cfg.out}/results.md, results.json, results.csv, tradeoff.png, images/")
    return 0


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    return 1 if torch.cuda.is_available() else max(1, min(4, cpus))


# --quick: a smoke run of every stage (CI), numbers meaningless
QUICK = dict(mask_images=8, finetune_images=8, eval_images=2, heldout_images=4, heldout_draws=1, warm_start_steps=2,
             mask_steps=1, inner_steps=1, finetune_steps=1, generate_steps=1, saliency_batches=1, imma_steps=2,
             imma_inner_steps=1, immunise_steps=2, immunise_inner_steps=1,
             # batches of 1: the quick run's ~70 training steps were ~20 s of its CPU time at batch 4
             warm_start_batch=1, mask_batch=1, finetune_batch=1)


FRONTIER_RATIOS = [0.1, 0.2, 0.3, 0.5, 0.7]
# the demo's short sweep: no protection is read without its weakest point (a larger learning rate,
# more steps, a LoRA on what the mask leaves trainable)
DEMO_ATTACKS = ["default", "lr-x10", "steps-x5", "lora-32"]
# the demo's methods at an equal share of parameters: the paper's objective, the best baseline
# (Saliency), the control (Random) and no guard (Full FT). Under 8 minutes on 2 cores, so the
# rest waits for --baselines: the immunised releases and the identity objective (docs/guard.md:
# within the seed spread of their freezing method at the worst recipe), Largest, UCE and IMMA
DEMO_METHODS = ["full", "learned", "saliency", "random"]
DEMO_EXTRA_METHODS = ["saliency+immunise", "learned-identity", "learned-identity+immunise", "largest",
                      "saliency-identity", "uce", "imma"]
# the demo's protocol, the paper's: one forger fine-tunes on 2 people at once, which binds each name
# to its face (one person alone rewrites what "a person" looks like: docs/paper.md), and 2 x 16
# portraits per method and recipe from one seed give the verdict its 95% interval at the cost
# the one-person demo paid for 2 seeds
DEMO_PEOPLE_PER_FORGER = 2
DEMO_SEEDS = 1


def demo_config(out, quick=False, cast_seed=0, innocent="logos", seeds=None, ratio=0.3, baselines=False,
                workers=None, budget="params", ratios=None, methods=None, attacks=None,
                people_per_forger=None) -> ExperimentConfig:
    """The demo's experiment: at a share of parameters every freezing method runs; at the paper's
    share of tensors FreezeAsGuard and Random (the paper's Table 2)."""
    methods = methods or (list(DEMO_METHODS) if budget == "params" else ["full", "learned", "random"])
    if baselines:
        methods += [m for m in DEMO_EXTRA_METHODS if m not in methods]
    n_seeds = seeds or (1 if quick else DEMO_SEEDS)
    return ExperimentConfig(**{**DEMO, **(QUICK if quick else {})}, preset="demo", out=str(out), cast_seed=cast_seed,
                            innocent=[innocent], seeds=list(range(n_seeds)),
                            ratios=[check_ratio(r) for r in (ratios or [ratio])], methods=methods, budget=budget,
                            attacks=attacks or ["default"],
                            people_per_forger=DEMO_PEOPLE_PER_FORGER if people_per_forger is None else people_per_forger,
                            workers=workers or default_workers())


def cmd_demo(args) -> int:
    common = dict(quick=args.quick, cast_seed=args.cast_seed, innocent=args.innocent, seeds=args.seeds,
                  workers=args.workers, people_per_forger=args.people_per_forger)
    out = Path(args.out)
    if args.frontier:
        ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else FRONTIER_RATIOS
        cfg = demo_config(out, budget="params", ratios=ratios, **common)
        Runner(cfg).run()
        print((out / "frontier.md").read_text())
        print(f"report: {out}/frontier.md (also frontier.png, .json, .csv; results.md for every metric)")
        return 0
    attacks = list(dict.fromkeys(["default"] + [a.strip() for a in args.attacks.split(",") if a.strip()]))
    cfg = demo_config(out, ratio=args.ratio, baselines=args.baselines, budget=args.budget, attacks=attacks, **common)
    Runner(cfg).run()
    print((out / "results.md").read_text())      # its first line is the verdict
    print(f"report: {out}/results.md (also results.json, results.csv, tradeoff.png, images/, protect/ (masks, "
          f"edited models))")
    return 0


def cmd_attack_sweep(args) -> int:
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
    if args.config:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        chosen = attacks or (None if isinstance(raw, dict) and "attacks" in raw else list(SWEEP_ATTACKS))
        cfg = ExperimentConfig.from_yaml(args.config, out=args.out, attacks=chosen,
                                         people_per_forger=args.people_per_forger)
    else:
        n_seeds = args.seeds or (1 if args.quick else 3)
        settings = {**ATTACK_SWEEP, **(QUICK if args.quick else {}), "attacks": attacks or list(SWEEP_ATTACKS)}
        cfg = ExperimentConfig(**settings, preset="attack-sweep", out=str(args.out), cast_seed=args.cast_seed,
                               innocent=[args.innocent], seeds=list(range(n_seeds)), ratios=[check_ratio(args.ratio)],
                               budget=args.budget, people_per_forger=1 if args.people_per_forger is None else args.people_per_forger,
                               workers=args.workers or (1 if args.quick else default_workers()))
    Runner(cfg).run()
    sweep = Path(cfg.out) / "attack_sweep.md"
    print(sweep.read_text() if sweep.exists() else (Path(cfg.out) / "results.md").read_text())
    print(f"report: {sweep} (also attack_sweep.png, .csv, .json; results.md for every metric)")
    return 0


def cmd_score(args) -> int:

    if args.fid_inception_weights and args.fid_features:
        raise ValueError("pass one of --fid-inception-weights and --fid-features")
    scores = score_folder(args.generated, args.real, args.fid_inception_weights, args.fid_features,
                          args.clip_weights, args.faces, args.topiq_fr_weights)
    if args.out:
        atomic_write_json(args.out, scores)
    print(json.dumps(scores, indent=2))
    return 0


def cmd_convert_weights(args) -> int:

    n = convert_to_safetensors(args.src, args.dst)
    print(f"wrote {n} tensors to {args.dst}")
    return 0


COMMANDS = {"attack-sweep": cmd_attack_sweep, "score": cmd_score, "convert-weights": cmd_convert_weights, "world": cmd_world, "protect": cmd_protect, "experiment": cmd_experiment, "demo": cmd_demo}
