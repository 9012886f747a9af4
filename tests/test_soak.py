"""Soak: cycles of `rex apply`, `rex status`, `rex stop` on 32 hosts; the launcher leaks nothing.

CI runs 5 cycles; ``REX_SOAK_CYCLES=30`` is the long opt-in run (tests/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import helpers_procs as procs
import pytest
from helpers_world import SLEEPER, World
from sshrig import RigHost, SshdRig
from test_scale import own_hosts

HOSTS = 32
CYCLES = int(os.environ.get("REX_SOAK_CYCLES", "5"))
#: cycles before the baseline: the first ones fill caches (the agent's upload and compiled code
#: on each host, imported modules, paramiko's ciphers, the allocator's arenas)
WARMUP = 2
#: RSS may move after the warm-up without a leak: CPython keeps freed arenas, and glibc's malloc
#: keeps free pages in the heaps of each run's (up to 64) worker threads; malloc_trim before
#: each sample returns most of those, and what is left drifted by under 1 MiB over 10 cycles
#: here, the Python heap (tracemalloc) staying flat. A leak of one transport (paramiko client,
#: its threads and buffers) per host and run costs several MiB per cycle on 32 hosts, past this
#: bound within the 3 measured CI cycles; the 30-cycle run holds any leak under ~0.3 MiB/cycle.
RSS_GROWTH = 8 << 20
#: seconds a finished run's threads (paramiko's, the executor's timers) get to end
THREADS_SETTLE = 5.0


@dataclass(frozen=True)
class Sample:
    """The launcher's (this process's) resources after a cycle."""

    fds: int
    rss: int
    threads: int


def sample(idle_threads: int) -> Sample:
    """Taken once the run's threads ended (they may hold sockets while they wind down)."""
    procs.wait_until(lambda: threading.active_count() <= idle_threads, THREADS_SETTLE)
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc only; RSS is then memory in use
    fds = len(os.listdir("/proc/self/fd"))
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return Sample(fds, pages * resource.getpagesize(), threading.active_count())


@pytest.fixture
def hosts(sshd_rig: SshdRig) -> Iterator[list[RigHost]]:
    """Hosts of the soak's own (tests/test_scale.py's own_hosts says why)."""
    with own_hosts(sshd_rig, HOSTS) as spawned:
        yield spawned


def cycle(world: World, m: Path, steps: set[str]) -> None:
    """One apply -> status -> stop; every step verified, running, then gone."""
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    final = run.final()
    assert set(final) == steps
    bad = {s: e for s, e in final.items() if e["state"] != "ready" or e["action"] != "started"}
    assert not bad, bad
    code, status = world.status(m)
    assert code == 0
    assert set(status) == steps
    assert {s["status"] for s in status.values()} == {"running"}, status
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    left = procs.tagged(REXTEST=world.tag) + procs.tagged(REX_RUN=run.id)
    assert left == [], procs.describe(left)


# hosts before world: the world's teardown (`rex stop` of any leftover) still finds them up
def test_soak_apply_status_stop_leaks_nothing(hosts: list[RigHost], world: World) -> None:
    assert CYCLES > WARMUP, f"REX_SOAK_CYCLES must exceed the {WARMUP} warm-up cycles"
    m = world.manifest(hosts, {"soak": {"on": [h.name for h in hosts], **SLEEPER}})
    world.distribute(m)
    steps = {f"soak@{h.name}" for h in hosts}
    # the baseline once distribute's threads wound down (a transient one here would make a
    # later sample, taken when none is left, look like a change)
    procs.wait_until(lambda: threading.active_count() <= 1, THREADS_SETTLE)
    idle = threading.active_count()
    samples: list[Sample] = []
    for _ in range(CYCLES):
        cycle(world, m, steps)
        samples.append(sample(idle))
    base = samples[WARMUP - 1]
    after = samples[WARMUP:]
    # exact: any fd or thread left per run adds up over the cycles
    assert [s.fds for s in after] == [base.fds] * len(after), samples
    assert [s.threads for s in after] == [base.threads] * len(after), samples
    assert max(s.rss for s in after) - base.rss < RSS_GROWTH, samples
