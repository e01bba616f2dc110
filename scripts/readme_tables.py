"""Result tables in README.md (and docs/) are generated from the results.md files the runs wrote,
never typed by hand. A block

    <!-- results: experiments/results/demo-cast0-logos/results.md -->
    ...(replaced)...
    <!-- /results -->

is filled with that file's table and its notes. `--check` exits 1 where a block differs from
its file (the test suite runs it).

    python scripts/readme_tables.py [--check] [README.md docs/experiments.md ...]
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def table_of(path: Path) -> str:
    """The results.md without its first line (the run's description, said in the prose instead)."""
    if not path.exists():
        sys.exit(f"{path.relative_to(ROOT)}: no such results file; run the script that writes it first "
                 "(experiments/paper_tables.py, experiments/guard_tables.py, ...)")
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), 0)   # no table yet: all of it
    return "\n".join(lines[start:]).strip() + "\n"


def fill(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table_of(ROOT / m.group("path")) + m.group(4), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", default=["README.md", "docs/guard.md", "docs/experiments.md", "docs/algorithm.md", "docs/audit.md",
                                                    "docs/paper.md", "benchmarks/RESULTS.md"])
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    stale = []
    for name in a.files:
        path = ROOT / name
        if not path.exists():
            continue
        text = path.read_text()
        new = fill(text)
        if new != text:
            stale.append(name)
            if not a.check:
                path.write_text(new)
    if a.check and stale:
        print(f"result tables differ from their results.md files in: {', '.join(stale)}; run scripts/readme_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
