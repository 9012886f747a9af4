"""``--load loadavg|cgroup SECONDS``: what a placement candidate has to spare, measured from
/proc/loadavg or the CPU usage and limits of the agent's cgroup v2."""

from __future__ import annotations

import os
import time

from rexplan.remote.agent.cgroup import _mounted, _read_text, _v2_path
from rexplan.remote.agent.failure import _suppress
from rexplan.remote.agent.files import _free_mb

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _measured_cgroup(root: str = "") -> tuple[str, str]:
    """(the cgroup v2 directory a ``load: cgroup`` host is measured by, the cgroup2 mount
    point it is under), from /proc under ``root``; ValueError saying why there is none."""
    path = _v2_path(_read_text(root + "/proc/self/cgroup"))
    if path is None:
        raise ValueError("no cgroup v2 of this login in /proc/self/cgroup")
    parts = path.split("/")
    for i, part in enumerate(parts):
        # a systemd inside the container puts each login in a slice: the container's own
        # cgroup is the root of that slice tree
        if part in ("user.slice", "system.slice"):
            parts = parts[:i]
            break
    path = "/".join(parts) or "/"
    found = _mounted(path, _read_text(root + "/proc/self/mountinfo"))
    if found is None:
        raise ValueError(f"no cgroup2 mount shows {path}")
    return os.path.normpath(root + found[0]), os.path.normpath(root + found[1])


def _usage_usec(directory: str) -> int:
    with open(directory + "/cpu.stat", "rb") as f:
        for line in f:
            if line.startswith(b"usage_usec "):
                return int(line.split()[1])
    raise ValueError(f"no usage_usec in {directory}/cpu.stat")


def _cgroup_room(directory: str, top: str) -> tuple[float, int | None]:
    """(CPUs, MiB of memory or None) that the cpu.max and memory.max of cgroup ``directory``
    and of its ancestors up to the mount point ``top`` leave it; the files are absent where
    a controller is off."""
    cpus, free = float(len(os.sched_getaffinity(0))), None
    while True:
        with _suppress(OSError):
            with open(directory + "/cpu.max", "rb") as f:
                quota, period = f.read().split()
            if quota != b"max":
                cpus = min(cpus, int(quota) / int(period))
        with _suppress(OSError):
            with open(directory + "/memory.max", "rb") as f:
                limit = f.read().strip()
            if limit != b"max":
                with open(directory + "/memory.current", "rb") as f:
                    used = int(f.read())
                left = max(0, int(limit) - used) // 1048576
                free = left if free is None else min(free, left)
        if len(directory) <= len(top):
            return cpus, free
        directory = os.path.dirname(directory)


def load_report(mode: str, sample: float, root: str = "") -> dict[str, Any]:
    """``--load MODE SECONDS`` (rexplan.engine.executor.parse_load reads it): ``load`` (runnable
    tasks, or busy CPUs), ``cpus`` (those it may use), ``free_mb``, ``source`` and, when MODE
    is cgroup but the cgroup could not be read, ``fallback`` (why). loadavg reads only
    /proc/meminfo besides the load average; cgroup also samples its cgroup's CPU time over
    ``sample`` seconds. ``root``: where /proc and /sys are."""
    free = _free_mb(root) or 0
    out: dict[str, Any] = {
        "load": os.getloadavg()[0],
        "cpus": os.cpu_count() or 1,
        "free_mb": free,
        "source": "loadavg",
    }
    if mode != "cgroup":
        return out
    try:
        directory, top = _measured_cgroup(root)
        cpus, room = _cgroup_room(directory, top)
        start, before = time.monotonic(), _usage_usec(directory)
        time.sleep(sample)
        used = _usage_usec(directory) - before
        busy = used / 1e6 / max(time.monotonic() - start, 1e-6)
    except (OSError, ValueError) as exc:
        out["fallback"] = str(exc)
        return out
    out.update(load=busy, cpus=cpus, source="cgroup")
    if room is not None:
        out["free_mb"] = min(free, room) if free else room
    return out
