"""Readiness: a program's ready probe (alive, tcp, http, command, file, or the notify socket)
tried until it passes, the program exits, or the ready deadline comes; and _connect, the TCP
connect the callback uses too."""

from __future__ import annotations

import os
import time

from rexplan.remote.agent.failure import EXIT_EXITED, EXIT_NOT_READY, Failure
from rexplan.remote.agent.procs import _Proc, _start, _TimeoutExpired
from rexplan.wire.launch import Probe
from rexplan.wire.probes import KINDS

#: characters of a ready timeout's reason (a command probe names its whole command line)
REASON_LIMIT = 1000

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
else:
    import _signal as signal
    import _socket as socket


def _tcp(probe: Probe, cwd: str | None, env: dict[str, str], budget: float) -> bool:
    try:
        _connect(probe.host or "", probe.port or 0, budget).close()
    except OSError:
        return False
    return True


def _http(probe: Probe, cwd: str | None, env: dict[str, str], budget: float) -> bool:
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


def _command(probe: Probe, cwd: str | None, env: dict[str, str], budget: float) -> bool:
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


def _file(probe: Probe, cwd: str | None, env: dict[str, str], budget: float) -> bool:
    return os.path.exists(os.path.join(cwd or os.getcwd(), probe.path or ""))


#: the check of each polled kind of probe (wire.probes.KINDS): passed or not, within budget
#: seconds; alive waits out its settle time and notify listens on its socket instead
CHECKS = {"tcp": _tcp, "http": _http, "command": _command, "file": _file}


def _probe_once(probe: Probe, cwd: str | None, env: dict[str, str], budget: float) -> bool:
    check = CHECKS.get(probe.kind)
    if check is None:
        raise ValueError(probe.kind)
    return check(probe, cwd, env, max(0.05, budget))


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
    probe: Probe,
    deadline: float,
    cwd: str | None,
    env: dict[str, str],
    notify: socket.socket | None,
    timeout: float,
) -> None:
    """Return once the probe passes; Failure at once if the program exits, or at the deadline
    (``timeout`` seconds after the start), naming the probe's target and the timeout."""
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
            reason = KINDS[probe.kind].describe(probe, timeout)[:REASON_LIMIT]
            raise Failure(EXIT_NOT_READY, reason)
        try:
            proc.wait(timeout=min(probe.interval, remaining))
        except _TimeoutExpired:
            continue
        raise _exited(proc)


def _close_notify(notify: socket.socket | None, path: str | None) -> None:
    """Close a _notify_socket and remove it and its directory."""
    if notify is not None and path is not None:
        notify.close()
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass


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
