"""``become``: run a program as another account than the SSH login, through ``sudo -n``.

The privileges are split in two processes:

- the keeper, forked by the front in place of the supervisor, runs as the login: it alone
  reads the key (0600, the login's), holds the program's lock, and writes its records into the
  login's REX_HOME, where ``--status``, ``--stop``, the launch stub's check and the launcher's
  SFTP reads find them. The records name it as the program's ``agent``, so a stop signals it.
- the supervisor runs as the account, started by the keeper through ``sudo -n -u ACCOUNT --
  python3 -I -S -c STUB`` with the agent's compiled modules, the launch line, the secret and
  the program's files on its stdin (never argv or environment). It forks once more (so no
  sudo process stays behind), writes the files into the account's own ``~/.rex/files/``,
  owned by it, and then is the usual supervisor: it starts, probes, calls back, restarts and
  stops the program, with its launch watchdog, all as the account. Its reports and records go
  to the keeper over a pipe (its stdout); the program log is the descriptor the front opened
  (its stderr).

The keeper tells the supervisor to stop by a line on the supervisor's stdin; the keeper's end
closing (it died: ``rex stop --force`` SIGKILLs it) stops the program at once. The supervisor
hears both by SIGIO on that pipe, as if it got SIGTERM. ``sudo -n`` never prompts: where it
wants a password (or has no rule) it fails at once, and the launch fails with EXIT_BECOME and
a hint.
"""

from __future__ import annotations

import fcntl
import os
import sys

from rexplan.remote.agent.failure import (
    EXIT_AGENT,
    EXIT_BECOME,
    EXIT_START,
    Failure,
    _disarm,
    _Forced,
    _print,
    _suppress,
    _trap_signals,
)
from rexplan.remote.agent.files import files_dir
from rexplan.remote.agent.groups import kill_group, same_process, start_time, sweep
from rexplan.remote.agent.logpump import LogPump, log_path
from rexplan.remote.agent.procs import _cloexec_inherited
from rexplan.remote.agent.records import _Sink, _store, _write_state
from rexplan.remote.agent.supervisor import _child
from rexplan.wire import jsonstrict
from rexplan.wire.chars import safe_relpath
from rexplan.wire.launch import MAX_LAUNCH, Launch, LaunchError, parse_launch, spec_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal

#: ``python3 -I -S -c STUB`` as the account: serve the modules whose marshalled code comes
#: first on stdin (length-prefixed) under their names, then run become.inner()
STUB = """import sys,marshal
from _frozen_importlib import ModuleSpec
b=sys.stdin.buffer
c=dict(marshal.loads(b.read(int(b.readline(32)))))
p={n.rpartition(".")[0] for n in c}-{""}
for n in list(p):
    while "." in n:
        n=n.rpartition(".")[0];p.add(n)
class M:
    def find_spec(s,n,a=None,t=None):
        return ModuleSpec(n,s,is_package=n in p) if n in c or n in p else None
    def create_module(s,x):
        return None
    def exec_module(s,m):
        k=c.get(m.__name__)
        if k is not None:
            m.__file__=k.co_filename;exec(k,m.__dict__)
sys.meta_path.insert(0,M())
sys.exit(__import__("rexplan.remote.agent.become",fromlist=["inner"]).inner())
"""

#: the most of sudo's own complaint kept for the failure's reason
_SUDO_SAYS = 300


def login_name() -> str:
    """This process's account name (the SSH login, on the keeper's side)."""
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def needs_sudo(launch: Launch) -> bool:
    """Whether the launch asks for another account than this process's."""
    return launch.become is not None and launch.become != login_name()


def sudo_argv(account: str) -> list[str]:
    """The supervisor's command: sudo never prompts (-n); the account name is checked
    (wire.chars.BECOME_RE), never an option, and ``--`` ends sudo's own."""
    return ["sudo", "-n", "-u", account, "--", sys.executable, "-I", "-S", "-c", STUB]


def hint(account: str) -> str:
    login = login_name()
    return (
        f"give {login} NOPASSWD sudo for {account}, e.g. the sudoers line "
        f"'{login} ALL=({account}) NOPASSWD: ALL' in /etc/sudoers.d/ (visudo -f)"
    )


