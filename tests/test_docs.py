"""The docs tell the truth: result tables come from the results files, the commands exist."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_result_tables_are_the_results_files():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_tables.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_blocks_name_existing_results_files():
    import re
    for doc in ("README.md", "docs/experiments.md", "docs/algorithm.md", "benchmarks/RESULTS.md"):
        path = ROOT / doc
        if path.exists():
            for name in re.findall(r"<!-- results: (\S+) -->", path.read_text()):
                assert (ROOT / name).is_file(), f"{doc} cites {name}, which does not exist"
