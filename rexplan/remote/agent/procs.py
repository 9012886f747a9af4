"""Starting processes without subprocess (it imports threading and selectors at every agent
start): fork + exec, and _Proc, which waits on a pidfd where there is one."""

from __future__ import annotations

import errno
import os
import select
import time

from rexplan.remote.agent.failure import _suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any


class _TimeoutExpired(Exception):
    """A wait for a process ran out of time."""


class _SpawnError(Exception):
    """The child could not join the program's cgroup; nothing was started."""


def _exit_status(status: int) -> int:
    """A wait status as subprocess gives it: the exit code, or -N for signal N."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _pidfd(pid: int) -> int:
    """A pidfd for ``pid`` (readable once it has exited), or -1 where there is none."""
    opener = getattr(os, "pidfd_open", None)  # Python >= 3.9 on Linux >= 5.3
    if opener is None:
        return -1
    try:
        return int(opener(pid))
    except OSError:
        return -1


class _Proc:
    """A started child: pid, returncode, poll() and wait() as subprocess.Popen has them."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: as subprocess, count it as 0
                self.returncode = 0
                return 0
            if pid:
                self.returncode = _exit_status(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; _TimeoutExpired once ``timeout`` s passed with the child alive.
        Waits on a pidfd where there is one: no polling."""
        code = self.poll()
        if code is not None:
            return code
        if timeout is None:
            try:
                code = _exit_status(os.waitpid(self.pid, 0)[1])
            except ChildProcessError:
                code = 0
            self.returncode = code
            return code
        end = time.monotonic() + timeout
        fd = _pidfd(self.pid)
        delay = 0.0005
        try:
            while code is None:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise _TimeoutExpired()
                if fd >= 0:
                    select.select([fd], [], [], remaining)
                else:  # back off as subprocess does
                    time.sleep(min(delay, remaining))
                    delay = min(delay * 2, 0.05)
                code = self.poll()
        finally:
            if fd >= 0:
                os.close(fd)
        return code


def _executable(name: str, env: Mapping[str, str]) -> str:
    """``name`` looked up in ``env``'s PATH, as subprocess does for a program given an env."""
    if "/" in name:
        return name
    for directory in os.get_exec_path(dict(env)):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def _start(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | None, out: int, join: int = -1
) -> _Proc:
    """Start ``argv`` with exactly ``env`` in a new session, stdin from /dev/null, stdout and
    stderr to ``out`` (-1: /dev/null), in ``cwd`` (None: this process's). The agent's own
    descriptors are all close-on-exec (see _cloexec_inherited). OSError when it cannot start.

    ``join``: an open cgroup.procs the child writes itself into before exec, so nothing the
    program forks starts outside its cgroup; that takes a fork (about 2 ms of CPU) and
    _SpawnError when the write fails. Else posix_spawn, a vfork: no copy of the agent."""
    path = _executable(argv[0], env)
    if cwd is not None:
        os.chdir(cwd)  # the supervisor's own paths are absolute; posix_spawn has no chdir
    if join < 0:
        actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        if out < 0:
            actions += [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_WRONLY, 0) for fd in (1, 2)]
        else:
            actions += [(os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)]
        return _Proc(os.posix_spawn(path, list(argv), dict(env), file_actions=actions, setsid=True))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        stage = b"cgroup"
        try:
            os.close(read_end)
            os.write(join, b"0")
            stage = b"exec"
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(out if out >= 0 else null, 1)
            os.dup2(out if out >= 0 else null, 2)
            os.execve(path, list(argv), dict(env))
        except OSError as exc:
            os.write(write_end, b"%s %d" % (stage, exc.errno or 0))
        finally:
            os._exit(127)
    os.close(write_end)
    report = b""
    while True:
        data = os.read(read_end, 64)
        if not data:
            break
        report += data
    os.close(read_end)
    if not report:
        return _Proc(pid)  # the pipe closed at exec
    os.waitpid(pid, 0)
    stage_, _, code = report.partition(b" ")
    if stage_ == b"cgroup":
        raise _SpawnError()
    raise OSError(int(code), os.strerror(int(code)), argv[0])


def _cloexec_inherited() -> None:
    """Mark every descriptor above stderr that this process inherited close-on-exec: the
    agent starts programs with posix_spawn, which (unlike subprocess) closes nothing."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            with _suppress(OSError):
                os.set_inheritable(fd, False)