def _codes() -> bytes:
    """The agent's modules, compiled, marshalled: what the bundle's finder serves, or (an
    agent run from an installed rexplan, as in tests) compiled from the package's files."""
    import marshal

    for finder in sys.meta_path:
        codes = getattr(finder, "codes", None)
        if type(finder).__name__ == "_RexModules" and isinstance(codes, dict):
            return marshal.dumps(tuple(codes.items()))
    found = []
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not name.startswith(("rexplan.wire", "rexplan.remote")) or not path:
            continue
        with open(path, "rb") as f:
            found.append((name, compile(f.read(), path, "exec")))
    # the modules inner() imports that this agent run may not have loaded
    base = os.path.dirname(os.path.abspath(__file__))
    for entry in sorted(os.listdir(base)):
        name = f"rexplan.remote.agent.{entry[:-3]}"
        if entry.endswith(".py") and entry != "__init__.py" and name not in dict(found):
            with open(os.path.join(base, entry), "rb") as f:
                found.append((name, compile(f.read(), os.path.join(base, entry), "exec")))
    return marshal.dumps(tuple(found))


def _payload(home: str, launch: Launch, line: bytes, secret: bytes) -> bytes:
    """The supervisor's stdin: modules, launch line, secret (hex), then each file as a
    ``[dest, mode, size]`` line and its bytes."""
    codes = _codes()
    parts = [b"%d\n" % len(codes), codes, line.rstrip(b"\n") + b"\n", secret.hex().encode() + b"\n"]
    base = files_dir(home, launch.log)
    for dest, _sha, mode in launch.files:
        try:
            with open(os.path.join(base, dest), "rb") as f:
                data = f.read()
        except OSError as exc:
            raise Failure(EXIT_START, f"cannot read file {dest}: {exc.strerror}") from None
        parts += [jsonstrict.dumps([dest, mode, len(data)]).encode("ascii") + b"\n", data]
    return b"".join(parts)


class _Keeper:
    """The keeper's state, for its signal handler: the write end of the control pipe, whether
    the supervisor listens on it yet (it says so once it read all it was sent: a stop line
    before that would land amid what it reads), and a stop asked before."""

    control = -1
    listening = False
    stop = False


def _on_keeper_signal(signum: int, frame: object) -> None:
    # SIGTERM/SIGINT (a stop, or the front giving up): ask the supervisor to stop
    _Keeper.stop = True
    _tell_stop()


def _tell_stop() -> None:
    if _Keeper.stop and _Keeper.listening and _Keeper.control >= 0:
        with _suppress(OSError):
            os.write(_Keeper.control, b"stop\n")
        _Keeper.stop = False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def keep(launch: Launch, line: bytes, home: str, secret: bytes, log_fd: int, out: int) -> int:
    """The keeper (see the module docstring), in the front's forked child; its exit code."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    # the login's log is this keeper's to write and rotate: the account's supervisor (and
    # sudo's complaints) write into its pump, the keeper's own errors too
    pump = LogPump(log_path(home, launch.log), log_fd, *launch.logs)
    os.dup2(pump.write_fd, 2)
    os.close(null)
    _cloexec_inherited()
    pump.run()
    try:
        payload = _payload(home, launch, line, secret)
    except Failure as failure:
        _write_state(home, launch, state="failed", reason=failure.reason, restarts=0)
        _send(out, failure.result())
        _let_go(pump)
        return failure.code
    del secret
    control_r, control_w = os.pipe()
    reports_r, reports_w = os.pipe()
    pump.drain()
    said = os.lseek(pump.fd, 0, os.SEEK_END)
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(control_r, 0)
            os.dup2(reports_w, 1)
            os.dup2(pump.write_fd, 2)
            argv = sudo_argv(str(launch.become))
            os.execvp(argv[0], argv)
        except OSError as exc:
            with _suppress(OSError):
                os.write(2, f"rex: cannot run sudo: {exc.strerror}\n".encode())
        finally:
            os._exit(127)
    os.close(control_r)
    os.close(reports_w)
    _Keeper.control = control_w
    signal.signal(signal.SIGTERM, _on_keeper_signal)
    signal.signal(signal.SIGINT, _on_keeper_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _disarm()
    with _suppress(OSError):  # the supervisor went before it read it all: reported below
        _write_all(control_w, payload)
    final = _relay(launch, home, reports_r, out, pump.path)
    os.close(reports_r)
    with _suppress(ChildProcessError):
        os.waitpid(pid, 0)
    if final is None:  # nothing came back: sudo refused, or the supervisor died unheard
        pump.drain()
        refused = _refused(launch, pump.fd, said)
        _write_state(home, launch, state="failed", reason=refused.reason, restarts=0)
        _send(out, refused.result())
    _let_go(pump)
    return 0


def _let_go(pump: LogPump) -> None:
    """The keeper ends: its stderr lets go of the pump's pipe, which drains into the log."""
    with _suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    pump.finish()


