"""Benchmark: load + plan time and peak memory for 1k / 10k / 50k hosts x 5 programs.

Usage: python3 bench/plan_scale.py [--sizes 1000,10000,50000] [--repeat 3] [--programs 5]

Two manifest shapes per size: ``ranges`` (hosts as ``c[1-40]n[001-250]`` with templated
addresses) and ``explicit`` (one YAML entry per host). Programs form a chain of requires
(p0 <- p1 <- ...), each on every host. Times are the median of --repeat runs of
``manifest.load`` and ``plan.compile``; memory is the tracemalloc peak of one more run, taken
apart from the timed runs because tracing slows Python down. Target: 10,000 hosts x 5 programs
in under 1 s, growing linearly.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rexplan.core import manifest, plan

PER_RACK = 250


def racks(hosts: int) -> int:
    if hosts % PER_RACK:
        raise SystemExit(f"sizes must be multiples of {PER_RACK}")
    return hosts // PER_RACK


def programs_yaml(count: int) -> str:
    lines = ["programs:"]
    for i in range(count):
        lines += [
            f"  p{i}:",
            "    on: [group:compute]",
            f"    run: [daemon-{i}, --serve]",
            f"    ready: {{tcp: {9000 + i}}}",
        ]
        if i:
            lines.append(f"    requires: [p{i - 1}]")
    return "\n".join(lines)


def manifest_yaml(hosts: int, programs: int, explicit: bool) -> str:
    head = "rex: 1\ndefaults: {user: ops}\nusers:\n  ops: {}\nhosts:\n"
    if explicit:
        body = "".join(
            f"  c{r}n{n:03d}: {{address: 127.1.{r}.{n}, groups: [compute]}}\n"
            for r in range(1, racks(hosts) + 1)
            for n in range(1, PER_RACK + 1)
        )
    else:
        body = (
            f'  "c[1-{racks(hosts)}]n[001-{PER_RACK}]": '
            '{address: "127.1.{n1}.{n}", groups: [compute]}\n'
        )
    tail = f'{programs_yaml(programs)}\nauthorize: ["c*.ops.p*"]\n'
    return head + body + tail


def measure(path: Path, repeat: int) -> tuple[int, int, float, float, float]:
    """hosts, steps, median load s, median plan s, tracemalloc peak MiB."""
    loads: list[float] = []
    plans: list[float] = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        m = manifest.load(path)
        t1 = time.perf_counter()
        p = plan.compile(m)
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        plans.append(t2 - t1)
        del m, p
    gc.collect()
    tracemalloc.start()
    m = manifest.load(path)
    p = plan.compile(m)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (
        len(m.hosts),
        len(p.steps),
        statistics.median(loads),
        statistics.median(plans),
        peak / 2**20,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--programs", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    header = (
        f"{'shape':<9} {'hosts':>6} {'steps':>7} {'yaml KiB':>9} {'load s':>7} {'plan s':>7}"
        f" {'total s':>8} {'us/step':>8} {'peak MiB':>9}"
    )
    print(f"python {sys.version.split()[0]}, median of {args.repeat}, {args.programs} programs")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="rex-bench-") as tmp:
        for explicit in (False, True):
            shape = "explicit" if explicit else "ranges"
            for size in sizes:
                path = Path(tmp) / f"{shape}-{size}.yaml"
                path.write_text(manifest_yaml(size, args.programs, explicit))
                hosts, steps, load_s, plan_s, peak = measure(path, args.repeat)
                total = load_s + plan_s
                print(
                    f"{shape:<9} {hosts:>6} {steps:>7} {path.stat().st_size / 1024:>9.0f}"
                    f" {load_s:>7.3f} {plan_s:>7.3f} {total:>8.3f}"
                    f" {total / steps * 1e6:>8.1f} {peak:>9.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
