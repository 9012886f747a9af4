"""The agent rex ships to hosts: start a program, probe it, call the launcher back, supervise it.

Stdlib only, Python >= 3.8. It runs as one script, rexplan.transport.shipping.bundle() (this module
plus rexplan/wire/protocol.py): ``python3 -I -S agent-<sha>.py``, or without a file on the host as
``python3 -I -S -c BOOTSTRAP <sha>`` with the bundle piped ahead of the launch message (see
rexplan.transport.shipping). Either way it reads ONE JSON launch line from stdin (protocol.parse_launch);
secrets (the key, the launch nonce nl) never appear in argv or the environment. Run as
``--wait SECONDS`` (shipping.LAUNCH_STUB's launches) it waits at most SECONDS for that
line, so a launcher stopped or gone before it sent the line never holds the agent.

Processes. The *front* (the process SSH started) reads the launch line, checks and loads the
key, opens the program log, then forks the *supervisor*, which leaves the SSH session (setsid,
stdio on /dev/null, its own errors into the program log), starts the program in a session of
its own (pgid = pid), probes it, runs the handshake, and reports to the front over a pipe. The
front prints one JSON line on stdout (``{"ok": true, "pid", "pgid", "agent"}`` or ``{"ok":
false, "exit", "reason"[, "status"][, "pid"]}``; diagnostic only: the launcher trusts only the
callback) and exits, so the SSH command ends while the supervisor stays the program's parent.

Supervision. The supervisor holds an exclusive flock on REX_HOME/run/<program>.lock for its
whole life (taken by the front before anything starts), so a triple runs at most once per
REX_HOME: a second launch fails ``already_running`` unless it asks to ``replace`` the running
one, which is then stopped first. It records REX_HOME/run/<program>.json, replaced atomically
at each change: run, step, triple, spec digest, restart policy, the supervisor's pid and start
time, the program's pid, pgid, start time (clock ticks since boot, so a reused pid is never
mistaken for the program) and wall-clock start, state (running, restarting, exited, stopped,
failed), last exit status and restart count. ``restart: on-failure|always`` restarts the
program after RESTART_FIRST seconds, doubling up to RESTART_CAP, and gives up after
RESTART_LIMIT restarts in a row (a run of RESTART_RESET seconds resets both). SIGTERM or
SIGINT to the supervisor stops the program (TERM to its group, the stop grace, KILL, then every
process still carrying its REX_TRIPLE tag, which children inherit even when they leave the
group) and records ``stopped``; it is never restarted after that.

Other modes: ``--status`` prints every record with liveness checked by pid + start time;
``--stop PROGRAM [GRACE [force]]`` stops a program through its supervisor (or directly if the
supervisor is gone), ``force`` SIGKILLs supervisor, group and tagged processes at once;
``--kill`` ends what one run started for one step, named by the request line on its stdin
(protocol.make_kill: run, step, grace; the run id stays out of argv, which every user of the
host can read); ``--load loadavg|cgroup SECONDS`` measures what the host has to spare for
least-loaded placement (load_report).

Cgroups. Where the host delegates the agent's cgroup v2 to its user (delegated_cgroup), each
program runs in a cgroup of its own, ``rex-<program>-<run>-<random>``, joined between fork and
exec, and named in the record: a stop ends what is in it too, also what cleared its environment
and left its group (``force``: cgroup.kill), and removes it. Elsewhere nothing changes.

Exit codes of the front: 0 verified (ok), 10 key missing or insecure, 11 program could not be
started, 12 program exited before it was verified, 13 not ready by the ready deadline, 14 no
verdict by the callback deadline (launcher unreachable or silent), 15 rejected (``no``, or a
listener that could not prove it holds the key: no response is sent to it), 16 bad launch
message, 17 the supervisor died or failed, 18 the triple is already running here (and the
launch did not ask to replace it), 19 the host declined: a ``when`` precondition failed, and
the agent proved the decline to the listener (protocol ``decl``), 21 no launch line within
``--wait`` SECONDS (nothing was started); 128+N: the front got signal N.

Files. The launcher uploads a program's ``files`` to REX_HOME/files/<program>/ before the
launch; the agent starts nothing unless each has the sha256 the launch names (they are part
of the spec digest). Without a ``cwd`` such a program starts in that directory.

Nothing is left behind on failure: before ``ok`` any failure, deadline or SIGTERM/SIGHUP/SIGINT
(to the front or the supervisor) kills the program's whole group (TERM, the launch's stop grace,
KILL); if the supervisor dies the front kills the group; if the launcher dies the callback
fails and the deadline applies. If front and supervisor are both SIGKILLed before ``ok``, the
launch watchdog (_watchdog: a small forked process in a session of its own) ends the group.
Process groups <= 1 and the agent's own group are never signalled.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import select
import stat
import sys
import time

from rexplan.wire import protocol

# Every agent run pays for its imports: tempfile and traceback come where used, typing never,
# and no subprocess (it imports threading and selectors): _Proc and _start do what the agent
# needs of it. The signal and socket modules are their C halves, _signal and _socket: the
# Python wrappers build enums of every constant and import selectors, together about a third
# of an agent start's CPU with subprocess.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any
else:
    import _signal as signal
    import _socket as socket

EXIT_OK = 0
EXIT_KEY = 10
EXIT_START = 11
EXIT_EXITED = 12
EXIT_NOT_READY = 13
EXIT_NO_CALLBACK = 14
EXIT_REJECTED = 15
EXIT_BAD_LAUNCH = 16
EXIT_AGENT = 17
EXIT_RUNNING = 18
EXIT_DECLINED = 19
#: the launch line did not come within ``--wait`` seconds; shipping.EXIT_NO_LAUNCH
EXIT_NO_LAUNCH = 21

RESTART_FIRST = 0.5  # seconds before the first restart; doubles for each restart in a row
RESTART_CAP = 30.0
RESTART_LIMIT = 10  # restarts in a row before the supervisor gives up
RESTART_RESET = 60.0  # a run this long counts as healthy: backoff and count start over

_POLL = 0.02  # seconds between checks while waiting for a process group to die
_Timeout = socket.timeout  # not TimeoutError: they are one class only from Python 3.10 on


class _suppress:
    """Ignore the given exceptions in a with block: contextlib.suppress, without contextlib
    (which imports functools and collections at every agent start)."""

    def __init__(self, *kinds: type[BaseException]) -> None:
        self.kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, self.kinds)


class Failure(Exception):
    """The launch failed: an exit code and a one-line reason that holds no secret; a refused
    callback names the key_id (public) of the key the agent holds, for the launcher to say
    whether it was the wrong one."""

    def __init__(
        self, code: int, reason: str, status: int | None = None, key_id: str | None = None
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status
        self.key_id = key_id

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "exit": self.code, "reason": self.reason}
        if self.status is not None:
            out["status"] = self.status
        if self.key_id is not None:
            out["key_id"] = self.key_id
        return out


class _Stop(Exception):
    """SIGTERM or SIGINT to the supervisor after ``ok``: stop the program."""


class _Signals:
    """Handlers raise only while armed (never mid-fork, mid-spawn or in cleanup) and remember
    a signal that came while disarmed, so the next _arm() raises it."""

    armed = True
    pending = 0


def _on_signal(signum: int, frame: object) -> None:
    if _Signals.armed:
        _Signals.armed = False
        raise Failure(128 + signum, f"agent received signal {signum}")
    _Signals.pending = _Signals.pending or signum


def _disarm() -> None:
    _Signals.armed = False


def _arm() -> None:
    signum, _Signals.pending = _Signals.pending, 0
    _Signals.armed = not signum
    if signum:
        raise Failure(128 + signum, f"agent received signal {signum}")


def _trap_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _on_signal)


def rex_home() -> str:
    # absolute: the supervisor changes into the program's directory before it starts it
    home = os.environ.get("REX_HOME") or os.path.join(os.path.expanduser("~"), ".rex")
    return os.path.abspath(home)


# ---- the key ----


def _check_dir(path: str, follow: bool) -> None:
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise Failure(EXIT_KEY, f"{path} is not a directory")
    if st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o022:
        raise Failure(EXIT_KEY, f"{path} is writable by others or owned by another user")


def load_key(home: str, launch: protocol.Launch) -> bytes:
    """The triple's secret: the program key, else the host.user key; refuses insecure files."""
    host, user, _ = launch.triple.rsplit(".", 2)
    parts = launch.key_path.split("/")
    candidates = [(launch.key_path, launch.triple)]
    if len(parts) == 3:
        candidates.append((f"{parts[0]}/{parts[1]}.key", f"{host}.{user}"))
    keys = os.path.join(home, "keys")
    for rel, owner in candidates:
        path = os.path.join(keys, rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Failure(EXIT_KEY, f"key {rel} is a symlink; refusing it") from None
            raise Failure(EXIT_KEY, f"cannot open key {rel}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Failure(EXIT_KEY, f"key {rel} is not a regular file")
            if st.st_uid != os.getuid():
                raise Failure(EXIT_KEY, f"key {rel} is owned by another user")
            if st.st_mode & 0o077:
                mode = stat.S_IMODE(st.st_mode)
                raise Failure(EXIT_KEY, f"key {rel} has mode {mode:04o}; it must be 0600")
            _check_dir(home, follow=True)
            directory = keys
            _check_dir(directory, follow=False)
            for part in rel.split("/")[:-1]:
                directory = os.path.join(directory, part)
                _check_dir(directory, follow=False)
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            named, _, secret = protocol.parse_key_file(data)
        except protocol.KeyFormatError as exc:
            raise Failure(EXIT_KEY, f"key {rel} is malformed: {exc}") from None
        if named != owner:
            raise Failure(EXIT_KEY, f"key {rel} names {named}, not {owner}")
        return secret
    raise Failure(EXIT_KEY, f"no key for {launch.triple} under {keys}")


# ---- processes ----


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


# ---- process groups ----


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
    tagged = protocol.TRIPLE_RE.match(triple) is not None
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


# ---- containment: the program's cgroup and the launch watchdog ----


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


def _make_cgroup(launch: protocol.Launch) -> str | None:
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


def cgroup_pids(path: str) -> list[int]:
    """The live processes in cgroup ``path`` and its descendants (never this one)."""
    found: set[int] = set()
    for directory, _dirs, _files in os.walk(path):
        with _suppress(OSError, ValueError):
            with open(os.path.join(directory, "cgroup.procs"), "rb") as f:
                found.update(int(word) for word in f.read().split())
    me = os.getpid()
    return sorted(p for p in found if p != me and _alive(p))


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


def _start_watchdog(launch: protocol.Launch) -> None:
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


def _watchdog(launch: protocol.Launch, fd: int) -> None:
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


def _end_launch(launch: protocol.Launch, pgid: int, start: str, cgroup: str | None) -> None:
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


# ---- readiness ----


def _probe_once(probe: protocol.Probe, cwd: str | None, env: dict[str, str], budget: float) -> bool:
    budget = max(0.05, budget)
    if probe.kind == "tcp":
        try:
            _connect(probe.host or "", probe.port or 0, budget).close()
        except OSError:
            return False
        return True
    if probe.kind == "http":
        # Imported here: urllib costs ~50 ms at every agent start, and few probes use it.
        import urllib.error
        import urllib.request
        from http.client import HTTPException

        # A proxy from the environment must not answer for a local service.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(probe.url or "", timeout=budget) as response:
                return 200 <= int(response.status) < 400
        except urllib.error.HTTPError as exc:
            return 300 <= exc.code < 400
        except (OSError, HTTPException, ValueError):
            return False
    if probe.kind == "command":
        try:
            proc = _start(probe.argv, env, cwd, -1)
        except OSError:
            return False
        try:
            return proc.wait(budget) == 0
        except _TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return False
        except BaseException:  # a signal: the probe goes with the launch
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if probe.kind == "file":
        return os.path.exists(os.path.join(cwd or os.getcwd(), probe.path or ""))
    raise ValueError(probe.kind)


def _notified(sock: socket.socket) -> bool:
    ready = False
    while True:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return ready
        ready = ready or b"READY=1" in data.split(b"\n")


def _exited(proc: _Proc) -> Failure:
    status = proc.returncode
    return Failure(EXIT_EXITED, f"program exited with status {status} before ready", status)


def wait_ready(
    proc: _Proc,
    probe: protocol.Probe,
    deadline: float,
    cwd: str | None,
    env: dict[str, str],
    notify: socket.socket | None,
) -> None:
    """Return once the probe passes; Failure at once if the program exits, or at the deadline."""
    if probe.kind == "alive":
        try:
            proc.wait(timeout=max(0.0, min(probe.settle, deadline - time.monotonic())))
        except _TimeoutExpired:
            return
        raise _exited(proc)
    while True:
        if proc.poll() is not None:
            raise _exited(proc)
        remaining = deadline - time.monotonic()
        if notify is not None:
            if _notified(notify):
                return
        elif _probe_once(probe, cwd, env, min(remaining, 1.0)):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Failure(EXIT_NOT_READY, f"{probe.kind} probe not ready by the deadline")
        try:
            proc.wait(timeout=min(probe.interval, remaining))
        except _TimeoutExpired:
            continue
        raise _exited(proc)


def _notify_socket(home: str) -> tuple[socket.socket, str]:
    """An sd_notify-style datagram socket in a fresh 0700 directory."""
    run = os.path.join(home, "run")
    os.makedirs(run, mode=0o700, exist_ok=True)
    import tempfile

    directory = tempfile.mkdtemp(prefix="n", dir=run)
    path = os.path.join(directory, "s")
    if len(path.encode()) > 100:  # sun_path is 108 bytes
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="rex-n")
        path = os.path.join(directory, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    return sock, path


# ---- the callback ----


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """socket.create_connection((host, port), timeout), over _socket. The host goes to
    getaddrinfo as bytes: a str is IDNA-encoded first, which imports encodings.idna (with
    stringprep, unicodedata and a regex compile: a quarter of the supervisor's CPU)."""
    error: OSError | None = None
    name = host.encode("ascii")  # protocol's host check admits ASCII only
    for family, kind, proto, _, address in socket.getaddrinfo(name, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error or OSError(f"no address for {host}")


class _Retry(Exception):
    """The listener closed before its challenge (busy or restarting): dial again."""


def _recv(
    sock: socket.socket, reader: protocol.FrameReader, deadline: float, *expected: str
) -> dict[str, Any]:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout()
        sock.settimeout(remaining)
        data = sock.recv(reader.wanted())
        if not data:
            raise EOFError()
        for msg in reader.feed(data):
            return protocol.check_message(msg, *expected)


def _send(sock: socket.socket, frame: bytes, deadline: float) -> None:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(frame)


class _Link:
    """A job's connection to the launcher after ``ok``, and the session its frames are MAC'd
    with."""

    def __init__(
        self, sock: socket.socket, reader: protocol.FrameReader, session: protocol.Session
    ) -> None:
        self.sock = sock
        self.reader = reader
        self.session = session


def _handshake(
    launch: protocol.Launch,
    secret: bytes,
    pid: int,
    start: str,
    deadline: float,
    decline: str | None = None,
    same: bool = False,
) -> _Link | None:
    """One handshake; a job keeps its verified connection (the _Link), a service closes it.
    With ``decline`` the agent proves that reason instead of its ``resp``; with ``same``, that
    the program ``pid`` started at ``start`` runs the launch's spec already."""
    k_l, k_a = protocol.direction_keys(secret)
    remaining = deadline - time.monotonic()
    try:
        sock = _connect(launch.callback[0], launch.callback[1], max(0.001, remaining))
    except _Timeout:
        raise  # the deadline: handled by call_back, not retried
    except OSError:
        raise _Retry() from None
    try:
        hello = protocol.make_hello(
            run=launch.run,
            step=launch.step,
            triple=launch.triple,
            key_id=protocol.key_id(secret),
            na=protocol.new_nonce(),
            pid=pid,
            pgid=pid,
            start=start,
        )
        t = protocol.transcript(hello)
        reader = protocol.FrameReader()
        try:
            _send(sock, protocol.encode_frame(hello), deadline)
            chal = _recv(sock, reader, deadline, "chal", "no")
        except _Timeout:
            raise
        except (EOFError, OSError):
            raise _Retry() from None
        if chal["t"] == "no":
            refused = f"launcher refused the callback (ref {chal['ref']})"
            raise Failure(EXIT_REJECTED, refused, key_id=hello["key_id"])
        ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
        if not protocol.verify_launcher_proof(k_l, t, ns, launch.nl, lp):
            raise Failure(EXIT_REJECTED, "the listener could not prove it holds the key")
        if decline is not None or same:
            if decline is not None:
                decl = protocol.make_decl(k_a, t, ns, launch.nl, lp, decline)
            else:
                decl = protocol.make_same(k_a, t, ns, launch.nl, lp)
            with _suppress(OSError, EOFError, _Timeout):
                _send(sock, protocol.encode_frame(decl), deadline)
                # the listener decides and closes: wait for it, so no reset loses the frame
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                while sock.recv(64):
                    pass
            sock.close()
            return None
        ap = protocol.agent_proof(k_a, t, ns, launch.nl, lp)
        try:
            _send(sock, protocol.encode_frame(protocol.make_resp(ap)), deadline)
            verdict = _recv(sock, reader, deadline, "ok", "no")
        except _Timeout:
            raise
        except (EOFError, OSError):
            # Not retried: the listener may have verified us already, and a second try would
            # only be refused as a duplicate.
            raise Failure(EXIT_NO_CALLBACK, "the listener closed without a verdict") from None
        if verdict["t"] == "no":
            refused = f"launcher refused the callback (ref {verdict['ref']})"
            raise Failure(EXIT_REJECTED, refused, key_id=hello["key_id"])
        if not protocol.verify_ok_mac(k_l, t, ns, launch.nl, ap, bytes.fromhex(verdict["mac"])):
            raise Failure(EXIT_REJECTED, "the verdict is not authenticated")
    except BaseException:
        sock.close()
        raise
    if launch.kind != "job":
        sock.close()
        return None
    return _Link(sock, reader, protocol.Session.of((k_l, k_a), t, ns, launch.nl, ap))


def _dial(
    launch: protocol.Launch,
    deadline: float,
    attempt: Callable[[], _Link | None],
    proc: _Proc | None = None,
) -> _Link | None:
    """Run ``attempt`` (one handshake) until a verdict; dial again, backing off, while the
    listener refuses or resets. With ``proc``, a service that exits meanwhile fails."""
    where = f"{launch.callback[0]}:{launch.callback[1]}"
    delay = 0.05
    while True:
        if proc is not None and launch.kind != "job" and proc.poll() is not None:
            raise _exited(proc)
        try:
            return attempt()
        except _Timeout:
            raise Failure(EXIT_NO_CALLBACK, f"no verdict from {where} by the deadline") from None
        except protocol.FrameError as exc:
            raise Failure(EXIT_REJECTED, f"the listener broke {protocol.VERSION}: {exc}") from None
        except _Retry:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure(EXIT_NO_CALLBACK, f"cannot reach {where}") from None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)


def call_back(
    launch: protocol.Launch,
    secret: bytes,
    proc: _Proc,
    start: str,
    deadline: float,
) -> _Link | None:
    """Run the handshake until ``ok``. A service that exits meanwhile fails; a job may end
    before its callback, and reports it."""
    return _dial(
        launch, deadline, lambda: _handshake(launch, secret, proc.pid, start, deadline), proc
    )


def same_back(
    launch: protocol.Launch, secret: bytes, pid: int, start: str, deadline: float
) -> None:
    """Prove to the listener that the program ``pid`` (started at ``start``) runs the launch's
    spec already (nothing was started)."""
    _dial(launch, deadline, lambda: _handshake(launch, secret, pid, start, deadline, same=True))


def decline_back(launch: protocol.Launch, secret: bytes, reason: str, deadline: float) -> None:
    """Prove to the listener that this host declines the launch (nothing was started)."""
    pid = os.getpid()
    start = start_time(pid)
    _dial(launch, deadline, lambda: _handshake(launch, secret, pid, start, deadline, reason))


# ---- preconditions and files ----


def _free_mb(root: str = "") -> int | None:
    """MiB of memory available, from ``root``/proc/meminfo; None when it does not say."""
    try:
        with open(root + "/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _declines(launch: protocol.Launch) -> str | None:
    """Why this host will not run the launch now (its ``when``), or None."""
    when = dict(launch.when)
    if "max_load" in when:
        load = os.getloadavg()[0]
        if load > when["max_load"]:
            return f"load average {load:.2f} is above max_load {when['max_load']:g}"
    if "min_free_mb" in when:
        free = _free_mb()
        if free is not None and free < when["min_free_mb"]:
            return f"{free} MB available is below min_free_mb {int(when['min_free_mb'])}"
    return None


def files_dir(home: str, name: str) -> str:
    return os.path.join(home, "files", name)


def _workdir(launch: protocol.Launch) -> str | None:
    """The program's working directory: its cwd, else the directory of its files, if any."""
    if launch.cwd is not None or not launch.files:
        return launch.cwd
    return files_dir(rex_home(), launch.log)


def _sha256(path: str) -> str | None:
    """sha256 hex of a regular file (not followed if a symlink); None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = protocol.sha256()
        for block in iter(lambda: os.read(fd, 1 << 16), b""):
            digest.update(block)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _check_files(home: str, launch: protocol.Launch) -> None:
    base = files_dir(home, launch.log)
    for dest, sha, _mode in launch.files:
        if _sha256(os.path.join(base, dest)) != sha:
            raise Failure(EXIT_START, f"file {dest} is missing or not the declared content")


def file_hashes(home: str, name: str) -> dict[str, str]:
    """{relative path: sha256} of the regular files under REX_HOME/files/<name>/."""
    base = files_dir(home, name)
    out: dict[str, str] = {}
    for directory, dirs, names in os.walk(base):
        dirs.sort()
        for entry in sorted(names):
            path = os.path.join(directory, entry)
            sha = _sha256(path)
            uploading = entry.startswith(".") and ".rex-" in entry and entry.endswith(".tmp")
            if sha is not None and not uploading:
                out[os.path.relpath(path, base)] = sha
    return out


# ---- load: what a placement candidate has to spare ----


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


# ---- the supervisor ----


def _print_exc() -> None:
    import traceback

    traceback.print_exc()


def _run_dir(home: str) -> str:
    run = os.path.join(home, "run")
    os.makedirs(run, mode=0o700, exist_ok=True)
    return run


def _store(home: str, name: str, record: dict[str, Any]) -> None:
    """Atomically replace REX_HOME/run/<name>.json, and <name>.id: the line ``PID START SPEC
    TRIPLE`` the launcher's shell check reads (remote.CHECK_SH), removed when the record has
    no program pid."""
    run = _run_dir(home)
    _replace(run, name, ".json", protocol.dumps(record, sort_keys=True).encode("ascii"))
    pid = record.get("pid")
    words = [str(pid)] + [record.get(k) for k in ("start", "spec", "triple")]
    line = " ".join(w for w in words if type(w) is str and w.isprintable() and w.isascii())
    if type(pid) is int and pid > 1 and line.split(" ") == words and "" not in words:
        _replace(run, name, ".id", (line + "\n").encode("ascii"))
        return
    with _suppress(FileNotFoundError):
        os.unlink(os.path.join(run, f"{name}.id"))


def _replace(run: str, name: str, suffix: str, data: bytes) -> None:
    """Write run/<name><suffix> atomically: a temp file in the same directory, renamed."""
    tmp = os.path.join(run, f".{name}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(run, f"{name}{suffix}"))
    except BaseException:
        os.unlink(tmp)
        raise


def read_state(home: str, name: str) -> dict[str, Any] | None:
    """The record REX_HOME/run/<name>.json; None when there is none or it is unreadable."""
    try:
        with open(os.path.join(home, "run", f"{name}.json"), "rb") as f:
            data = protocol.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(home: str, launch: protocol.Launch, **fields: Any) -> None:
    """Record the program's state; a failure only goes to the log, since the state is a
    record and must not cost a verified program its life."""
    record = {
        "run": launch.run,
        "step": launch.step,
        "triple": launch.triple,
        "kind": launch.kind,
        "spec": protocol.spec_digest(launch),
        "restart": launch.restart,
        "stop_timeout": launch.deadline("stop"),
        "agent": os.getpid(),
        "agent_start": start_time(os.getpid()),
        "updated": time.time(),
    }
    if _Cgroup.path is not None:
        record["cgroup"] = _Cgroup.path  # for a stop: what left group and tags is still in it
    record.update(fields)
    try:
        _store(home, launch.log, record)
    except OSError:
        _print_exc()


def _lock(home: str, name: str, wait: float = 0.0) -> int | None:
    """An fd holding the exclusive flock on REX_HOME/run/<name>.lock, or None when another
    process still holds it after ``wait`` seconds. The kernel drops it when its holder dies."""
    path = os.path.join(_run_dir(home), f"{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    end = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= end:
                os.close(fd)
                return None
            time.sleep(_POLL)
        except OSError:
            os.close(fd)
            raise


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "another launch holds its lock"
    return f"pid {record.get('pid')}, run {record.get('run')}, state {record.get('state')}"


class _Same(Exception):
    """The launch's program runs already with its spec (a launch asking ``unchanged``)."""

    def __init__(self, pid: int, start: str) -> None:
        super().__init__(pid, start)
        self.pid = pid
        self.start = start


def _prove_same(launch: protocol.Launch, secret: bytes, same: _Same) -> int:
    """Prove to the listener that the program runs unchanged and report it: only that proof
    makes the step unchanged (a relay passing this report on cannot)."""
    deadline = time.monotonic() + launch.deadline("callback")
    try:
        same_back(launch, secret, same.pid, same.start, deadline)
    except Failure as failure:
        return _print(failure.result())
    return _print({"ok": True, "same": True, "pid": same.pid})


def _claim(home: str, launch: protocol.Launch) -> tuple[int, bool]:
    """(the lock fd this launch's supervisor will hold, whether a running instance was
    stopped for it). Only an established instance is replaced, and only when the launch asks;
    a launch still in progress, or an instance of the same spec, refuses it (EXIT_RUNNING):
    two launchers racing on a triple never run it twice. A launch asking ``unchanged`` finds
    an instance of the same spec alive: _Same, to be proven."""
    name = launch.log
    try:
        fd = _lock(home, name)
        record = read_state(home, name)
        # a program whose supervisor was killed still runs: the lock alone does not tell
        alive = record is not None and same_process(record.get("pid"), record.get("start"))
        if fd is not None and not alive:
            return fd, False
        if fd is not None:
            os.close(fd)
        established = record is not None and (
            alive or same_process(record.get("agent"), record.get("agent_start"))
        )
        # the same spec alive is a concurrent launch that won (files aside: the launcher
        # replaces those when their content on the host drifted from it)
        recorded = record.get("spec") if record is not None else None
        same = (
            alive
            and not launch.files
            and isinstance(recorded, str)
            and recorded.isascii()
            and protocol.compare_digest(recorded, protocol.spec_digest(launch))
        )
        if same and launch.unchanged:
            assert record is not None
            raise _Same(record["pid"], record["start"])
        if not launch.replace or not established or same:
            raise Failure(EXIT_RUNNING, f"{launch.triple} is already running ({_describe(record)})")
        stop_program(home, name, launch.deadline("stop"))
        fd = _lock(home, name, wait=2.0)
    except OSError as exc:
        raise Failure(EXIT_START, f"cannot lock the program's state: {exc.strerror}") from None
    if fd is None:
        raise Failure(EXIT_RUNNING, f"{launch.triple} is still running after it was stopped")
    return fd, True


def stop_program(home: str, name: str, grace: float, force: bool = False) -> dict[str, Any]:
    """``--stop NAME``: end program NAME of this REX_HOME and keep it ended.

    Its supervisor is told first (SIGTERM: it stops the group, TERM then KILL after the grace,
    and records ``stopped`` instead of restarting); a program whose supervisor is gone is
    stopped here. ``force`` SIGKILLs the supervisor, the group and every tagged process at once.
    Either way no process tagged with the program's triple is left. When the program has a
    cgroup of its own (see delegated_cgroup), what is in it goes too, also what left both its
    group and its environment (``force``: cgroup.kill, first), and the cgroup is removed.
    """
    record = read_state(home, name)
    if record is None:
        return {"ok": True, "program": name, "was": "absent", "killed": []}
    agent, agent_start = _pid(record.get("agent")), record.get("agent_start")
    pid, start = _pid(record.get("pid")), record.get("start")
    recorded = record.get("stop_timeout")
    within = max(grace, recorded if isinstance(recorded, (int, float)) else 0.0) + 3.0
    cgroup = _recorded_cgroup(record, name)
    killed: list[int] = []
    if same_process(agent, agent_start):
        # the supervisor first, so that it cannot restart what is being stopped
        _signal_all([agent], signal.SIGKILL if force else signal.SIGTERM)
        end = time.monotonic() + within
        while same_process(agent, agent_start) and time.monotonic() < end:
            time.sleep(_POLL)
        if same_process(agent, agent_start):
            _signal_all([agent], signal.SIGKILL)
    if force and cgroup is not None:
        killed += cgroup_kill(cgroup)
    if same_process(pid, start) and pid != os.getpgrp():
        killed.append(pid)
        if force:
            with _suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        else:
            kill_group(pid, grace)
    killed += sweep(str(record.get("triple", "")), grace, force, cgroup)
    if cgroup is not None:
        killed += cgroup_kill(cgroup)  # whatever the sweep's 20 rounds could not end
        remove_cgroup(cgroup)
    fd = _lock(home, name)
    if fd is not None:  # else a new launch holds it: its record is not ours to touch
        try:
            current = read_state(home, name)
            if current is not None and current.get("state") != "stopped":
                current.update(state="stopped", updated=time.time())
                _store(home, name, current)
        finally:
            os.close(fd)
    return {"ok": True, "program": name, "was": record.get("state"), "killed": sorted(set(killed))}


def status_report(home: str) -> dict[str, Any]:
    """``--status``: every record under REX_HOME/run, with ``alive`` (the program) and
    ``supervised`` (its supervisor) checked by pid + start time, and ``uptime``."""
    now = time.time()
    try:
        entries = sorted(os.listdir(os.path.join(home, "run")))
    except OSError:
        entries = []
    programs = []
    for entry in entries:
        name = entry[: -len(".json")]
        if entry.startswith(".") or not entry.endswith(".json") or not name:
            continue
        record = read_state(home, name)
        if record is None:
            continue
        record["name"] = name
        record["alive"] = same_process(record.get("pid"), record.get("start"))
        record["supervised"] = same_process(record.get("agent"), record.get("agent_start"))
        record["files"] = file_hashes(home, name)
        started = record.get("started")
        if record["alive"] and isinstance(started, (int, float)):
            record["uptime"] = round(max(0.0, now - started), 3)
        programs.append(record)
    return {"ok": True, "now": now, "programs": programs}


def _program_env(launch: protocol.Launch, notify: str | None) -> dict[str, str]:
    env = dict(launch.env)
    if "PATH" not in env and "PATH" in os.environ:
        env["PATH"] = os.environ["PATH"]
    env.update(launch.tags)
    env.update(REX_RUN=launch.run, REX_STEP=launch.step, REX_TRIPLE=launch.triple)
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    return env


def _report(fd: int, obj: dict[str, Any]) -> None:
    # OSError: the front is gone; the outcome stands without it
    with _suppress(OSError):
        os.write(fd, protocol.dumps(obj).encode("ascii") + b"\n")


def _spawn(launch: protocol.Launch, log_fd: int, env: dict[str, str], restart: int = 0) -> _Proc:
    what = f"restart {restart}" if restart else "starting"
    os.write(log_fd, f"--- rex: run {launch.run} step {launch.step} {what}\n".encode())
    _Output.start = os.lseek(log_fd, 0, os.SEEK_END)
    # Joining the cgroup from the child, before exec, is the only way nothing the program
    # forks starts outside (from the supervisor, after the spawn, the cgroup write takes
    # effect milliseconds later, when a daemonizing program has long forked).
    try:
        if _Cgroup.procs >= 0:
            try:
                return _start(launch.argv, env, _workdir(launch), log_fd, _Cgroup.procs)
            except _SpawnError:  # nothing was started
                sys.stderr.write("rex: the program could not join its cgroup; it runs without\n")
                _drop_cgroup()
        return _start(launch.argv, env, _workdir(launch), log_fd)
    except OSError as exc:
        raise Failure(EXIT_START, f"cannot start {launch.argv[0]!r}: {exc.strerror}") from None


def _supervise(launch: protocol.Launch, home: str, secret: bytes, log_fd: int, out: int) -> int:
    """The supervisor's life; returns its exit code. ``out`` is the report pipe to the front."""
    began = time.monotonic()
    proc: _Proc | None = None
    notify: socket.socket | None = None
    notify_path: str | None = None
    try:
        declined = _declines(launch)
        if declined is not None:
            _arm()
            decline_back(launch, secret, declined, began + launch.deadline("callback"))
            raise Failure(EXIT_DECLINED, f"declined: {declined}")
        _check_files(home, launch)
        if launch.ready.kind == "notify":
            notify, notify_path = _notify_socket(home)
        env = _program_env(launch, notify_path)
        began_wall = time.time()
        _start_watchdog(launch)
        cgroup = _make_cgroup(launch)
        if cgroup is not None:
            _tell_watchdog("cgroup", cgroup)
        proc = _spawn(launch, log_fd, env)
        start = start_time(proc.pid)
        _tell_watchdog("pid", str(proc.pid), start)
        _report(out, {"started": [proc.pid, proc.pid]})
        _arm()
        if time.monotonic() - began > launch.deadline("start"):
            raise Failure(EXIT_START, "program did not start by the start deadline")
        if launch.kind != "job":  # a job is ready once started: it may well end at once
            ready_by = time.monotonic() + launch.deadline("ready")
            wait_ready(proc, launch.ready, ready_by, _workdir(launch), env, notify)
        link = call_back(
            launch, secret, proc, start, time.monotonic() + launch.deadline("callback")
        )
        _release_watchdog()
        # Verified: from here SIGTERM/SIGINT ask for a stop, as after ok (_after_ok and _job
        # take the request at their first wait), instead of failing a verified launch and
        # leaving the program without its supervisor.
        signal.signal(signal.SIGTERM, _on_stop)
        signal.signal(signal.SIGINT, _on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    except BaseException as exc:
        _disarm()
        if not isinstance(exc, Failure):
            _print_exc()  # into the program log
        failure = exc if isinstance(exc, Failure) else Failure(EXIT_AGENT, "agent failed")
        result = failure.result()
        fields: dict[str, Any] = {"state": "failed", "reason": failure.reason, "restarts": 0}
        if proc is not None:
            kill_group(proc.pid, launch.deadline("stop"), proc)
            result["pid"] = proc.pid
            fields.update(pid=proc.pid, pgid=proc.pid, status=proc.returncode)
            if failure.code == EXIT_EXITED:
                fields["state"] = "exited"
        if _Cgroup.path is not None:  # what left the group before ok goes too
            cgroup_kill(_Cgroup.path)
            _drop_cgroup()
        if failure.code == EXIT_DECLINED:
            fields["state"] = "declined"
        _write_state(home, launch, **fields)
        _report(out, result)
        return failure.code
    finally:
        if notify is not None and notify_path is not None:
            notify.close()
            with _suppress(OSError):
                os.unlink(notify_path)
                os.rmdir(os.path.dirname(notify_path))
    pid = proc.pid
    _write_state(
        home,
        launch,
        pid=pid,
        pgid=pid,
        start=start,
        started=began_wall,
        state="running",
        status=None,
        restarts=0,
    )
    _report(out, {"ok": True, "pid": pid, "pgid": pid, "agent": os.getpid()})
    os.close(out)
    _reap_watchdog()
    if link is not None:
        return _job(launch, home, _Run(proc, start, began_wall), link)
    env.pop("NOTIFY_SOCKET", None)  # that socket served the first readiness only
    return _after_ok(launch, home, _Run(proc, start, began_wall), env, log_fd)


class _Output:
    """Where the latest run's output begins in the program log (after rex's header line)."""

    start = 0


def _tail(home: str, launch: protocol.Launch) -> bytes:
    """The tail of what the job wrote (stdout and stderr, interleaved): protocol.OUT_TAIL
    bytes at most, opened by protocol.cut_line when more came before it."""
    path = os.path.join(home, "logs", f"{launch.log}.log")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        end = os.fstat(fd).st_size
        size = max(0, end - _Output.start)
        if size <= protocol.OUT_TAIL:
            return os.pread(fd, size, end - size)
        # the line for ``size`` is as long as the one for what is cut, or longer
        keep = protocol.OUT_TAIL - len(protocol.cut_line(size))
        return protocol.cut_line(size - keep) + os.pread(fd, keep, end - keep)
    finally:
        os.close(fd)


def _heard(link: _Link, seq: int) -> int:
    """Take the launcher's pending heartbeats; the last seq, or raise: closed (EOFError),
    forged or out of sequence (FrameError), or a broken connection (OSError)."""
    data = link.sock.recv(link.reader.wanted())
    if not data:
        raise EOFError()
    for msg in link.reader.feed(data):
        beat = protocol.check_message(msg, "hb")
        if beat["seq"] != seq + 1 or not link.session.verify(link.session.k_l, beat, b""):
            raise protocol.FrameError(protocol.BAD_PROOF, "heartbeat forged or out of sequence")
        seq = beat["seq"]
    return seq


def _job(launch: protocol.Launch, home: str, run: _Run, link: _Link) -> int:
    """Keep the launcher's connection while the job runs; then send the tail of its output
    and its exit status. The job is killed when the launcher goes: the connection ends or
    fails, a heartbeat does not verify, or none came for protocol.JOB_SILENCE seconds.
    SIGTERM/SIGINT to the supervisor stop it too."""
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    grace = launch.deadline("stop")
    heard = time.monotonic()
    seq = 0
    why = ""
    try:
        while run.proc.poll() is None:
            if time.monotonic() - heard > protocol.JOB_SILENCE:
                why = "no heartbeat from the launcher"
                break
            with _stoppable():
                readable = select.select([link.sock], [], [], 0.05)[0]
            if readable:
                try:
                    seq = _heard(link, seq)
                except EOFError:
                    why = "the launcher closed the connection"
                    break
                except (OSError, protocol.FrameError) as exc:
                    why = f"the launcher's connection failed: {exc}"
                    break
                heard = time.monotonic()
    except _Stop:
        why = "stopped"
    if why:
        link.sock.close()
        kill_group(run.proc.pid, grace, run.proc)
        run.proc.wait()
        sweep(launch.triple, grace)
        state = "stopped" if why == "stopped" else "failed"
        fields = run.fields(state=state, status=run.proc.returncode, reason=why, restarts=0)
        _write_state(home, launch, **fields)
        return 0
    status = run.proc.wait()
    _write_state(home, launch, **run.fields(state="exited", status=status, restarts=0))
    _finish_job(link, _tail(home, launch), status)
    return 0


def _finish_job(link: _Link, output: bytes, status: int) -> None:
    """Send the output's tail and the exit status, then wait (briefly) for the launcher to
    close first: closing with its heartbeats unread would reset the connection and could
    lose the last frames."""
    frames = [
        protocol.make_out(link.session, i + 1, output[k : k + protocol.OUT_CHUNK])
        for i, k in enumerate(range(0, len(output), protocol.OUT_CHUNK))
    ]
    frames.append(protocol.make_exit(link.session, len(frames) + 1, status))
    try:
        # OSError: the launcher went away; the record still holds the status
        with _suppress(OSError):
            link.sock.settimeout(protocol.JOB_SILENCE)
            for frame in frames:
                link.sock.sendall(protocol.encode_frame(frame))
            link.sock.shutdown(socket.SHUT_WR)
            while link.sock.recv(4096):
                continue
    finally:
        link.sock.close()


class _Stopping:
    """A stop request (SIGTERM/SIGINT) after ``ok``: raised as _Stop only while armed, at
    points where unwinding is safe (waiting, sleeping), remembered otherwise."""

    requested = False
    armed = False


def _on_stop(signum: int, frame: object) -> None:
    _Stopping.requested = True
    if _Stopping.armed:
        _Stopping.armed = False
        raise _Stop()


class _stoppable:
    """A block a stop request may interrupt (raising _Stop): a wait or a sleep."""

    def __enter__(self) -> None:
        if _Stopping.requested:
            raise _Stop()
        _Stopping.armed = True

    def __exit__(self, *exc: object) -> None:
        _Stopping.armed = False


class _Run:
    """One run of the program under the supervisor."""

    def __init__(self, proc: _Proc, start: str, started: float) -> None:
        self.proc = proc
        self.start = start
        self.started = started
        self.began = time.monotonic()

    def fields(self, **more: Any) -> dict[str, Any]:
        pid = self.proc.pid
        out = {"pid": pid, "pgid": pid, "start": self.start, "started": self.started}
        out.update(more)
        return out


def _restart_due(policy: str, status: int) -> bool:
    return policy == "always" or (policy == "on-failure" and status != 0)


def _after_ok(
    launch: protocol.Launch, home: str, run: _Run, env: dict[str, str], log_fd: int
) -> int:
    """Stay the program's parent: record how each run ends and restart it by policy.
    SIGTERM/SIGINT stop it for good; SIGHUP is ignored."""
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    grace = launch.deadline("stop")
    restarts = in_a_row = 0
    delay = RESTART_FIRST
    try:
        while True:
            with _stoppable():
                status = run.proc.wait()
            if not _restart_due(launch.restart, status):
                _write_state(
                    home, launch, **run.fields(state="exited", status=status, restarts=restarts)
                )
                return 0
            if time.monotonic() - run.began >= RESTART_RESET:
                delay, in_a_row = RESTART_FIRST, 0
            if in_a_row >= RESTART_LIMIT:
                reason = f"gave up after {in_a_row} restarts in a row"
                fields = run.fields(state="exited", status=status, restarts=restarts, reason=reason)
                _write_state(home, launch, **fields)
                return 0
            in_a_row += 1
            restarts += 1
            fields = run.fields(state="restarting", status=status, restarts=restarts, delay=delay)
            _write_state(home, launch, **fields)
            # what the ended run left in its group goes first: one instance at a time
            kill_group(run.proc.pid, grace, run.proc)
            with _stoppable():
                time.sleep(delay)
            delay = min(delay * 2, RESTART_CAP)
            proc = _spawn(launch, log_fd, env, restarts)
            run = _Run(proc, start_time(proc.pid), time.time())
            _write_state(
                home, launch, **run.fields(state="running", status=status, restarts=restarts)
            )
    except _Stop:
        kill_group(run.proc.pid, grace, run.proc)
        status = run.proc.wait()
        sweep(launch.triple, grace)
        _write_state(home, launch, **run.fields(state="stopped", status=status, restarts=restarts))
    except Failure as failure:  # a restart that could not start
        _write_state(home, launch, state="failed", reason=failure.reason, restarts=restarts)
    return 0


def _child(launch: protocol.Launch, home: str, secret: bytes, log_fd: int, out: int) -> int:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log_fd, 2)  # the supervisor's own errors land in the program log
    os.close(null)
    _cloexec_inherited()  # what sshd or a login shell left open stays out of the program
    # Signals stay deferred (see main) until the program exists, so one arriving mid-Popen
    # cannot lose the child being created; _supervise arms them right after the spawn.
    try:
        return _supervise(launch, home, secret, log_fd, out)
    except BaseException:
        _print_exc()
        return EXIT_AGENT
    finally:
        _drop_cgroup()  # when the program ended with nothing left in it: a stop removes it else


# ---- the front ----


def _open_log(home: str, name: str) -> int:
    logs = os.path.join(home, "logs")
    try:
        os.makedirs(logs, mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(os.path.join(logs, f"{name}.log"), flags, 0o600)
    except OSError as exc:
        raise Failure(EXIT_START, f"cannot open the program log: {exc.strerror}") from None


def _await(child: int, fd: int, launch: protocol.Launch) -> dict[str, Any]:
    """Read the supervisor's reports until its outcome; clean up if it dies or we are told to."""
    bound = time.monotonic() + sum(v for _, v in launch.deadlines) + launch.deadline("stop") + 5
    pgid = 0
    buf = b""
    try:
        _arm()
        while True:
            remaining = bound - time.monotonic()
            if remaining <= 0:
                raise Failure(EXIT_AGENT, "agent supervisor gave no outcome in time")
            if not select.select([fd], [], [], remaining)[0]:
                continue
            data = os.read(fd, 4096)
            if not data:
                raise Failure(EXIT_AGENT, "agent supervisor died")
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                report = protocol.loads(line.decode("ascii"))
                if "started" in report:
                    pgid = report["started"][1]
                else:
                    if not report["ok"]:
                        os.waitpid(child, 0)
                    return dict(report)
    except Failure as failure:
        _disarm()
        _end_supervisor(child, launch.deadline("stop") + 3)
        result = failure.result()
        if pgid > 1:
            kill_group(pgid, launch.deadline("stop"))
            result["pid"] = pgid
        return result


def _end_supervisor(child: int, within: float) -> None:
    """SIGTERM the supervisor (it kills the program's group first) and reap it; KILL if stuck."""
    try:
        os.kill(child, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + within
    while time.monotonic() < end:
        if os.waitpid(child, os.WNOHANG)[0]:
            return
        time.sleep(_POLL)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)


def _read_line(fd: int, within: float) -> bytes:
    """One line from ``fd`` (or what came before EOF, or MAX_LAUNCH + 1 bytes without a
    newline), which must be complete within ``within`` seconds. Read from the descriptor, not
    sys.stdin: its buffer would hide a partial line from select."""
    end = time.monotonic() + within
    buf = b""
    while b"\n" not in buf and len(buf) <= protocol.MAX_LAUNCH:
        remaining = end - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise Failure(EXIT_NO_LAUNCH, f"no launch message within {within:g}s")
        data = os.read(fd, 1 << 16)
        if not data:
            return buf
        buf += data
    return buf[: buf.find(b"\n") + 1 or protocol.MAX_LAUNCH + 1]


def _read_launch(wait: float | None = None) -> protocol.Launch:
    if wait is None:
        line = sys.stdin.buffer.readline(protocol.MAX_LAUNCH + 1)
    else:
        line = _read_line(sys.stdin.fileno(), wait)
    if not line.strip():
        raise Failure(EXIT_BAD_LAUNCH, "no launch message on stdin")
    try:
        return protocol.parse_launch(line)
    except protocol.LaunchError as exc:
        raise Failure(EXIT_BAD_LAUNCH, f"bad launch message: {exc}") from None


def _print(result: dict[str, Any]) -> int:
    # OSError: the launcher is gone; the exit code still tells
    with _suppress(OSError):
        sys.stdout.write(protocol.dumps(result) + "\n")
        sys.stdout.flush()
        if not result["ok"]:
            sys.stderr.write(f"rex-agent: {result['reason']}\n")
            sys.stderr.flush()
    return EXIT_OK if result["ok"] else int(result["exit"])


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


def _kill_request() -> int:
    """``--kill``: read the request line (run, step, grace) from stdin, then kill_tagged."""
    try:
        line = _read_line(sys.stdin.fileno(), protocol.KILL_WAIT)
        run, step, grace = protocol.parse_kill(line)
    except (Failure, protocol.LaunchError) as exc:
        reason = f"--kill needs its request (run, step, grace) on stdin: {exc}"
        return _print(Failure(EXIT_BAD_LAUNCH, reason).result())
    return kill_tagged(run, step, grace)


def kill_tagged(run: str, step: str, grace: float) -> int:
    """End every group run ``run`` started for ``step`` (SIGTERM, ``grace`` s, SIGKILL)."""
    if not protocol.RUN_RE.match(run) or not protocol.STEP_RE.match(step):
        return _print(Failure(EXIT_BAD_LAUNCH, "--kill needs a run id and a step id").result())
    groups = sorted(g for g in _tagged_groups(run, step) if g > 1 and g != os.getpgrp())
    for pgid in groups:
        kill_group(pgid, grace)
    sys.stdout.write(protocol.dumps({"ok": True, "killed": groups}) + "\n")
    return EXIT_OK


_USAGE = (
    "usage: agent [--wait SECONDS | --status | --stop PROGRAM [GRACE [force]]"
    " | --kill (request on stdin) | --load loadavg|cgroup SECONDS]"
)


def _modes(args: list[str]) -> int:
    """The modes that launch nothing: read or end what runs (--status, --stop, --kill), or
    measure what the host has to spare (--load); one JSON line on stdout each."""
    if args[:1] == ["--load"] and len(args) == 3 and args[1] in ("loadavg", "cgroup"):
        try:
            sample = float(args[2])
        except ValueError:
            sample = -1.0
        if 0 <= sample <= 60:
            sys.stdout.write(protocol.dumps(load_report(args[1], sample)) + "\n")
            return EXIT_OK
    if args == ["--kill"]:
        return _kill_request()
    if args == ["--status"]:
        return _print(status_report(rex_home()))
    if (
        args[:1] == ["--stop"]
        and 2 <= len(args) <= 4
        and protocol.NAME_RE.match(args[1])
        and args[3:] in ([], ["force"])
    ):
        try:
            grace = float(args[2]) if len(args) > 2 else 10.0
        except ValueError:
            grace = -1.0
        if 0 < grace <= 86400:
            return _print(stop_program(rex_home(), args[1], grace, force=args[3:] == ["force"]))
    return _print(Failure(EXIT_BAD_LAUNCH, _USAGE).result())


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the launch line on stdin (within ``--wait`` seconds), or one of the
    modes (see _USAGE)."""
    args = sys.argv[1:] if argv is None else argv
    wait = None
    if len(args) == 2 and args[0] == "--wait":
        with _suppress(ValueError):
            wait = float(args[1])
        if wait is None or not 0 < wait <= 86400:
            return _print(Failure(EXIT_BAD_LAUNCH, _USAGE).result())
    elif args:
        return _modes(args)
    _trap_signals()
    try:
        launch = _read_launch(wait)
        home = rex_home()
        secret = load_key(home, launch)
        lock_fd, replaced = _claim(home, launch)
        log_fd = _open_log(home, launch.log)
    except Failure as failure:
        return _print(failure.result())
    except _Same as same:
        return _prove_same(launch, secret, same)
    read_end, write_end = os.pipe()
    _disarm()  # until _await, which owns the child and kills it on a signal
    gc.freeze()  # a collection would otherwise copy every page the two processes share
    child = os.fork()
    if child == 0:
        os.close(read_end)
        code = EXIT_AGENT
        try:
            code = _child(launch, home, secret, log_fd, write_end)
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(log_fd)
    os.close(lock_fd)  # the supervisor holds the lock from here on
    result = _await(child, read_end, launch)
    if replaced:
        result["replaced"] = True
    code = _print(result)
    # the report is out and the supervisor owns the program: skip the interpreter's teardown
    with _suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
