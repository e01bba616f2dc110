"""The times README.md gives, measured: the demo (its first command after the install), the quick
demo, the test command and the end-to-end tests, each run here in turn with nothing else
running. Writes experiments/results/readme-times/times.json and times.md (README's table), a row
per command and kind of machine (processor, clock, AVX-512 or not).

    python scripts/time_readme_commands.py [--only demo,tests] [--install]

--install also times a fresh install into a new virtual environment (pip's cache makes it
faster on a second try; the number says what this machine took, not what a first visit takes).
Run it from a checkout whose .venv is installed (README's first command).
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "readme-times"
LOGS = ROOT / "runs" / "readme-times"      # each command's log and output folder (not committed)
VENV = ROOT / ".venv" / "bin"


def commands(tmp: Path, outputs: Path = Path("out")) -> dict[str, tuple[str, list[str]]]:
    """name -> (what README calls it, the command line)."""
    return {
        "install": ("install (a new virtual environment, torch first)",
                    ["bash", "-c", f"python3 -m venv {tmp}/venv && {tmp}/venv/bin/pip install -q torch==2.13.0 && "
                                   f"{tmp}/venv/bin/pip install -q -e '.[test]'"]),
        "demo": ("`freezeasguard demo`", [str(VENV / "freezeasguard"), "demo", "--out", str(outputs / "demo")]),
        "quick": ("`freezeasguard demo --quick`", [str(VENV / "freezeasguard"), "demo", "--quick", "--out",
                                                   str(outputs / "quick")]),
        # --durations only prints the slowest tests at the end (what to look at when the time grows)
        "tests": ("`python -m pytest -q`", [str(VENV / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                            "--durations=40"]),
        "slow": ("`python -m pytest -q -m slow -n 2` (as .ci/run)", ["env", "OMP_NUM_THREADS=1", str(VENV / "python"),
                                                                    "-m", "pytest", "-q", "-m", "slow", "-n", "2",
                                                                    "-p", "no:cacheprovider"]),
    }


def cpu_model() -> str:
    """The processor, as /proc/cpuinfo names it, and its clock: machines of one kind differ (a
    2.0 GHz EPYC without AVX-512 ran the demo's fine-tunes 3.5x slower than 2026-12-04's)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info if line.startswith(key)), "")
    mhz = field("cpu MHz")
    # the two kinds of this machine seen so far share a name and a clock and differ here: one
    # training step of the demo's UNet took 107 ms with AVX-512 and 288 ms without
    avx512 = "AVX-512" if "avx512f" in field("flags").split() else "no AVX-512"
    return field("model name") + (f" {float(mhz) / 1000:.1f} GHz" if mhz else "") + f", {avx512}"


def timed(cmd: list[str], log: Path) -> tuple[float, int]:
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return time.time() - t, rc


def table(record: dict) -> str:
    lines = ["| command | seconds | minutes | measured |", "|---|---|---|---|"]
    for row in record["commands"]:
        cpu = f"{row['cpu']}, " if row.get("cpu") else ""
        lines.append(f"| {row['what']} | {row['seconds']:.0f} | {row['seconds'] / 60:.1f} | {row['date']}, "
                     f"{row['cpus']} cores, {cpu}{row['commit']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated: install, demo, quick, tests, slow (default: all but install)")
    ap.add_argument("--install", action="store_true", help="also time a fresh install")
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else (["install"] if a.install else []) + ["demo", "quick", "tests", "slow"]
    OUT.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    previous = json.loads((OUT / "times.json").read_text()) if (OUT / "times.json").exists() else {"commands": []}
    # one row per command and kind of machine: a time measured on another kind is added, not replaced
    kept = {(row["name"], row.get("cpu", "")): row for row in previous["commands"]}
    cpu = cpu_model()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    outputs = LOGS / "out"      # the commands' own outputs (the demo's report), kept to read
    for name in names:
        if (outputs / name).exists():
            shutil.rmtree(outputs / name)       # this script's own earlier output
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            what, cmd = commands(Path(tmp), outputs)[name]
            seconds, rc = timed(cmd, LOGS / f"{name}.log")
            print(f"{name}: {seconds:.0f} s (exit {rc})", file=sys.stderr)
            if rc != 0:
                print(f"{name} failed: see {LOGS / f'{name}.log'}", file=sys.stderr)
                return 1
            kept[name, cpu] = {"name": name, "what": what, "seconds": round(seconds, 1),
                               "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "cpu": cpu,
                               "commit": commit}
            # kept as it goes (a later failure loses nothing); times.md, which README shows and the
            # tests compare with README, is written once at the end
            (LOGS / "times.partial.json").write_text(json.dumps(list(kept.values()), indent=2) + "\n")
    order = list(commands(Path("."))).index
    record = {"commands": sorted(kept.values(), key=lambda r: (order(r["name"]), r.get("cpu", "")))}
    (OUT / "times.json").write_text(json.dumps(record, indent=2) + "\n")
    (OUT / "times.md").write_text(table(record))
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