def _refused(launch: Launch, log_fd: int, said: int) -> Failure:
    """The failure of a supervisor that never reported: what sudo said (into the log, from
    offset ``said``), shortened and printable, with the hint."""
    try:
        text = os.pread(log_fd, 4096, said).decode("utf-8", "replace")
    except OSError:
        text = ""
    words = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if "rex-agent:" in words or "Traceback" in words:
        return Failure(EXIT_AGENT, f"the supervisor as {launch.become} died (see the log)")
    said_text = words[:_SUDO_SAYS] or "no reason given"
    account = str(launch.become)
    reason = f"become {account}: sudo -n failed ({said_text}); {hint(account)}"
    return Failure(EXIT_BECOME, reason)


def _send(out: int, obj: dict[str, Any]) -> None:
    if out >= 0:
        with _suppress(OSError):
            os.write(out, jsonstrict.dumps(obj).encode("ascii") + b"\n")


def _relay(launch: Launch, home: str, fd: int, out: int, log: str) -> dict[str, Any] | None:
    """Pass the supervisor's reports on to the front and write its records, as this login,
    into REX_HOME, until it is gone; its launch outcome (None if none came)."""
    me, me_start = os.getpid(), start_time(os.getpid())
    final: dict[str, Any] | None = None
    buf = b""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            data = b""
        if not data:
            return final
        buf += data
        if len(buf) > MAX_LAUNCH and b"\n" not in buf:
            buf = b""  # the account sends no line this long: dropped, never held
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                report = jsonstrict.loads(line.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(report, dict):
                continue
            if report.get("listening") is True:
                _Keeper.listening = True
                _tell_stop()
                continue
            record = report.get("record")
            if isinstance(record, dict):
                # this keeper is the program's agent here: the one a stop can signal; who
                # and what it is come from the launch, not from the account
                record.update(agent=me, agent_start=me_start, become=launch.become)
                record.update(run=launch.run, step=launch.step, triple=launch.triple)
                record.update(spec=spec_digest(launch), cgroup=None)
                with _suppress(OSError):
                    _store(home, launch.log, record)
                continue
            if "started" in report:
                # the group is the account's: the front could not signal it (pgid 0: none)
                report["started"] = [report["started"][0], 0]
            elif "ok" in report:
                if "log" in report:
                    report["log"] = log  # the login's log, which the keeper writes
                if report.get("ok") is True:
                    report["agent"] = me
                final = report
            _send(out, report)
            if final is not None and out >= 0:
                os.close(out)
                out = -1


# ---- the account's side ----


class _Control:
    """The supervisor's end of the keeper's control pipe."""

    fd = -1


def _on_control(signum: int, frame: object) -> None:
    """SIGIO on the control pipe: ``stop`` asks for a stop, its end closing (the keeper is
    gone) forces one; both reach the supervisor as its SIGTERM."""
    try:
        data = os.read(_Control.fd, 64)
    except OSError:
        return  # nothing to read: not for us
    if not data:
        _Forced.on = True
        # nothing more will come: stop listening, or the end of file would signal again
        with _suppress(OSError):
            fcntl.fcntl(_Control.fd, fcntl.F_SETFL, 0)
    os.kill(os.getpid(), signal.SIGTERM)


def _listen(fd: int) -> None:
    _Control.fd = fd
    signal.signal(signal.SIGIO, _on_control)
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC | os.O_NONBLOCK)


