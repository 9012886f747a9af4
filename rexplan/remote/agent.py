"""The agent rex ships to hosts: start a program, probe it, call the launcher back, supervise it.

Stdlib only, Python >= 3.8. It runs as one script, ``rexplan.remote.bundle()`` (this module
plus rexplan/protocol.py): ``python3 -I -S agent-<sha>.py``, or without a file on the host as
``python3 -I -S -c BOOTSTRAP <sha>`` with the bundle piped ahead of the launch message (see
rexplan.remote). Either way it reads ONE JSON launch line from stdin (protocol.parse_launch);
secrets (the key, the launch nonce nl) never appear in argv or the environment.

Processes. The *front* (the process SSH started) reads the launch line, checks and loads the
key, opens the program log, then forks the *supervisor*, which leaves the SSH session (setsid,
stdio on /dev/null, its own errors into the program log), starts the program in a session of
its own (pgid = pid), probes it, runs the handshake, and reports to the front over a pipe. The
front prints one JSON line on stdout (``{"ok": true, "pid", "pgid", "agent"}`` or ``{"ok":
false, "exit", "reason"[, "status"][, "pid"]}``; diagnostic only: the launcher trusts only the
callback) and exits, so the SSH command ends while the supervisor stays the program's parent:
it records REX_HOME/run/<program>.json (pid, pgid, start time, spec digest, state, status).

Exit codes of the front: 0 verified (ok), 10 key missing or insecure, 11 program could not be
started, 12 program exited before it was verified, 13 not ready by the ready deadline, 14 no
verdict by the callback deadline (launcher unreachable or silent), 15 rejected (``no``, or a
listener that could not prove it holds the key: no response is sent to it), 16 bad launch
message, 17 the supervisor died or failed; 128+N: the front got signal N.

Nothing is left behind on failure: before ``ok`` any failure, deadline or SIGTERM/SIGHUP/SIGINT
(to the front or the supervisor) kills the program's whole group (TERM, the launch's stop grace,
KILL); if the supervisor dies the front kills the group; if the launcher dies the callback
fails and the deadline applies. Not covered: SIGKILL of both front and supervisor before ``ok``
(the launcher then kills the group over SSH by the pgid it was told). Process groups <= 1 and
the agent's own group are never signalled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from rexplan import protocol

EXIT_OK = 0
EXIT_KEY = 10
EXIT_START = 11
EXIT_EXITED = 12
EXIT_NOT_READY = 13
EXIT_NO_CALLBACK = 14
EXIT_REJECTED = 15
EXIT_BAD_LAUNCH = 16
EXIT_AGENT = 17

_POLL = 0.02  # seconds between checks while waiting for a process group to die
_Timeout = socket.timeout  # not TimeoutError: they are one class only from Python 3.10 on


class Failure(Exception):
    """The launch failed: an exit code and a one-line reason that holds no secret."""

    def __init__(self, code: int, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "exit": self.code, "reason": self.reason}
        if self.status is not None:
            out["status"] = self.status
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
    return os.environ.get("REX_HOME") or os.path.join(os.path.expanduser("~"), ".rex")


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


def kill_group(pgid: int, grace: float, proc: subprocess.Popen[bytes] | None = None) -> None:
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


# ---- readiness ----


def _probe_once(probe: protocol.Probe, cwd: str | None, env: dict[str, str], budget: float) -> bool:
    budget = max(0.05, budget)
    if probe.kind == "tcp":
        try:
            socket.create_connection((probe.host, probe.port or 0), timeout=budget).close()
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
            done = subprocess.run(
                list(probe.argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                timeout=budget,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0
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


def _exited(proc: subprocess.Popen[bytes]) -> Failure:
    status = proc.returncode
    return Failure(EXIT_EXITED, f"program exited with status {status} before ready", status)


def wait_ready(
    proc: subprocess.Popen[bytes],
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
        except subprocess.TimeoutExpired:
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
        except subprocess.TimeoutExpired:
            continue
        raise _exited(proc)


def _notify_socket(home: str) -> tuple[socket.socket, str]:
    """An sd_notify-style datagram socket in a fresh 0700 directory."""
    run = os.path.join(home, "run")
    os.makedirs(run, mode=0o700, exist_ok=True)
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


def _handshake(
    launch: protocol.Launch, secret: bytes, pid: int, start: str, deadline: float
) -> None:
    k_l, k_a = protocol.direction_keys(secret)
    remaining = deadline - time.monotonic()
    try:
        sock = socket.create_connection(launch.callback, timeout=max(0.001, remaining))
    except _Timeout:
        raise  # the deadline: handled by call_back, not retried
    except OSError:
        raise _Retry() from None
    with sock:
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
            raise Failure(EXIT_REJECTED, f"launcher refused the callback (ref {chal['ref']})")
        ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
        if not protocol.verify_launcher_proof(k_l, t, ns, launch.nl, lp):
            raise Failure(EXIT_REJECTED, "the listener could not prove it holds the key")
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
            raise Failure(EXIT_REJECTED, f"launcher refused the callback (ref {verdict['ref']})")
        if not protocol.verify_ok_mac(k_l, t, ns, launch.nl, ap, bytes.fromhex(verdict["mac"])):
            raise Failure(EXIT_REJECTED, "the verdict is not authenticated")


def call_back(
    launch: protocol.Launch,
    secret: bytes,
    proc: subprocess.Popen[bytes],
    start: str,
    deadline: float,
) -> None:
    """Run the handshake until ``ok``; dials again while the listener refuses or resets."""
    where = f"{launch.callback[0]}:{launch.callback[1]}"
    delay = 0.05
    while True:
        if proc.poll() is not None:
            raise _exited(proc)
        try:
            _handshake(launch, secret, proc.pid, start, deadline)
            return
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


# ---- the supervisor ----


def _write_state(home: str, launch: protocol.Launch, **fields: Any) -> None:
    """Atomically replace REX_HOME/run/<program>.json; a failure only goes to the log, since
    the state is a record and must not cost a verified program its life."""
    try:
        _replace_state(home, launch, fields)
    except OSError:
        traceback.print_exc()


def _replace_state(home: str, launch: protocol.Launch, fields: dict[str, Any]) -> None:
    run = os.path.join(home, "run")
    os.makedirs(run, mode=0o700, exist_ok=True)
    state = {
        "run": launch.run,
        "step": launch.step,
        "triple": launch.triple,
        "kind": launch.kind,
        "spec": protocol.spec_digest(launch),
        "agent": os.getpid(),
        "updated": time.time(),
    }
    state.update(fields)
    fd, tmp = tempfile.mkstemp(prefix=f".{launch.log}.", dir=run)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, sort_keys=True)
        os.replace(tmp, os.path.join(run, f"{launch.log}.json"))
    except BaseException:
        os.unlink(tmp)
        raise


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
    try:
        os.write(fd, json.dumps(obj).encode("ascii") + b"\n")
    except OSError:
        pass  # the front is gone; the outcome stands without it


def _spawn(launch: protocol.Launch, log_fd: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    os.write(log_fd, f"--- rex: run {launch.run} step {launch.step} starting\n".encode())
    try:
        return subprocess.Popen(
            list(launch.argv),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            cwd=launch.cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise Failure(EXIT_START, f"cannot start {launch.argv[0]!r}: {exc.strerror}") from None


def _supervise(launch: protocol.Launch, home: str, secret: bytes, log_fd: int, out: int) -> int:
    """The supervisor's life; returns its exit code. ``out`` is the report pipe to the front."""
    began = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    notify_path: str | None = None
    try:
        if launch.ready.kind == "notify":
            notify, notify_path = _notify_socket(home)
        env = _program_env(launch, notify_path)
        proc = _spawn(launch, log_fd, env)
        start = start_time(proc.pid)
        _report(out, {"started": [proc.pid, proc.pid]})
        _arm()
        if time.monotonic() - began > launch.deadline("start"):
            raise Failure(EXIT_START, "program did not start by the start deadline")
        ready_by = time.monotonic() + launch.deadline("ready")
        wait_ready(proc, launch.ready, ready_by, launch.cwd, env, notify)
        call_back(launch, secret, proc, start, time.monotonic() + launch.deadline("callback"))
    except BaseException as exc:
        _disarm()
        if not isinstance(exc, Failure):
            traceback.print_exc()  # into the program log
        failure = exc if isinstance(exc, Failure) else Failure(EXIT_AGENT, "agent failed")
        result = failure.result()
        if proc is not None:
            kill_group(proc.pid, launch.deadline("stop"), proc)
            result["pid"] = proc.pid
        _report(out, result)
        return failure.code
    finally:
        if notify is not None and notify_path is not None:
            notify.close()
            with contextlib.suppress(OSError):
                os.unlink(notify_path)
                os.rmdir(os.path.dirname(notify_path))
    pid = proc.pid
    _write_state(home, launch, pid=pid, pgid=pid, start=start, state="running", status=None)
    _report(out, {"ok": True, "pid": pid, "pgid": pid, "agent": os.getpid()})
    os.close(out)
    return _after_ok(launch, home, proc, start)


