"""Benchmark: the CLI's own cost: `rex --version`, `rex validate` of the webstack playbook, and
`rex plan` / `rex plan --json` of 10,000 hosts x 5 programs.

Usage: python3 bench/cli_start.py [--repeat 7]

Each command runs as a fresh `python3 -c` process (as the `rex` entry point would), --repeat
times; the table shows the median wall time and the median CPU time of the process (user +
sys, from wait4), which moves less than wall time on a busy machine. Targets (issue 21):
--version < 0.15 s, validate < 0.25 s, plan --json of 10k hosts < 1 s wall.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from plan_scale import manifest_yaml  # noqa: E402

ENTRY = "import sys; from rexplan.cli.rex import main; sys.exit(main())"


def once(argv: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one `rex ARGV` process, its output thrown away."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", ENTRY, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr else b""
    if proc.returncode != 0:
        raise SystemExit(f"rex {' '.join(argv)} exited {proc.returncode}: {err.decode()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "fleet-10k.yaml"
        big.write_text(manifest_yaml(10_000, 5, explicit=False))
        cases = [
            ("rex --version", ["--version"]),
            ("rex validate webstack", ["validate", "playbooks/webstack.yaml"]),
            ("rex plan 10k x 5", ["plan", str(big)]),
            ("rex plan --json 10k x 5", ["plan", "--json", str(big)]),
        ]
        print(f"{'command':<26} {'wall median':>12} {'cpu median':>11}   (n={args.repeat})")
        for name, argv in cases:
            runs = [once(argv) for _ in range(args.repeat)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            print(f"{name:<26} {wall:>11.3f}s {cpu:>10.3f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
