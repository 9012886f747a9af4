"""The no-orphans oracle: after an integration test nothing of it may run, hold a lock or linger.

``no_orphans`` (a fixture; conftest applies it to every sshd-marked test) notes what already
exists, lets the test run, then looks for what the test left behind:

- processes of the test: carrying REX_RUN of a run started in this process during the test
  (CallbackListener.start is watched), or an environment variable whose value is the oracle's
  ``tag``, or owned by a rig account without being part of an sshd session;
- sshd session processes (anything under the rig's listening sshds): every test closes its
  connections;
- in every rig REX_HOME: temporaries of atomic writes (``.*.tmp``; the agent's ``run/.NAME.*``),
  notify-socket directories (``run/n*``), and lock files some process still holds. A lock file
  itself stays by design: unlinking a flock file races with the next process opening it.

Whatever it finds gets ``grace`` seconds to go away by itself; then the test fails naming each
item, and the oracle kills the processes by pid and removes the files.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sshrig import SshdRig, descendants

from rexplan.engine.listener import CallbackListener

GRACE = 3.0


def _alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data.rsplit(b")", 1)[1].split()[0] != b"Z"


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _describe(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    return f"pid {pid}: {b' '.join(argv).decode(errors='replace')[:120]}"


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def _held_inodes() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file some process holds a lock on (/proc/locks)."""
    held = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if fields and fields[1] == "->":
                fields = fields[:1] + fields[2:]  # a waiter, listed under the holder
            with contextlib.suppress(IndexError, ValueError):
                major, minor, inode = fields[5].split(":")
                held.add((int(major, 16), int(minor, 16), int(inode)))
    return held


@dataclass
class Oracle:
    """What a test may not leave behind; see the module docstring."""

    rig: SshdRig | None
    tag: str = field(default_factory=lambda: f"oracle-{secrets.token_hex(6)}")
    runs: set[str] = field(default_factory=set)
    grace: float = GRACE

    def __post_init__(self) -> None:
        self.before = _pids()
        self.files_before = set(self._stray_files())

    def homes(self) -> list[Path]:
        """Every REX_HOME the rig's sshds set (one per host and account)."""
        if self.rig is None:
            return []
        return sorted(p for p in (Path(self.rig.base) / "state").glob("*/*") if p.is_dir())

    def _sshd_masters(self) -> set[int]:
        if self.rig is None:
            return set()
        everything = set(self.rig.pids())
        below = {child for pid in everything for child in descendants(pid)}
        return everything - below

    def sessions(self) -> tuple[list[int], set[int]]:
        """sshd processes serving a connection opened during the test, with what they started;
        and every process under the sshds.

        A connection that was there before (a module-scoped fixture's) may open channels
        and an SFTP subsystem during the test: those belong to it, not to the test.
        """
        found: set[int] = set()
        everything: set[int] = set()
        for master in self._sshd_masters():
            below = descendants(master)
            everything.update(below)
            for conn in below:
                if _parent(conn) == master and conn not in self.before:
                    found.add(conn)
                    found.update(descendants(conn))
        return sorted(found), everything

    def processes(self, sessions: set[int]) -> list[int]:
        """Processes of this test still running, outside any sshd session."""
        uids = {a.uid for a in self.rig.accounts} if self.rig is not None else set()
        runs = {f"REX_RUN={run}".encode() for run in self.runs}
        tagged = f"={self.tag}".encode()
        me, skip = os.getpid(), sessions
        found = []
        for pid in sorted(_pids() - self.before - skip - {me}):
            env = _environ(pid)
            ours = bool(runs.intersection(env)) or any(item.endswith(tagged) for item in env)
            if (ours or _uid(pid) in uids) and _alive(pid):
                found.append(pid)
        return found

    def _stray_files(self) -> Iterator[Path]:
        held = _held_inodes()
        for home in self.homes():
            for path in home.rglob("*"):
                name = path.name
                try:
                    st = path.lstat()
                except OSError:
                    continue
                temp = name.startswith(".") and name.endswith(".tmp")
                in_run = path.parent.name == "run" and path.parent.parent == home
                agent_temp = in_run and name.startswith(".") and stat.S_ISREG(st.st_mode)
                notify = in_run and name.startswith("n") and stat.S_ISDIR(st.st_mode)
                where = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
                lock = name.endswith(".lock") and where in held
                if temp or agent_temp or notify or lock:
                    yield path

    def files(self) -> list[Path]:
        return sorted(set(self._stray_files()) - self.files_before)

    def scan(self) -> tuple[list[int], list[int], list[Path]]:
        sessions, under_sshd = self.sessions()
        return self.processes(under_sshd), sessions, self.files()

    def settle(self) -> tuple[list[int], list[int], list[Path]]:
        """The leftovers still there after up to ``grace`` seconds."""
        end = time.monotonic() + self.grace
        while True:
            found = self.scan()
            if not any(found) or time.monotonic() >= end:
                return found
            time.sleep(0.05)

    def report(self) -> str:
        """Empty when the test left nothing behind; else each leftover, which is then removed."""
        procs, sessions, files = self.settle()
        lines = [f"process {_describe(p)}" for p in procs]
        lines += [f"sshd session {_describe(p)}" for p in sessions]
        lines += [f"file {p}" for p in files]
        _kill([*procs, *sessions])
        for path in files:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif not path.name.endswith(".lock"):
                path.unlink(missing_ok=True)
        return "\n".join(lines)


def _kill(pids: list[int]) -> None:
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + wait
        while any(_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.02)


@pytest.fixture
def no_orphans(request: pytest.FixtureRequest) -> Iterator[Oracle]:
    """Fail the test if it leaves a process, an sshd session or a temp/held-lock file behind."""
    rig = request.getfixturevalue("sshd_rig") if "sshd_rig" in request.fixturenames else None
    oracle = Oracle(rig)
    start = CallbackListener.start

    def watched(self: CallbackListener) -> None:
        oracle.runs.add(self.run_id)
        start(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CallbackListener, "start", watched)
        yield oracle
    left = oracle.report()
    if left:
        pytest.fail(f"the test left things behind (now removed):\n{left}", pytrace=False)
