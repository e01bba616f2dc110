"""The mask side of the freezeasguard command: mask show | export | record. (cli.py adds this
parser and dispatches here.)"""
from __future__ import annotations

import json
import sys

from freezeasguard.exports import FORMATS as EXPORT_FORMATS
from freezeasguard.exports import export as export_mask
from freezeasguard.io import atomic_write_text
from freezeasguard.guard.mask import Mask
from freezeasguard.outputs import prepare_output_file
from freezeasguard.audit.verify import record_digests


def add_parsers(sub):
    """`freezeasguard mask`: its subcommand and flags."""
    p = sub.add_parser("mask", help="inspect a mask file")
    msub = p.add_subparsers(dest="mask_command", required=True, metavar="ACTION")
    s = msub.add_parser("show", help="summary by kind and block; plot; export")
    s.add_argument("mask", help="mask file")
    s.add_argument("--plot", help="write a Figure 16-style PNG of the mask")
    s.add_argument("--export", choices=["names", "regex"],
                   help="print the frozen names, one per line, or a regex matching exactly them")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    e = msub.add_parser("export", help="the fragment a trainer reads to keep adapters off frozen modules",
                        description="peft: LoraConfig target_modules (a full-match regex of the allowed modules) and "
                                    "exclude_modules (the frozen ones), as JSON. diffusers: the value of --lora_layers "
                                    "for diffusers' LoRA training scripts. onetrainer: layer_filter + "
                                    "layer_filter_regex. ai-toolkit: network_kwargs.only_if_contains. kohya: block "
                                    "learning-rate weights for --network_args (rounded to blocks, freezing more). "
                                    "An adapter-able "
                                    "module (Linear, Conv2d) is allowed when every parameter it has is trainable "
                                    "under the mask; each export selects exactly those under the tool's own matching "
                                    "rule.")
    r = msub.add_parser("record", help="record digests of the frozen tensors, so that verify needs no base model",
                        description="Writes a copy of the mask with, per frozen tensor, a digest of its bytes in the "
                                    "base's dtype and rounded to fp32/fp16/bf16, the base's tensor names and the "
                                    "denoiser's config (which maps single-file checkpoints). The base is read one "
                                    "tensor at a time and must be the mask's (checked).")
    r.add_argument("mask", help="mask file")
    r.add_argument("--model", required=True, help="the base model the mask was made for")
    r.add_argument("--out", required=True, help="the new mask file")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file made by this command")
    e.add_argument("mask", help="mask file")
    e.add_argument("--format", required=True, choices=list(EXPORT_FORMATS))
    e.add_argument("--out", help="write the fragment to this file (default: print it)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def cmd_mask(args) -> int:
    mask = Mask.load(args.mask)
    if args.mask_command == "record":
        out = prepare_output_file(args.out, {"mask": args.mask, "--model": args.model}, args.overwrite)
        recorded = record_digests(mask, args.model)
        recorded.save(out)
        print(f"wrote {out}: digests of {len(recorded.frozen_names)} frozen tensors; `verify --mask {out} "
              f"--candidate X` now needs no --model")
        return 0
    if args.mask_command == "export":
        result = export_mask(mask, args.format)
        if args.out:
            atomic_write_text(prepare_output_file(args.out, {"mask": args.mask}, args.overwrite), result.fragment + "\n")
            print(f"wrote {args.out}; {result.how_to_use}")
        else:
            print(result.fragment)
            print(f"# {result.how_to_use}", file=sys.stderr)
        return 0
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


COMMANDS = {"mask": cmd_mask}
