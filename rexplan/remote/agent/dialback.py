"""The callback: connect to the launcher's listener, run the mutually authenticated handshake
(protocol frames), and report ok, the same program (``same``) or a declined launch (``decl``)."""

from __future__ import annotations

import os
import time

from rexplan.remote.agent.failure import (
    EXIT_NO_CALLBACK,
    EXIT_REJECTED,
    Failure,
    _suppress,
    _Timeout,
)
from rexplan.remote.agent.groups import start_time
from rexplan.remote.agent.probes import _connect, _exited
from rexplan.remote.agent.procs import _Proc
from rexplan.wire import codes, frames, handshake, jobs, keyfile, messages
from rexplan.wire.launch import Launch

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import Any
else:
    import _socket as socket


class _Retry(Exception):
    """The listener closed before its challenge (busy or restarting): dial again."""


def _recv(
    sock: socket.socket, reader: frames.FrameReader, deadline: float, *expected: str
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
            return messages.check_message(msg, *expected)


def _send(sock: socket.socket, frame: bytes, deadline: float) -> None:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(frame)


class _Link:
    """A job's connection to the launcher after ``ok``, and the session its frames are MAC'd
    with."""

    def __init__(
        self, sock: socket.socket, reader: frames.FrameReader, session: jobs.Session
    ) -> None:
        self.sock = sock
        self.reader = reader
        self.session = session


def _handshake(
    launch: Launch,
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
    k_l, k_a = handshake.direction_keys(secret)
    remaining = deadline - time.monotonic()
    try:
        sock = _connect(launch.callback[0], launch.callback[1], max(0.001, remaining))
    except _Timeout:
        raise  # the deadline: handled by call_back, not retried
    except OSError:
        raise _Retry() from None
    try:
        hello = handshake.make_hello(
            run=launch.run,
            step=launch.step,
            triple=launch.triple,
            key_id=keyfile.key_id(secret),
            na=handshake.new_nonce(),
            pid=pid,
            pgid=pid,
            start=start,
        )
        t = handshake.transcript(hello)
        reader = frames.FrameReader()
        try:
            _send(sock, frames.encode_frame(hello), deadline)
            chal = _recv(sock, reader, deadline, "chal", "no")
        except _Timeout:
            raise
        except (EOFError, OSError):
            raise _Retry() from None
        if chal["t"] == "no":
            refused = f"launcher refused the callback (ref {chal['ref']})"
            raise Failure(EXIT_REJECTED, refused, key_id=hello["key_id"])
        ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
        if not handshake.verify_launcher_proof(k_l, t, ns, launch.nl, lp):
            raise Failure(EXIT_REJECTED, "the listener could not prove it holds the key")
        if decline is not None or same:
            if decline is not None:
                decl = handshake.make_decl(k_a, t, ns, launch.nl, lp, decline)
            else:
                decl = handshake.make_same(k_a, t, ns, launch.nl, lp)
            with _suppress(OSError, EOFError, _Timeout):
                _send(sock, frames.encode_frame(decl), deadline)
                # the listener decides and closes: wait for it, so no reset loses the frame
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                while sock.recv(64):
                    pass
            sock.close()
            return None
        ap = handshake.agent_proof(k_a, t, ns, launch.nl, lp)
        try:
            _send(sock, frames.encode_frame(handshake.make_resp(ap)), deadline)
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
        if not handshake.verify_ok_mac(k_l, t, ns, launch.nl, ap, bytes.fromhex(verdict["mac"])):
            raise Failure(EXIT_REJECTED, "the verdict is not authenticated")
    except BaseException:
        sock.close()
        raise
    if launch.kind != "job":
        sock.close()
        return None
    return _Link(sock, reader, jobs.Session.of((k_l, k_a), t, ns, launch.nl, ap))


def _dial(
    launch: Launch,
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
        except codes.FrameError as exc:
            raise Failure(EXIT_REJECTED, f"the listener broke {messages.VERSION}: {exc}") from None
        except _Retry:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure(EXIT_NO_CALLBACK, f"cannot reach {where}") from None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)


def call_back(
    launch: Launch,
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


def same_back(launch: Launch, secret: bytes, pid: int, start: str, deadline: float) -> None:
    """Prove to the listener that the program ``pid`` (started at ``start``) runs the launch's
    spec already (nothing was started)."""
    _dial(launch, deadline, lambda: _handshake(launch, secret, pid, start, deadline, same=True))


def decline_back(launch: Launch, secret: bytes, reason: str, deadline: float) -> None:
    """Prove to the listener that this host declines the launch (nothing was started)."""
    pid = os.getpid()
    start = start_time(pid)
    _dial(launch, deadline, lambda: _handshake(launch, secret, pid, start, deadline, reason))
