"""The command's flag surface (every subcommand's flags with their help, default and choices), read
from the argparse parser: `python tests/cli_surface.py > tests/data/cli_flags.json` records it, and
test_cli_surface.py checks that no recorded flag disappeared or changed meaning."""
from __future__ import annotations

import argparse
import json
import sys


def surface(parser: argparse.ArgumentParser, prefix: str = "freezeasguard") -> dict:
    """{command path: {flag: {help, default, choices}}} over every nested subcommand."""
    flags, out = {}, {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(surface(sub, f"{prefix} {name}"))
            continue
        key = "/".join(action.option_strings) or action.dest
        flags[key] = {"help": action.help, "default": repr(action.default),
                      "choices": sorted(map(str, action.choices)) if action.choices else None}
    out[prefix] = flags
    return out


if __name__ == "__main__":
    from freezeasguard.cli import build_parser
    json.dump(surface(build_parser()), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
