"""Process groups and tagged processes: liveness by pid + start time, killing a group (TERM,
grace, KILL), and the sweep of what still carries a triple's REX_TRIPLE tag. Process groups
<= 1 and the agent's own group are never signalled."""

from __future__ import annotations

import os
import time

from rexplan.remote.agent.failure import _POLL, EXIT_AGENT, Failure, _suppress
from rexplan.remote.agent.procs import _Proc
from rexplan.wire import chars

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is in the group (zombies cannot be killed anyway)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def kill_group(pgid: int, grace: float, proc: _Proc | None = None) -> None:
    """SIGTERM the group, wait up to ``grace``, then SIGKILL; reaps ``proc`` if given."""
    if pgid <= 1 or pgid == os.getpgrp():
        raise Failure(EXIT_AGENT, f"refusing to signal process group {pgid}")
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while True:
            if proc is not None:
                proc.poll()
            if not _group_alive(pgid):
                return
            if time.monotonic() >= end:
                break
            time.sleep(_POLL)


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode("ascii")
    except (OSError, IndexError):
        return "0"


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/PID/stat after the command name (state first); [] for a vanished process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != b"Z"


def _pid(value: Any) -> int:
    """A pid from a record; 0 (no process) for anything else."""
    return value if type(value) is int and value > 1 else 0


def same_process(pid: Any, start: Any) -> bool:
    """Whether ``pid`` is still the live process that started at ``start`` (clock ticks since
    boot): a bare pid may have been reused by another process since."""
    if type(pid) is not int or pid <= 1 or not isinstance(start, str):
        return False
    fields = _stat_fields(pid)
    return len(fields) > 19 and fields[0] != b"Z" and fields[19].decode("ascii") == start


def _tagged(triple: str) -> list[int]:
    """This user's live processes whose environment holds REX_TRIPLE=<triple>: the program and
    its descendants, also those that left its process group (they inherit the tag)."""
    tag = f"REX_TRIPLE={triple}".encode()
    me, uid = os.getpid(), os.getuid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if tag in env and _alive(int(name)):
            found.append(int(name))
    return sorted(found)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with _suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], within: float) -> None:
    end = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(_POLL)


def sweep(triple: str, grace: float, force: bool = False, cgroup: str | None = None) -> list[int]:
    """End every process tagged with ``triple``, and every process in ``cgroup`` (the
    program's own cgroup: it also holds what cleared its environment): TERM, up to ``grace``
    seconds, KILL (``force``: KILL at once). Before the KILL the set is frozen with SIGSTOP and
    listed again until no new process appears, so nothing forks its way out between the
    listing and the kill."""
    tagged = chars.TRIPLE_RE.match(triple) is not None
    if not tagged and cgroup is None:
        return []

    def listed() -> list[int]:
        found = set(_tagged(triple)) if tagged else set()
        if cgroup is not None:
            found.update(cgroup_pids(cgroup))
        return sorted(found)

    seen: set[int] = set()
    if not force:
        pids = listed()
        seen.update(pids)
        _signal_all(pids, signal.SIGTERM)
        _wait_gone(pids, grace)
    for _ in range(20):
        pids = listed()
        if not pids:
            break
        seen.update(pids)
        _signal_all(pids, signal.SIGSTOP)
        if set(listed()) - set(pids):
            continue  # a child forked meanwhile: freeze it too before anything is killed
        _signal_all(pids, signal.SIGKILL)
        _wait_gone(pids, 2.0)
    return sorted(seen)


def cgroup_pids(path: str) -> list[int]:
    """The live processes in cgroup ``path`` and its descendants (never this one)."""
    found: set[int] = set()
    for directory, _dirs, _files in os.walk(path):
        with _suppress(OSError, ValueError):
            with open(os.path.join(directory, "cgroup.procs"), "rb") as f:
                found.update(int(word) for word in f.read().split())
    me = os.getpid()
    return sorted(p for p in found if p != me and _alive(p))


def _tagged_groups(run: str, step: str) -> set[int]:
    """Process groups of this user holding a process tagged REX_RUN=run and REX_STEP=step."""
    tags = {f"REX_RUN={run}".encode(), f"REX_STEP={step}".encode()}
    groups = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != os.getuid():
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
            if tags <= env:
                groups.add(os.getpgid(int(name)))
        except OSError:
            continue
    return groups
