"""LocalTransport: ``transport: local``, this machine as the launcher's own user."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rexplan.core.model import Host
from rexplan.errors import HostTimeoutError, TransportError
from rexplan.transport.base import (
    GET_LIMIT,
    Gate,
    Result,
    RunOptions,
    Sink,
    at_most,
    combine_home,
    command_line,
    not_started,
    temp_name,
    unpack,
)
from rexplan.transport.streams import CHUNK, Announcement, Lines, Tail

if TYPE_CHECKING:
    from typing_extensions import Unpack


class LocalTransport:
    """``transport: local``: this machine as the launcher's own user, same interface.

    Commands run with subprocess (argv list, no shell, a new session so a timeout kills the
    whole group) rather than invoke's Local runner: invoke wants a shell command string and
    polls its pipes with sleeping threads, while _pump waits on poll(2) and keeps only the
    tail of the output. ``user.login`` is not switched to.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self.leftovers: list[str] = []  # put() removes its own temp files locally

    def run(self, argv: Sequence[str], **opts: Unpack[RunOptions]) -> Result:
        stdin, timeout, env, gate = unpack(opts)
        """Run ``argv`` directly; a missing program gives status 127 as a shell would; ``gate``
        as over SSH."""
        command_line(argv, env)  # the same argv and env rules as over SSH
        environ = {**os.environ, **env} if env else None
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        gate_end = now + (gate.within if gate is not None else 0.0)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environ,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError) as e:
            status = 127 if isinstance(e, FileNotFoundError) else 126
            return Result(status, b"", f"{argv[0]}: {e.strerror}\n".encode())
        try:
            out, err = _pump(proc, stdin, deadline, gate if stdin else None, gate_end)
        except _Overdue as e:
            _kill_group(proc)
            if gate is not None and e.phase == "start":
                raise not_started(gate, self.host.name) from None
            raise HostTimeoutError(
                f"command did not finish within {timeout:g}s", host=self.host.name, phase="exec"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            for pipe in (proc.stdout, proc.stderr):
                _close(pipe)
        (stdout, stdout_cut), (stderr, stderr_cut) = out.value(), err.value()
        return Result(proc.returncode, stdout, stderr, stdout_cut, stderr_cut)

    def _path(self, path: str) -> str:
        return os.path.join(os.path.expanduser("~"), path)

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write ``path`` atomically: O_EXCL temp file in the same dir, fchmod, fsync, rename."""
        path = self._path(path)
        _local_makedirs(os.path.dirname(path))
        tmp = temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def get(self, path: str, limit: int = GET_LIMIT) -> bytes:
        """The content of ``path``, never more than ``limit`` bytes of it; FileNotFoundError
        if absent, OSError (EFBIG) if it is longer."""
        with open(self._path(path), "rb") as f:
            return at_most(f.read(limit + 1), limit, path)

    def stat(self, path: str) -> tuple[int, int] | None:
        """(st_mode, st_size) of ``path`` without following a final symlink; None if absent."""
        try:
            st = os.lstat(self._path(path))
        except FileNotFoundError:
            return None
        return st.st_mode, st.st_size

    def remove(self, path: str) -> bool:
        """Unlink ``path``; False if it was absent."""
        try:
            os.unlink(self._path(path))
        except FileNotFoundError:
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        """Sorted entry names of directory ``path``; [] if absent."""
        try:
            return sorted(os.listdir(self._path(path)))
        except FileNotFoundError:
            return []

    def rex_home(self) -> str:
        """$REX_HOME of the launcher's environment (relative: under ~), else ~/.rex."""
        return combine_home(os.path.expanduser("~"), os.environ.get("REX_HOME", ""))

    def callback_port(self, sink: Sink) -> int:
        """Never: a local agent calls back on the loopback (checks refuses ``via: ssh``)."""
        raise TransportError(
            "a transport: local host has no SSH connection to forward a callback over",
            host=self.host.name,
            phase="start",
        )

    def close(self) -> None:
        """Nothing to release."""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        _close(pipe)
    proc.wait()


class _Overdue(Exception):
    """A local command passed a deadline: ``phase`` is ``start`` (its gate's) or ``exec``."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


def _pump(
    proc: subprocess.Popen[bytes],
    stdin: bytes | None,
    deadline: float | None,
    gate: Gate | None,
    gate_end: float,
) -> tuple[Tail, Tail]:
    """Feed ``stdin`` to ``proc`` (with ``gate``: only once its stdout announced the gate's
    marker, by ``gate_end``; never if its stdout ends first) and keep the tails of its output
    until both streams end and it exits; _Overdue past a deadline (the caller kills it).

    Popen.communicate would keep every byte the command writes: a host that floods its
    output (a login script, a hostile interpreter) would cost the launcher that much memory.
    """
    assert proc.stdout is not None and proc.stderr is not None
    out, err = Tail(), Tail()
    stdout = proc.stdout.fileno()
    tails = {stdout: out, proc.stderr.fileno(): err}
    announced = Announcement(gate.marker, gate.wanted) if gate is not None else None
    supplied = False  # a ``wanted`` announcement's supply is in front of stdin
    pending = memoryview(stdin) if stdin and proc.stdin is not None else None
    writer = proc.stdin.fileno() if proc.stdin is not None else -1
    if pending is not None:
        os.set_blocking(writer, False)
    feeding = False  # the writer is registered with the poller
    poller = select.poll()
    for fd in tails:
        poller.register(fd, select.POLLIN)
    while tails:
        held = announced is not None and not announced.seen
        if held and stdout not in tails:
            held, pending = False, None  # its stdout ended unannounced: no use for stdin
            _close(proc.stdin)
        now = time.monotonic()
        if held and now >= gate_end:
            raise _Overdue("start")
        if deadline is not None and now >= deadline:
            raise _Overdue("exec")
        if pending is not None and not held and not supplied and announced and announced.wanted:
            assert gate is not None
            pending, supplied = memoryview(gate.supply + pending.tobytes()), True
        if pending is not None and not held and not feeding:
            poller.register(writer, select.POLLOUT)
            feeding = True
        ends = [t for t in (deadline, gate_end if held else None) if t is not None]
        wait = None if not ends else max(0, int((min(ends) - now) * 1000 + 0.999))
        for fd, _ in poller.poll(wait):
            if fd in tails:
                data = os.read(fd, CHUNK)
                if not data:
                    poller.unregister(fd)
                    del tails[fd]
                    continue
                tails[fd].add(data)
                if announced is not None and fd == stdout:
                    announced.feed(data)
            elif pending is not None:
                try:
                    pending = pending[os.write(fd, pending[:CHUNK]) :] or None
                except BlockingIOError:
                    continue
                except OSError:  # it stopped reading, as with EPIPE: the rest is not for it
                    pending = None
                if pending is None:
                    poller.unregister(fd)
                    _close(proc.stdin)
    _close(proc.stdin)
    try:
        proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise _Overdue("exec") from None
    return out, err


def _close(pipe: Any) -> None:
    if pipe is not None:
        with contextlib.suppress(OSError):
            pipe.close()


def _local_makedirs(path: str) -> None:
    if not path or os.path.isdir(path):
        return
    _local_makedirs(os.path.dirname(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)


class LocalStream:
    """A command on this machine whose stdin stays open, read line by line: what
    transport.ssh.open_stream gives for an SSH host (stderr merged into stdout). close() ends
    its stdin (as a closed SSH channel does), then its group if it lingers."""

    def __init__(self, host: Host, argv: Sequence[str], stdin: bytes = b"") -> None:
        command_line(argv)
        self.host = host.name
        try:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise TransportError(f"cannot start {argv[0]}: {e.strerror}", host=self.host) from e
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._out = self._proc.stdout.fileno()
        self._lines = Lines(lambda: os.read(self._out, CHUNK))
        if stdin:
            with contextlib.suppress(OSError):
                self._proc.stdin.write(stdin)
                self._proc.stdin.flush()

    def readline(self, limit: int) -> bytes:
        """The next output line (at most ``limit`` bytes); b"" once it ended or was closed."""
        return self._lines.readline(limit)

    def close(self, grace: float = 2.0) -> None:
        """EOF on the command's stdin; its group killed if it has not ended within ``grace``."""
        _close(self._proc.stdin)
        try:
            self._proc.wait(grace)
        except subprocess.TimeoutExpired:
            _kill_group(self._proc)
        _close(self._proc.stdout)
