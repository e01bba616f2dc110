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
    for doc in ("README.md", "docs/experiments.md", "docs/algorithm.md", "docs/audit.md", "docs/paper.md",
                "benchmarks/RESULTS.md"):
        path = ROOT / doc
        assert path.is_file(), f"{doc} is missing"
        for name in re.findall(r"<!-- results: (\S+) -->", path.read_text()):
            assert (ROOT / name).is_file(), f"{doc} cites {name}, which does not exist"


def test_every_local_link_and_image_in_the_docs_exists():
    """A doc that points at a file (a link, an image, a result block) points at one that is there."""
    import re
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
    for path in docs:
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links {target}, which does not exist"


def test_the_readme_is_a_manual_of_at_most_250_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; long write-ups go under docs/"