def _own_home() -> str:
    """The account's REX_HOME: ``~/.rex`` of its passwd entry (sudo resets the environment),
    made 0700 if missing."""
    import pwd

    home = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".rex")
    try:
        os.makedirs(home, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise Failure(EXIT_START, f"cannot make {home}: {exc.strerror}") from None
    return home


def _write_files(home: str, launch: Launch, src: Any) -> None:
    """The program's files from the keeper, into the account's REX_HOME/files/<program>/,
    replaced atomically, owned by the account (the supervisor checks their sha256)."""
    base = files_dir(home, launch.log)
    for _ in launch.files:
        head = jsonstrict.loads(src.readline(4096).decode("ascii"))
        dest, mode, size = head
        if not isinstance(dest, str) or not safe_relpath(dest) or type(size) is not int:
            raise Failure(EXIT_START, "bad file from the keeper")
        data = src.read(size)
        path = os.path.join(base, dest)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.rex-become.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, data)
            os.fchmod(fd, int(mode) & 0o7777)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def end_as(account: str, pid: int, start: str, triple: str, grace: float, force: bool) -> list[int]:
    """End, as ``account`` (``sudo -n``), what a become program left running without its
    supervisor: its group (TERM, ``grace``, KILL; ``force``: KILL) and the account's processes
    tagged with its triple. The pids found; Failure(EXIT_BECOME) when sudo would not."""
    codes = _codes()
    request = jsonstrict.dumps({"end": [pid, start, triple, grace, force]}).encode("ascii")
    data = b"%d\n" % len(codes) + codes + request + b"\n"
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            argv = sudo_argv(account)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    os.close(in_r)
    os.close(out_w)
    with _suppress(OSError):  # sudo refused, reading nothing: reported below
        _write_all(in_w, data)
    os.close(in_w)
    out = b""
    while len(out) < 1 << 16:
        chunk = os.read(out_r, 4096)
        if not chunk:
            break
        out += chunk
    os.close(out_r)
    os.waitpid(child, 0)
    try:
        report = jsonstrict.loads(out.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        report = None
    if not isinstance(report, dict) or report.get("ok") is not True:
        raise Failure(EXIT_BECOME, f"become {account}: sudo -n would not end it; {hint(account)}")
    return [p for p in report.get("killed", []) if type(p) is int]


def _end(line: bytes) -> int:
    """end_as's request, as the account: one JSON report on stdout."""
    try:
        pid, start, triple, grace, force = jsonstrict.loads(line.decode("ascii"))["end"]
        if type(pid) is not int or not isinstance(grace, (int, float)) or grace < 0:
            raise ValueError("bad request")
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        return _print(Failure(EXIT_AGENT, f"bad end request: {exc}").result())
    killed = []
    if pid > 1 and pid != os.getpgrp() and same_process(pid, start):
        killed.append(pid)
        if force:
            with _suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        else:
            kill_group(pid, float(grace))
    killed += sweep(str(triple), float(grace), bool(force))
    return _print({"ok": True, "killed": sorted(set(killed))})


def _undumpable() -> None:
    """The secret is in this process's memory: no core dump, and no ptrace or /proc/PID/mem
    for the account's other processes (PR_SET_DUMPABLE 0; exec makes the program dumpable)."""
    with _suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)


def inner() -> int:
    """The supervisor's start as the account (STUB runs it under sudo): read what the keeper
    sent, leave sudo behind (a second fork) and supervise. Its report goes to stdout. Or
    end_as's request (a line ``{"end": ...}``)."""
    src = sys.stdin.buffer
    line = src.readline(MAX_LAUNCH + 1)
    if line.startswith(b'{"end":'):
        return _end(line)
    _undumpable()
    try:
        launch = parse_launch(line)
        secret = bytes.fromhex(src.readline(256).strip().decode("ascii"))
        home = _own_home()
        os.environ["REX_HOME"] = home  # the program's files and working directory
        _write_files(home, launch, src)
    except (Failure, LaunchError, OSError, ValueError, TypeError) as exc:
        failure = exc if isinstance(exc, Failure) else Failure(EXIT_START, f"become: {exc}")
        return _print(failure.result())
    _trap_signals()
    _disarm()  # as in the front before its fork: _supervise arms them
    if os.fork():
        os._exit(0)  # sudo ends with this; the supervisor lives on, reparented
    control = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    reports = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    _Sink.fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    log_fd = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 3)
    _listen(control)
    _on_control(signal.SIGIO, None)  # the keeper gone already: no SIGIO would tell
    os.write(reports, b'{"listening": true}\n')  # the keeper may send a stop from now on
    code = EXIT_AGENT
    try:
        code = _child(launch, home, secret, log_fd, reports, relay=True)
    finally:
        os._exit(code)
