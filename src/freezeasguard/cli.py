"""The freezeasguard command: learn | finetune | verify | generate | mask show | protect | world | experiment | demo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("freezeasguard")

DESCRIPTION = """\
FreezeAsGuard for diffusers Stable Diffusion models: learn which UNet tensors to freeze so that
fine-tuning on an illegal domain (a real person's portraits, an artist's works) stays weak while
innocent domains adapt freely; enforce that freezing in fine-tuning; audit fine-tuned checkpoints.

Typical use (publisher):
  freezeasguard learn    --model SD_DIR --illegal PEOPLE --innocent LOGOS --ratio 0.3 --out mask.safetensors
  freezeasguard finetune --model SD_DIR --data USER_DATA --mask mask.safetensors --out FT_DIR
  freezeasguard verify   --model SD_DIR --mask mask.safetensors --candidate FT_DIR
  freezeasguard generate --model FT_DIR --prompt "a photo of ..." --out IMAGES
  freezeasguard mask show mask.safetensors --plot mask.png
Baselines: freezeasguard protect uce|imma|saliency|uce+learned --model SD_DIR --illegal PEOPLE ...

Models are local diffusers folders (nothing is downloaded); data are image folders with a
metadata.jsonl or metadata.csv (file_name, text[, name]) or datasets saved with save_to_disk.
Multi-process: prefix learn/finetune with `accelerate launch --num_processes N`.
"""


def _add_preset(p):
    p.add_argument("--preset", choices=["sd14", "sd15", "sd21", "sd21-base"],
                   help="check that --model is this model (resolution, prediction type, text width) before "
                        "starting; the paper's settings for it are the defaults of every other flag")


def _check_preset(args):
    if getattr(args, "preset", None):
        from .presets import check_model, get_preset
        check_model(get_preset(args.preset), args.model)


def _add_common_train(p):
    p.add_argument("--model", required=True, help="local diffusers Stable Diffusion folder (the base model)")
    _add_preset(p)
    p.add_argument("--seed", type=int, default=0, help="seed for data order, noise and initialisation (default 0)")
    p.add_argument("--batch-size", type=int, help="samples per step")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast on GPU; parameters, logits and theta_d stay fp32 (default no)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--caption-column", default="text", help="caption column of the data (default text)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--work-dir", help="where checkpoints and logs go (default: next to --out, suffixed .work)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freezeasguard", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # learn
    p = sub.add_parser("learn", help="learn a freezing mask (bilevel optimisation, Algorithm 1)",
                       description="Learn which UNet tensors to freeze. A warm start (full fine-tuning on illegal "
                                   "+ innocent data) gives theta_ft, then K mask updates each follow L simulated-user "
                                   "steps. The final mask freezes exactly round(ratio * N) tensors (top-k logits), "
                                   "or a parameter budget with --budget params.")
    _add_common_train(p)
    p.add_argument("--illegal", required=True, help="data of the illegal domain (e.g. one person's portraits)")
    p.add_argument("--illegal-subject", help="keep only rows whose 'name' column equals this")
    p.add_argument("--innocent", required=True, action="append", help="data of an innocent domain (repeatable)")
    p.add_argument("--ratio", type=float, default=0.3, help="share to freeze, 0..1 (default 0.3)")
    p.add_argument("--budget", choices=["tensors", "params"], default="tensors",
                   help="count the ratio in tensors (paper) or parameters (default tensors)")
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    p.add_argument("--finetuned", help="reuse this fully fine-tuned pipeline/UNet as theta_ft (skips the warm start)")
    p.add_argument("--warm-start-steps", type=int, default=200, help="warm-start fine-tuning steps (default 200)")
    p.add_argument("--warm-start-lr", type=float, default=1e-5, help="warm-start AdamW lr (default 1e-5)")
    p.add_argument("--steps", type=int, default=100, help="mask updates K (default 100)")
    p.add_argument("--inner-steps", type=int, default=10, help="simulated-user steps per mask update (default 10)")
    p.add_argument("--upper-batches", type=int, default=1,
                   help="batches averaged into each mask gradient (default 1, the paper's; more = less noise)")
    p.add_argument("--mask-lr", type=float, default=None,
                   help="logit step eta_1 (default 0.05 on the normalised gradient; 10, the paper's, with "
                        "--no-normalize)")
    p.add_argument("--user-lr", type=float, default=1e-5, help="simulated user's lr eta_2 (default 1e-5)")
    p.add_argument("--temperature", type=float, default=0.2, help="T of the soft mask (default 0.2)")
    p.add_argument("--sparsity-weight", type=float, default=5.0,
                   help="weight c of the sparsity term (mean(m)-ratio)^2, per tensor when normalised (default 5)")
    p.add_argument("--lambda-illegal", type=float, default=1.0, help="lambda_1 (default 1)")
    p.add_argument("--lambda-innocent", type=float, default=1.0, help="lambda_2 (default 1)")
    p.add_argument("--no-normalize", action="store_true",
                   help="use the paper's raw mask gradient (its data term is then usually negligible)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="mask updates between checkpoints (default 10)")
    p.add_argument("--tensorboard", help="write TensorBoard logs to this folder")

    # finetune
    p = sub.add_parser("finetune", help="guarded fine-tuning that enforces a freezing scheme",
                       description="Fine-tune the UNet with AdamW on one dataset while the chosen tensors stay "
                                   "frozen: they get requires_grad=False, are in no optimizer group, and are "
                                   "checked bit for bit against the base model afterwards (the run fails if one "
                                   "moved). Writes a from_pretrained-loadable pipeline folder and a manifest.")
    _add_common_train(p)
    p.add_argument("--data", required=True, help="training data (image folder or saved dataset)")
    p.add_argument("--subject", help="keep only rows whose 'name' column equals this")
    p.add_argument("--out", required=True, help="output pipeline folder")
    scheme = p.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--mask", help="a learned mask file")
    scheme.add_argument("--random-ratio", type=float, help="freeze exactly round(R * N) random tensors (seeded)")
    scheme.add_argument("--full", action="store_true", help="no freezing")
    p.add_argument("--budget", choices=["tensors", "params"], default="tensors", help="for --random-ratio")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000, the paper's)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 0.01)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--validation-prompt", action="append", default=[], help="prompt for validation images")
    p.add_argument("--validation-every", type=int, default=0, help="steps between validation grids (0 = off)")

    # verify
    p = sub.add_parser("verify", help="audit a fine-tuned checkpoint against base model + mask",
                       description="Exit 0: every frozen tensor is as in the base model. Exit 1: violations "
                                   "(listed). Exit 2: unusable input (missing files, mask for another model).")
    p.add_argument("--model", required=True, help="the base model the mask was made for")
    p.add_argument("--mask", required=True, help="mask file")
    p.add_argument("--candidate", required=True,
                   help="fine-tuned pipeline folder, UNet folder, or a .safetensors UNet state dict")
    p.add_argument("--tolerance", action="store_true",
                   help="accept exports in another precision (fp16/bf16): frozen tensors must equal the base "
                        "rounded to that precision, within --atol")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance in tolerance mode (default 0)")
    p.add_argument("--report", help="write the report as JSON here")

    # generate
    p = sub.add_parser("generate", help="generate images from a pipeline folder (PNDM, as the paper)")
    p.add_argument("--model", required=True, help="pipeline folder (base or fine-tuned)")
    _add_preset(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--out", required=True, help="image folder to write (PNGs, grid.png, prompts.json)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--device", default="auto")

    # mask show
    p = sub.add_parser("mask", help="inspect a mask file")
    msub = p.add_subparsers(dest="mask_command", required=True, metavar="ACTION")
    s = msub.add_parser("show", help="summary by kind and block; plot; export")
    s.add_argument("mask", help="mask file")
    s.add_argument("--plot", help="write a Figure 16-style PNG of the mask")
    s.add_argument("--export", choices=["names", "regex"],
                   help="print the frozen names, one per line, or a regex matching exactly them")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")

    # tiny-pipeline
    p = sub.add_parser("tiny-pipeline", help="write a small random Stable-Diffusion-shaped pipeline (for trying things)")
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=["sd15", "mini"], default="sd15",
                   help="sd15: SD v1.5 block layout, 686 tensors (default); mini: 2 blocks")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--seed", type=int, default=0)

    from . import cli_experiment
    cli_experiment.add_parsers(sub)
    return parser


def _read_prompts(args) -> list[str]:
    if args.prompt:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file (one per line)")
    return prompts


def cmd_learn(args) -> int:
    _check_preset(args)
    from .learn import LearnConfig, learn_mask

    cfg = LearnConfig(ratio=args.ratio, budget=args.budget, steps=args.steps, inner_steps=args.inner_steps,
                      upper_batches=args.upper_batches,
                      batch_size=args.batch_size or 16, temperature=args.temperature, mask_lr=args.mask_lr,
                      user_lr=args.user_lr, lambda_illegal=args.lambda_illegal, lambda_innocent=args.lambda_innocent,
                      sparsity_weight=args.sparsity_weight, normalize_mask_grad=not args.no_normalize,
                      warm_start_steps=args.warm_start_steps, warm_start_lr=args.warm_start_lr, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
                      gradient_checkpointing=args.gradient_checkpointing, device=args.device)
    result = learn_mask(args.model, args.illegal, args.innocent, args.out, cfg, illegal_subject=args.illegal_subject,
                        finetuned_dir=args.finetuned, work_dir=args.work_dir, resume=args.resume,
                        caption_column=args.caption_column, tensorboard_dir=args.tensorboard)
    m = result.mask
    last = result.history[-1] if result.history else {}
    print(f"mask: {int(m.frozen.sum())}/{len(m.names)} tensors frozen = {m.tensor_ratio:.1%} of tensors, "
          f"{m.param_fraction:.1%} of parameters ({args.budget} budget, target {args.ratio:.1%})\n"
          f"soft ratio {last.get('soft_ratio', float('nan')):.3f}, hard ratio {last.get('hard_ratio', float('nan')):.3f} "
          f"after {len(result.history)} updates in {result.seconds:.1f}s -> {args.out}")
    return 0


def cmd_finetune(args) -> int:
    _check_preset(args)
    from .finetune import FinetuneConfig, guarded_finetune
    from .mask import Mask

    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size or 4, grad_accum=args.grad_accum, lr=args.lr,
                         weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                         mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                         checkpoint_every=args.checkpoint_every, validation_prompts=tuple(args.validation_prompt),
                         validation_every=args.validation_every, device=args.device)
    mask = Mask.load(args.mask) if args.mask else None
    r = guarded_finetune(args.model, args.data, args.out, cfg, mask=mask, random_ratio=args.random_ratio,
                         full=args.full, budget=args.budget, subject=args.subject, caption_column=args.caption_column,
                         resume=args.resume, work_dir=args.work_dir)
    last = r.history[-1]["loss_data"] if r.history else float("nan")
    print(f"fine-tuned ({r.scheme}): {r.frozen_tensors} tensors frozen ({r.frozen_param_fraction:.1%} of parameters), "
          f"{len(r.history)} steps in {r.seconds:.1f}s, last loss {last:.4f}; frozen tensors checked unchanged "
          f"-> {r.out_dir}")
    return 0


def cmd_verify(args) -> int:
    from .verify import EXIT_COMPLIANT, EXIT_VIOLATIONS, verify_checkpoint

    report = verify_checkpoint(args.model, args.mask, args.candidate, "tolerance" if args.tolerance else "exact",
                               args.atol)
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2))
    if report.compliant:
        print(f"COMPLIANT: all {report.frozen_checked} frozen tensors match the base model ({report.mode} mode); "
              f"{report.trainable_changed}/{report.trainable_total} trainable tensors changed.")
        return EXIT_COMPLIANT
    print(f"VIOLATIONS: {len(report.violations)} of {report.frozen_checked} frozen tensors ({report.mode} mode):")
    for v in report.violations[:50]:
        diff = f" (max |diff| {v.max_abs_diff:g})" if v.max_abs_diff is not None else ""
        print(f"  {v.name}: {v.reason}{diff}")
    if len(report.violations) > 50:
        print(f"  ... and {len(report.violations) - 50} more")
    return EXIT_VIOLATIONS


def cmd_generate(args) -> int:
    _check_preset(args)
    from .finetune import resolve_device
    from .generate import generate_to_folder

    files = generate_to_folder(args.model, _read_prompts(args), args.out, args.steps, args.seed, args.guidance,
                               args.num_images, resolve_device(args.device))
    print(f"wrote {len(files)} images and grid.png to {args.out}")
    return 0


def cmd_mask(args) -> int:
    from .mask import Mask

    mask = Mask.load(args.mask)
    if args.export == "names":
        sys.stdout.write(mask.export_names())
        return 0
    if args.export == "regex":
        print(mask.export_regex())
        return 0
    s = mask.summary()
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"{args.mask}: {s['frozen_tensors']}/{s['tensors']} tensors frozen "
              f"({s['tensor_ratio']:.1%} of tensors, {s['param_fraction']:.1%} of parameters); "
              f"method {s['method']}, target {s['target_ratio']} ({s['budget']} budget)")
        print("by kind:   " + ", ".join(f"{k} {f}/{t}" for k, (f, t) in s["by_kind"].items()))
        print("by block:")
        for block, (f, t) in s["by_block"].items():
            print(f"  {block:<22} {f:>4}/{t:<4} {'#' * round(20 * f / t) if t else ''}")
    if args.plot:
        print(f"plot: {mask.plot(args.plot)}")
    return 0


def cmd_tiny(args) -> int:
    from .models import save_tiny_pipeline

    out = save_tiny_pipeline(args.out, layout=args.layout, image_size=args.image_size,
                             prediction_type=args.prediction_type, seed=args.seed)
    print(f"wrote a tiny {args.layout} pipeline to {out}")
    return 0


COMMANDS = {"learn": cmd_learn, "finetune": cmd_finetune, "verify": cmd_verify, "generate": cmd_generate,
            "mask": cmd_mask, "tiny-pipeline": cmd_tiny}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        # under accelerate launch only rank 0 reports; the others stay quiet unless something fails
        sys.stdout = open(os.devnull, "w")
        args.verbose = False
        logging.getLogger().setLevel(logging.WARNING)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .data import DataError
    from .mask import MaskError
    from .models import ModelError

    from .cli_experiment import COMMANDS as EXPERIMENT_COMMANDS
    try:
        return {**COMMANDS, **EXPERIMENT_COMMANDS}[args.command](args)
    except (DataError, MaskError, ModelError, FileNotFoundError, FileExistsError, ValueError) as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
