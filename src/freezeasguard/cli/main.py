"""The freezeasguard command: learn | finetune | verify | generate | mask show | protect | world | experiment | demo."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import traceback
from pathlib import Path

from freezeasguard.cli import experiment as cli_experiment
from freezeasguard.cli import mask as cli_mask
from freezeasguard.cli import service as cli_service
from freezeasguard.cli.experiment import COMMANDS as EXPERIMENT_COMMANDS
from freezeasguard.cli.mask import COMMANDS as MASK_COMMANDS
from freezeasguard.cli.service import COMMANDS as SERVICE_COMMANDS
from freezeasguard.training.finetune import EnforcementError, FinetuneConfig, guarded_finetune
from freezeasguard.training.train import DivergedError, resolve_device
from freezeasguard.models.generate import generate_to_folder
from freezeasguard.io import atomic_write_json
from freezeasguard.guard.learn import LearnConfig, learn_mask
from freezeasguard.training.lora import LORA_FILE, LoraSettings
from freezeasguard.guard.mask import BUDGETS, Mask
from freezeasguard.models.families import FAMILIES
from freezeasguard.models.families.tiny import save_tiny, save_tiny_pipeline
from freezeasguard.models.presets import PRESETS, apply_preset, check_model, get_preset
from freezeasguard.settings import add_flags, from_args
from freezeasguard.audit.batch import audit_folder, counts
from freezeasguard.audit.batch import exit_code as batch_exit_code
from freezeasguard.audit.adapters import report_text, verify_adapter
from freezeasguard.audit.verify import EXIT_COMPLIANT, EXIT_VIOLATIONS, verify_checkpoint

logger = logging.getLogger("freezeasguard")

DESCRIPTION = """\
FreezeAsGuard for diffusers text-to-image models (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1): learn which
denoiser tensors to freeze so that fine-tuning on an illegal domain (a real person's portraits, an
artist's works) stays weak while innocent domains adapt freely; enforce that freezing in
fine-tuning (full or LoRA; `serve` runs it as a service); audit fine-tuned checkpoints and adapters;
measure the protection (demo, experiment, attack-sweep).

Typical use (publisher):
  freezeasguard learn    --model SD_DIR --illegal PEOPLE --innocent LOGOS --ratio 0.3 --out mask.safetensors
  freezeasguard finetune --model SD_DIR --data USER_DATA --mask mask.safetensors --out FT_DIR
  freezeasguard verify   --model SD_DIR --mask mask.safetensors --candidate FT_DIR
  freezeasguard generate --model FT_DIR --prompt "a photo of ..." --out IMAGES
  freezeasguard mask show mask.safetensors --plot mask.png
Baselines: freezeasguard protect uce|imma|saliency|uce+learned --model SD_DIR --illegal PEOPLE ...
Service:   freezeasguard tenant add alice && freezeasguard serve   (API at http://127.0.0.1:8000/docs)

Models are local diffusers folders (nothing is downloaded); data are image folders with a
metadata.jsonl or metadata.csv (file_name, text[, name]) or datasets saved with save_to_disk.
Multi-process: prefix learn/finetune with `accelerate launch --num_processes N` (add --shard to split
the model over the processes instead of replicating it).

Nothing you own is overwritten: --out must be new, empty, or this command's own earlier output
(then pass --overwrite); the model and the data are never valid outputs.

Exit codes: 0 done; 1 verify found violations; 2 unusable input (the message says what and how
to fix it); 3 training diverged (nothing written); 4 a frozen tensor moved (nothing written);
70 internal error (a bug: rerun with --debug and report the traceback); 130 interrupted.
"""

EXIT_USAGE, EXIT_DIVERGED, EXIT_ENFORCEMENT, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 3, 4, 70, 130


def _add_preset(p):
    p.add_argument("--preset", choices=list(PRESETS),
                   help="check that --model is this model (family, native resolution, objective, text width, "
                        "latent channels, depth, guidance embedding) before starting, and take its published "
                        "training settings for every flag not typed")


def _check_preset(args):
    """--preset: check the model folder, then take the preset's settings for untyped flags."""
    if getattr(args, "preset", None):
        if args.model is None:
            raise ValueError("--preset checks the --model folder: pass --model")
        preset = get_preset(args.preset)
        check_model(preset, args.model)
        sub = next(a for a in build_parser()._actions if a.dest == "command").choices[args.command]
        apply_preset(preset, args.command, args, {a.dest: a.default for a in sub._actions})


def _add_common_train(p):
    p.add_argument("--model", required=True, help="local diffusers pipeline folder (the base model)")
    _add_preset(p)
    p.add_argument("--caption-column", default="text", help="caption column of the data (default text)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--work-dir", help="where checkpoints and logs go (default: next to --out, suffixed .work)")


def _add_out(p, what: str, replaces: str):
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--overwrite", action="store_true", help=f"replace {replaces} (never anything else)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freezeasguard", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_learn_parser(sub)
    _add_finetune_parser(sub)
    _add_verify_parser(sub)
    _add_generate_parser(sub)
    cli_mask.add_parsers(sub)
    _add_tiny_pipeline_parser(sub)
    cli_experiment.add_parsers(sub)
    cli_service.add_parsers(sub)
    return parser


def _add_learn_parser(sub):
    """`freezeasguard learn`: its subcommand and flags."""
    p = sub.add_parser("learn", help="learn a freezing mask (bilevel optimisation, Algorithm 1)",
                       description="Learn which denoiser tensors to freeze. A warm start (full fine-tuning on illegal "
                                   "+ innocent data) gives theta_ft, then K mask updates each follow L simulated-user "
                                   "steps. The final mask freezes exactly round(ratio * N) tensors (top-k logits), "
                                   "or a parameter budget with --budget params.")
    _add_common_train(p)
    p.add_argument("--illegal", required=True, help="data of the illegal domain (e.g. one person's portraits)")
    p.add_argument("--illegal-subject", help="keep only rows whose 'name' column equals this")
    p.add_argument("--innocent", required=True, action="append", help="data of an innocent domain (repeatable)")
    _add_out(p, "mask file to write (.safetensors)", "an existing --out file")
    p.add_argument("--finetuned", help="reuse this fully fine-tuned pipeline/UNet as theta_ft (skips the warm start)")
    p.add_argument("--tensorboard", help="write TensorBoard logs to this folder")
    add_flags(p.add_argument_group("mask learning (each flag is a field of LearnConfig)"), LearnConfig)


def _add_finetune_parser(sub):
    """`freezeasguard finetune`: its subcommand and flags."""
    p = sub.add_parser("finetune", help="guarded fine-tuning that enforces a freezing scheme",
                       description="Fine-tune the UNet (AdamW by default) on one dataset while the chosen tensors stay "
                                   "frozen: they get requires_grad=False, are in no optimizer group, and are "
                                   "checked bit for bit against the base model afterwards (the run fails if one "
                                   "moved). Writes a from_pretrained-loadable pipeline folder and a manifest.")
    _add_common_train(p)
    p.add_argument("--data", required=True, help="training data (image folder or saved dataset)")
    p.add_argument("--subject", help="keep only rows whose 'name' column equals this")
    p.add_argument("--prior-data", help="DreamBooth's prior preservation: images of the subject's class (an image "
                                        "folder, e.g. the base model's samples of 'a photo of a person'), a batch "
                                        "of them every step, their loss weighted by --prior-weight")
    _add_out(p, "output pipeline folder (new, or an earlier finetune output with --overwrite)",
             "an earlier output of finetune in --out")
    scheme = p.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--mask", help="a learned mask file")
    scheme.add_argument("--random-ratio", type=float, help="freeze exactly round(R * N) random tensors (seeded)")
    scheme.add_argument("--full", action="store_true", help="no freezing")
    p.add_argument("--budget", choices=BUDGETS, default="tensors", help="for --random-ratio")
    add_flags(p.add_argument_group("fine-tuning (each flag is a field of FinetuneConfig)"), FinetuneConfig)
    add_flags(p.add_argument_group("guarded LoRA (each flag is a field of LoraSettings): adapters only on modules "
                                   "the mask leaves trainable; --out then holds pytorch_lora_weights.safetensors"),
              LoraSettings)


def _add_verify_parser(sub):
    """`freezeasguard verify`: its subcommand and flags."""
    p = sub.add_parser("verify", help="audit fine-tuned checkpoints or LoRA files against a mask (and its base model)",
                       description="Exit 0: nothing frozen is changed. Exit 1: violations (listed). Exit 2: unusable "
                                   "input (missing, truncated or non-finite files, a checkpoint whose layout cannot be "
                                   "told, a mask or adapter for another model, adapter keys of no known pattern). "
                                   "Checkpoints are read one tensor at a time: diffusers folders and state files; "
                                   "single files in the original layouts (SD/SDXL's LDM model.diffusion_model."
                                   "input_blocks... as A1111, ComfyUI, Forge and kohya save them; FLUX.1 and FLUX.2 in "
                                   "Black Forest Labs' layout; SD3/SD3.5 in Stability AI's; Z-Image in its authors'), "
                                   "fused q/k/v compared per part, a tensor of another shape than its layout exit 2; "
                                   "fp32/fp16/bf16/fp8 and ComfyUI's scaled fp8 (the base at the file's scale, bit for "
                                   "bit); GGUF in city96's layout (Q8_0-Q5_1 bit for bit against the gguf package's "
                                   "quantizer, Q2_K-Q6_K within the type's rounding bound, per tensor in --report). "
                                   "Without --model the mask's digests are the reference (scaled fp8, K-quants: --model). --lora reads LoRA files in the diffusers/peft format "
                                   "(unet.<module>.lora_A.weight), kohya's (lora_unet_<module>.lora_down.weight, "
                                   ".alpha), LyCORIS' (LoCon, LoHa hada_*, LoKr lokr_*, DoRA dora_scale, diff/diff_b) "
                                   "and ComfyUI's (diffusion_model.<module>), on diffusers' or the original layouts' "
                                   "module names, and maps every key to the parameters it changes.")
    p.add_argument("--model", help="the base model the mask was made for; without it, the digests the mask records "
                                   "(`mask record`) are the reference, and nothing but the candidate is read")
    _add_preset(p)
    p.add_argument("--mask", required=True, help="mask file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--candidate", help="fine-tuned pipeline folder, UNet folder, a .safetensors UNet state dict, "
                                          "a single-file checkpoint (SD/SDXL, FLUX.1/2, SD3/3.5, Z-Image; with or "
                                          "without VAE and text encoders; fp8 and scaled fp8 too), a .gguf file, or a "
                                          "guarded-LoRA output folder (its adapter is audited as with --lora)")
    what.add_argument("--lora", help="a LoRA / LyCORIS adapter file (.safetensors)")
    what.add_argument("--candidates", help="a folder of uploads (.safetensors and .gguf files and model folders, checkpoints "
                                           "and adapters mixed): a verdict each, in --report (JSON, and CSV beside "
                                           "it); exit 0 all compliant, 1 any violation, 2 any unreadable")
    p.add_argument("--tolerance", action="store_true",
                   help="accept frozen tensors within --atol of the base rounded to the candidate's precision (by "
                        "default they must be that rounding bit for bit, which an honest fp16/bf16 export is); "
                        "--atol above 0 needs --model")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance in tolerance mode (default 0)")
    p.add_argument("--report", help="write the report as JSON here")


def _add_generate_parser(sub):
    """`freezeasguard generate`: its subcommand and flags."""
    p = sub.add_parser("generate", help="generate images from a pipeline folder with its own scheduler "
                                        "(PNDM for SD, as the paper)")
    p.add_argument("--model", required=True, help="pipeline folder (base or fine-tuned)")
    _add_preset(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help="a text file with one prompt per line")
    _add_out(p, "image folder to write (PNGs, metadata.jsonl, grid.png, prompts.json)",
             "an earlier output of generate in --out")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--resolution", type=int, default=0,
                   help="image side in px (default 0: the model's own; Qwen-Image folders name none: 1024)")
    p.add_argument("--device", default="auto")


def _add_tiny_pipeline_parser(sub):
    """`freezeasguard tiny-pipeline`: its subcommand and flags."""
    p = sub.add_parser("tiny-pipeline", help="write a small random pipeline of any family (for trying things)")
    p.add_argument("--out", required=True)
    p.add_argument("--family", choices=list(FAMILIES), default="sd",
                   help="sd (default; --layout, --prediction-type apply), or a tiny sdxl, sd3, flux, flux2, "
                        "qwenimage, zimage pipeline (16 px; train and generate it with --resolution 16)")
    p.add_argument("--layout", choices=["sd15", "mini"], default="sd15",
                   help="sd15: SD v1.5 block layout, 686 tensors (default); mini: 2 blocks")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--seed", type=int, default=0)


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
    cfg = from_args(LearnConfig, args)
    result = learn_mask(args.model, args.illegal, args.innocent, args.out, cfg, illegal_subject=args.illegal_subject,
                        finetuned_dir=args.finetuned, work_dir=args.work_dir, resume=args.resume,
                        caption_column=args.caption_column, tensorboard_dir=args.tensorboard, overwrite=args.overwrite)
    m = result.mask
    last = result.history[-1] if result.history else {}
    print(f"mask: {int(m.frozen.sum())}/{len(m.names)} tensors frozen = {m.tensor_ratio:.1%} of tensors, "
          f"{m.param_fraction:.1%} of parameters ({cfg.budget} budget, target {cfg.ratio:.1%})\n"
          f"soft ratio {last.get('soft_ratio', float('nan')):.3f}, hard ratio {last.get('hard_ratio', float('nan')):.3f} "
          f"after {len(result.history)} updates in {result.seconds:.1f}s -> {args.out}")
    return 0


def cmd_finetune(args) -> int:
    _check_preset(args)
    cfg = from_args(FinetuneConfig, args)
    lora = from_args(LoraSettings, args)
    mask = Mask.load(args.mask) if args.mask else None
    r = guarded_finetune(args.model, args.data, args.out, cfg, mask=mask, random_ratio=args.random_ratio,
                         full=args.full, budget=args.budget, subject=args.subject, caption_column=args.caption_column,
                         resume=args.resume, work_dir=args.work_dir, overwrite=args.overwrite,
                         lora=lora, prior_data=args.prior_data)
    if r.already_complete:
        print(f"{r.out_dir} is already complete ({cfg.steps} steps, same inputs and settings): left as it is")
        return 0
    last = r.history[-1]["loss_data"] if r.history else float("nan")
    what = f"a rank-{lora.rank} LoRA" if lora.rank else "the denoiser"
    print(f"fine-tuned {what} ({r.scheme}: {r.frozen_tensors} tensors frozen, {r.frozen_param_fraction:.1%} of "
          f"parameters), {len(r.history)} steps in {r.seconds:.1f}s, last loss {last:.4f}; frozen tensors checked "
          f"unchanged -> {r.out_dir}")
    return 0


def cmd_verify(args) -> int:
    _check_preset(args)
    if args.candidates:
        rows = audit_folder(args.candidates, args.mask, args.model, "tolerance" if args.tolerance else "exact",
                            args.atol, args.report)
        c = counts(rows)
        print(f"{len(rows)} uploads: " + ", ".join(f"{n} {v}" for v, n in c.items()) +
              (f"; report: {args.report} (and {Path(args.report).with_suffix('.csv')})" if args.report else ""))
        for r in rows:
            if r["verdict"] != "compliant":
                print(f"  {r['file']}: {r['verdict']}" + (f" ({r['first_violation'] or r['message']})"))
        return batch_exit_code(rows)
    if not args.lora and args.candidate and (Path(args.candidate) / LORA_FILE).is_file():
        args.lora = str(Path(args.candidate) / LORA_FILE)    # a guarded-LoRA output folder: audit its adapter
    if args.lora:
        adapter = verify_adapter(args.model, args.mask, args.lora)
        if args.report:
            atomic_write_json(args.report, adapter.to_dict())
        print(report_text(adapter))
        if adapter.unknown and not adapter.frozen_changed:
            return EXIT_USAGE         # not certified: some keys could not be read
        return EXIT_COMPLIANT if adapter.compliant else EXIT_VIOLATIONS
    report = verify_checkpoint(args.model, args.mask, args.candidate, "tolerance" if args.tolerance else "exact",
                               args.atol)
    if args.report:
        atomic_write_json(args.report, report.to_dict())
    if report.compliant:
        changed = (f"{report.trainable_changed}/{report.trainable_total} trainable tensors changed"
                   if report.trainable_total is not None else "trainable tensors not compared (no base model)")
        print(f"COMPLIANT: all {report.frozen_checked} frozen tensors match the "
              f"{'base model' if args.model else 'digests the mask records'} ({report.mode} mode, {report.layout} "
              f"layout); {changed}.")
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
    files = generate_to_folder(args.model, _read_prompts(args), args.out, args.steps, args.seed, args.guidance,
                               args.num_images, resolve_device(args.device), overwrite=args.overwrite,
                               side=args.resolution or None)
    print(f"wrote {len(files)} images and grid.png to {args.out}")
    return 0


def cmd_tiny(args) -> int:
    if Path(args.out).exists():
        raise ValueError(f"--out {args.out} exists; tiny-pipeline writes a new folder only (choose another path)")
    if args.family != "sd":
        out = save_tiny(args.out, args.family, seed=args.seed)
        print(f"wrote a tiny {args.family} pipeline to {out}")
        return 0
    out = save_tiny_pipeline(args.out, layout=args.layout, image_size=args.image_size,
                             prediction_type=args.prediction_type, seed=args.seed)
    print(f"wrote a tiny {args.layout} pipeline to {out}")
    return 0


COMMANDS = {"learn": cmd_learn, "finetune": cmd_finetune, "verify": cmd_verify, "generate": cmd_generate,
            "tiny-pipeline": cmd_tiny}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        # under accelerate launch only rank 0 reports; the others stay quiet unless something fails
        sys.stdout = open(os.devnull, "w")
        args.verbose = False
        logging.getLogger().setLevel(logging.WARNING)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # the libraries' notices a user cannot act on (transformers: "requires torchvision ... falling
        # back to ...Pil"; diffusers: "No LoRA keys associated to CLIPTextModel") stay off the screen;
        # through their own environment switches, read when each first configures its logger (so
        # also in worker processes), rather than by importing them here: diffusers' import is ~3 s
        # that `mask`, `verify` and `--help` never need
        for switch in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(switch, "error")
    # the objects the imports made (torch, diffusers: ~4x10^5) live as long as the process; frozen,
    # the collector stops walking them (a full collection took 0.2 s of a 0.37 s verify of SD 1.5)
    gc.freeze()
    try:
        return {**COMMANDS, **MASK_COMMANDS, **EXPERIMENT_COMMANDS, **SERVICE_COMMANDS}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: checkpoints written so far are kept; rerun with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:    # every error ends in one paragraph and a documented exit code
        if args.debug:
            traceback.print_exc()
        code, kind = error_kind(exc)
        logger.debug("error", exc_info=True)
        print(f"error: {kind}{exc}" + ("" if code != EXIT_INTERNAL or args.debug else
                                        "\n(a bug in freezeasguard: rerun with --debug and report the traceback)"),
              file=sys.stderr)
        return code


def error_kind(exc: BaseException) -> tuple[int, str]:
    """Exit code and a prefix for an exception (see the exit codes in --help)."""
    if isinstance(exc, DivergedError):
        return EXIT_DIVERGED, ""
    if isinstance(exc, EnforcementError):
        return EXIT_ENFORCEMENT, ""
    if isinstance(exc, MemoryError):
        return EXIT_USAGE, "out of memory: lower --batch-size or use --gradient-checkpointing. "
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return EXIT_USAGE, "the disk is full: free space or choose another --out (nothing was replaced). "
    if isinstance(exc, (ValueError, OSError)):     # DataError, MaskError, ModelError, OutputError, missing files
        return EXIT_USAGE, ""
    return EXIT_INTERNAL, f"internal error ({type(exc).__name__}): "


if __name__ == "__main__":
    sys.exit(main())
