"""Every flag the command had when its surface was recorded (tests/data/cli_flags.json, written by
tests/cli_surface.py) still exists under the same subcommand with the same help, default and
choices: moving modules or adding flags must not rename or change one a user's scripts pass."""
import json
from pathlib import Path

from cli_surface import surface
from freezeasguard.cli import build_parser

RECORDED = json.loads((Path(__file__).parent / "data" / "cli_flags.json").read_text())


def changed_flags(recorded: dict, current: dict) -> list[str]:
    problems = []
    for command, flags in recorded.items():
        if command not in current:
            problems.append(f"{command}: subcommand gone")
            continue
        for flag, spec in flags.items():
            now = current[command].get(flag)
            if now is None:
                problems.append(f"{command} {flag}: gone")
            elif now != spec:
                problems.append(f"{command} {flag}: {spec} -> {now}")
    return problems


def test_no_recorded_flag_is_gone_or_changed():
    assert changed_flags(RECORDED, surface(build_parser())) == []


def test_the_comparison_sees_a_renamed_flag_and_a_changed_default():
    current = surface(build_parser())
    renamed = json.loads(json.dumps(current))
    renamed["freezeasguard learn"]["--ratioo"] = renamed["freezeasguard learn"].pop("--ratio")
    assert changed_flags(current, renamed) == ["freezeasguard learn --ratio: gone"]
    moved = json.loads(json.dumps(current))
    moved["freezeasguard finetune"]["--steps"]["default"] = "1"
    assert [p.split(":")[0] for p in changed_flags(current, moved)] == ["freezeasguard finetune --steps"]
