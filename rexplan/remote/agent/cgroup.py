"""Containment: the program's own cgroup v2 and the launch watchdog.

Where the host delegates the agent's cgroup v2 to its user (delegated_cgroup), each program runs
in a cgroup of its own, ``rex-<program>-<run>-<random>``, joined between fork and exec and named
in the record: a stop ends what is in it too (``force``: cgroup.kill), and removes it. If front
and supervisor are both SIGKILLed before ``ok``, the watchdog (a small forked process in a
session of its own) ends the program's group.
"""

from __future__ import annotations

import os
import select
import sys
import time

from rexplan.remote.agent.failure import _POLL, EXIT_START, Failure, _suppress
from rexplan.remote.agent.groups import (
    _signal_all,
    _stat_fields,
    _tagged_groups,
    cgroup_pids,
    kill_group,
)
from rexplan.wire.launch import Launch

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal


class _Cgroup:
    """The program's own cgroup v2 directory, in its supervisor, when the host delegates a
    cgroup to this user (None: it does not), and an fd on its cgroup.procs that each spawned
    child writes itself into before it execs."""

    path: str | None = None
    procs = -1


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return ""


def _unescape(field: str) -> str:
    """A path from /proc/PID/mountinfo, where the kernel writes space, tab, newline and
    backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _cgroup2_mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(root within the hierarchy, mount point) of each cgroup2 mount: /sys/fs/cgroup on a
    unified host, /sys/fs/cgroup/unified on a hybrid one."""
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and right.split(" ", 1)[0] == "cgroup2" and len(fields) >= 5:
            mounts.append((_unescape(fields[3]), _unescape(fields[4])))
    return mounts


def _v2_path(cgroups: str) -> str | None:
    """The cgroup v2 path that /proc/PID/cgroup (``cgroups``) names in its ``0::`` line;
    None when there is none a mount could show."""
    path = ""
    for line in cgroups.splitlines():
        if line.startswith("0::"):
            path = line[3:]
    if not path.startswith("/") or ".." in path.split("/"):
        return None  # "/../x": outside this cgroup namespace, so no mount shows it
    return path


def _mounted(path: str, mountinfo: str) -> tuple[str, str] | None:
    """(directory, mount point) of cgroup v2 ``path`` under the first cgroup2 mount that
    shows it; None when none does."""
    for root, point in _cgroup2_mounts(mountinfo):
        if root == "/":
            rel = path
        elif path == root or path.startswith(root + "/"):
            rel = path[len(root) :]
        else:
            continue
        return os.path.normpath(point + "/" + rel), point
    return None


def cgroup_dir(cgroups: str, mountinfo: str) -> str | None:
    """The directory of the cgroup v2 that /proc/PID/cgroup (``cgroups``) names in its
    ``0::`` line, under a cgroup2 mount that shows it; None when there is none."""
    path = _v2_path(cgroups)
    found = None if path is None else _mounted(path, mountinfo)
    return None if found is None else found[0]


def _own_cgroup() -> str | None:
    return cgroup_dir(_read_text("/proc/self/cgroup"), _read_text("/proc/self/mountinfo"))


def _marked_delegated(path: str) -> bool:
    """systemd marks a cgroup it delegates (Delegate=yes) with this xattr."""
    for name in ("trusted.delegate", "user.delegate"):
        with _suppress(OSError):
            if os.getxattr(path, name) == b"1":
                return True
    return False


def delegated_cgroup() -> str | None:
    """This process's cgroup v2 directory when it is delegated to this user (cgroup v2
    delegation: the directory and its cgroup.procs belong to the user and are writable), so
    the agent may make child cgroups there; None otherwise. root, who could write anywhere,
    uses only a cgroup explicitly marked delegated: the others belong to the init system."""
    directory = _own_cgroup()
    if directory is None:
        return None
    procs = os.path.join(directory, "cgroup.procs")
    uid = os.geteuid()
    try:
        owners = {os.stat(directory).st_uid, os.stat(procs).st_uid}
    except OSError:
        return None
    if uid == 0:
        return directory if _marked_delegated(directory) else None
    if owners != {uid} or not (os.access(directory, os.W_OK) and os.access(procs, os.W_OK)):
        return None
    return directory


def _make_cgroup(launch: Launch) -> str | None:
    """Create the program's cgroup under the delegated one (see delegated_cgroup) and keep it
    in _Cgroup; None, and nothing made, where the host offers none."""
    parent = delegated_cgroup()
    if parent is None:
        return None
    # a fresh name per launch, so that what an earlier launch left there is never adopted
    path = os.path.join(parent, f"rex-{launch.log}-{launch.run[:8]}-{os.urandom(3).hex()}")
    try:
        os.mkdir(path)
    except OSError as exc:
        sys.stderr.write(f"rex: no cgroup for the program: {exc.strerror}\n")
        return None
    try:
        _Cgroup.procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        sys.stderr.write(f"rex: no cgroup for the program: {exc.strerror}\n")
        remove_cgroup(path)
        return None
    _Cgroup.path = path
    return path


def _drop_cgroup() -> None:
    """Forget the program's cgroup and remove it when nothing runs in it any more."""
    if _Cgroup.procs >= 0:
        os.close(_Cgroup.procs)
        _Cgroup.procs = -1
    if _Cgroup.path is not None and remove_cgroup(_Cgroup.path):
        _Cgroup.path = None