def _stop(signum: int, frame: object) -> None:
    raise _Stop()


def _after_ok(launch: protocol.Launch, home: str, proc: subprocess.Popen[bytes], start: str) -> int:
    """Stay the program's parent until it ends; SIGTERM/SIGINT stop it, SIGHUP is ignored."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    state = "exited"
    try:
        proc.wait()
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        state = "stopped"
        kill_group(proc.pid, launch.deadline("stop"), proc)
        proc.wait()
    status = proc.returncode
    _write_state(home, launch, pid=proc.pid, pgid=proc.pid, start=start, state=state, status=status)
    return 0


def _child(launch: protocol.Launch, home: str, secret: bytes, log_fd: int, out: int) -> int:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log_fd, 2)  # the supervisor's own errors land in the program log
    os.close(null)
    # Signals stay deferred (see main) until the program exists, so one arriving mid-Popen
    # cannot lose the child being created; _supervise arms them right after the spawn.
    try:
        return _supervise(launch, home, secret, log_fd, out)
    except BaseException:
        traceback.print_exc()
        return EXIT_AGENT


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
                report = json.loads(line)
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


def _read_launch() -> protocol.Launch:
    line = sys.stdin.buffer.readline(protocol.MAX_LAUNCH + 1)
    if not line.strip():
        raise Failure(EXIT_BAD_LAUNCH, "no launch message on stdin")
    try:
        return protocol.parse_launch(line)
    except protocol.LaunchError as exc:
        raise Failure(EXIT_BAD_LAUNCH, f"bad launch message: {exc}") from None


def _print(result: dict[str, Any]) -> int:
    try:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        if not result["ok"]:
            sys.stderr.write(f"rex-agent: {result['reason']}\n")
            sys.stderr.flush()
    except OSError:
        pass  # the launcher is gone; the exit code still tells
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


def kill_tagged(run: str, step: str, grace: float) -> int:
    """``--kill RUN STEP [GRACE]``: end every group this run started for the step."""
    if not protocol.RUN_RE.match(run) or not protocol.STEP_RE.match(step):
        return _print(Failure(EXIT_BAD_LAUNCH, "--kill needs a run id and a step id").result())
    groups = sorted(g for g in _tagged_groups(run, step) if g > 1 and g != os.getpgrp())
    for pgid in groups:
        kill_group(pgid, grace)
    sys.stdout.write(json.dumps({"ok": True, "killed": groups}) + "\n")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the launch line on stdin, or ``--kill RUN STEP [GRACE]``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--kill"] and len(args) in (3, 4):
        return kill_tagged(args[1], args[2], float(args[3]) if len(args) == 4 else 2.0)
    if args:
        return _print(Failure(EXIT_BAD_LAUNCH, "usage: agent [--kill RUN STEP [GRACE]]").result())
    _trap_signals()
    try:
        launch = _read_launch()
        home = rex_home()
        secret = load_key(home, launch)
        log_fd = _open_log(home, launch.log)
    except Failure as failure:
        return _print(failure.result())
    read_end, write_end = os.pipe()
    _disarm()  # until _await, which owns the child and kills it on a signal
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
    return _print(_await(child, read_end, launch))


if __name__ == "__main__":
    sys.exit(main())