def cgroup_kill(path: str, within: float = 2.0) -> list[int]:
    """SIGKILL every process in cgroup ``path`` at once and wait (up to ``within``) until none
    is left. cgroup.kill (Linux >= 5.14) kills atomically, forks in flight included; without
    it each listed pid is killed until the list stays empty. Returns the pids it found."""
    pids = cgroup_pids(path)
    if not pids:
        return []
    try:
        with open(os.path.join(path, "cgroup.kill"), "wb", buffering=0) as f:
            f.write(b"1")
        atomic = True
    except OSError:
        atomic = False
    end = time.monotonic() + within
    while True:
        left = cgroup_pids(path)
        if not left or time.monotonic() >= end:
            return pids
        if not atomic:
            _signal_all(left, signal.SIGKILL)
        time.sleep(_POLL)


def remove_cgroup(path: str) -> bool:
    """rmdir cgroup ``path`` and the cgroups below it (a cgroup with processes stays);
    whether it is gone."""
    for directory, _dirs, _files in os.walk(path, topdown=False):
        with _suppress(OSError):
            os.rmdir(directory)
    return not os.path.isdir(path)


def _recorded_cgroup(record: dict[str, Any], name: str) -> str | None:
    """The cgroup a record names, if it is one the agent made for program ``name`` (so a
    damaged record cannot make a stop kill another cgroup) and it still exists."""
    path = record.get("cgroup")
    if not isinstance(path, str) or not path.startswith("/") or os.path.normpath(path) != path:
        return None
    if not os.path.basename(path).startswith(f"rex-{name}-"):
        return None
    own = _own_cgroup()
    if own is not None and (own + "/").startswith(path + "/"):
        return None  # this process runs in it: killing it all would kill the stop too
    mounts = _cgroup2_mounts(_read_text("/proc/self/mountinfo"))
    if not any(path.startswith(point.rstrip("/") + "/") for _, point in mounts):
        return None
    return path if os.path.isfile(os.path.join(path, "cgroup.procs")) else None


class _Watch:
    """The launch watchdog, in the supervisor: its pid and the write end of its pipe."""

    pid = 0
    fd = -1


def _start_watchdog(launch: Launch) -> None:
    """Fork the launch watchdog (see _watchdog) before anything is started."""
    read_end, write_end = os.pipe()  # O_CLOEXEC: no program or probe inherits them
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise Failure(EXIT_START, f"cannot fork the launch watchdog: {exc.strerror}") from None
    if pid == 0:
        try:
            os.close(write_end)
            _watchdog(launch, read_end)
        finally:
            os._exit(0)
    os.close(read_end)
    _Watch.pid, _Watch.fd = pid, write_end


def _tell_watchdog(*words: str) -> None:
    if _Watch.fd >= 0:
        # OSError: the watchdog is gone (killed): the launch goes on without it
        with _suppress(OSError):
            os.write(_Watch.fd, " ".join(words).encode() + b"\n")


def _release_watchdog() -> None:
    """The launch is verified: the watchdog exits at once and ends nothing."""
    _tell_watchdog("verified")
    if _Watch.fd >= 0:
        os.close(_Watch.fd)
        _Watch.fd = -1


def _reap_watchdog() -> None:
    end = time.monotonic() + 1.0
    while _Watch.pid:
        try:
            done = os.waitpid(_Watch.pid, os.WNOHANG)[0]
        except ChildProcessError:
            done = _Watch.pid
        if done or time.monotonic() >= end:
            _Watch.pid = 0
        else:
            time.sleep(0.002)


def _watchdog(launch: Launch, fd: int) -> None:
    """The launch watchdog: a forked child of the supervisor, in a session of its own (so a
    signal to the agent's group or session does not reach it), holding nothing but the read
    end of a pipe only the supervisor writes. The supervisor tells it the program's cgroup,
    pid and start time, then ``verified`` after ``ok``: it exits at once. End of file first
    (the supervisor died, also by SIGKILL, before ``ok``), or no verdict within the launch's
    deadlines: it ends what the launch started, as the supervisor would have, and exits.
    (PR_SET_PDEATHSIG would not do: the program must outlive its supervisor after ``ok``.)"""
    os.setsid()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    # the program's lock and log, the front's report pipe: holding any of them would keep
    # the launch's state claimed, or the front waiting
    for entry in os.listdir("/proc/self/fd"):
        if int(entry) not in (0, 1, 2, fd):
            with _suppress(OSError):
                os.close(int(entry))
    end = time.monotonic() + sum(v for _, v in launch.deadlines) + launch.deadline("stop") + 5
    pgid, start = 0, ""
    cgroup: str | None = None
    buf = b""
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            break
        if not select.select([fd], [], [], remaining)[0]:
            continue
        data = os.read(fd, 4096)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            word, _, rest = line.decode().partition(" ")
            if word == "verified":
                return
            if word == "cgroup":
                cgroup = rest
            elif word == "pid":
                pid, _, start = rest.partition(" ")
                pgid = int(pid)
    _end_launch(launch, pgid, start, cgroup)


def _end_launch(launch: Launch, pgid: int, start: str, cgroup: str | None) -> None:
    """The watchdog's cleanup of an unverified launch: the program's group (TERM, the stop
    grace, KILL), its cgroup, and any group still tagged with the run and step (a program the
    supervisor died too early to report)."""
    grace = launch.deadline("stop")
    fields = _stat_fields(pgid) if pgid > 1 else []
    # a live process with this pid but another start time has reused the number (a group's
    # id is not reused while the group has members), so that group is not ours
    if pgid > 1 and not (len(fields) > 19 and fields[19].decode("ascii") != start):
        with _suppress(Failure):
            kill_group(pgid, grace)
    if cgroup is not None:
        cgroup_kill(cgroup)
        remove_cgroup(cgroup)
    for group in sorted(_tagged_groups(launch.run, launch.step)):
        if group > 1 and group != os.getpgrp():
            kill_group(group, grace)
