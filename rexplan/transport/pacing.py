"""Handshake pacing: at most max_startups handshakes to one sshd, dropped ones retried.

sshd counts a connection from accept until authentication completes; past the start value of
MaxStartups (OpenSSH default 10:30:100) it drops new ones at random, right after accept. A
launcher dialling one sshd for many hosts entries or logins at once must stay below that.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from rexplan.core.model import Host
from rexplan.errors import (
    AuthenticationError,
    HostKeyError,
    HostTimeoutError,
    TransportError,
    UnreachableError,
)


class HandshakeGate:
    """At most ``limit`` unauthenticated handshakes to one sshd at a time; safe across threads.

    Hosts entries naming the same sshd may disagree on ``max_startups``: the smallest wins.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a handshake gate needs a limit of at least 1")
        self._cond = threading.Condition()
        self._limit = limit
        self._in_flight = 0
        self._waiting = 0

    @property
    def limit(self) -> int:
        """The smallest limit asked for so far."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Handshakes admitted and not yet released."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Callers blocked in acquire()."""
        return self._waiting

    def acquire(self, limit: int, timeout: float | None = None) -> bool:
        """Wait for a slot (lowering the gate's limit to ``limit``); False after ``timeout``."""
        if limit < 1:
            raise ValueError("a handshake gate needs a limit of at least 1")
        with self._cond:
            self._limit = min(self._limit, limit)
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: self._in_flight < self._limit, timeout):
                    return False
            finally:
                self._waiting -= 1
            self._in_flight += 1
            return True

    def dropped(self) -> None:
        """The sshd dropped a handshake this gate admitted (call before its release): its
        MaxStartups is below what got through, so admit no more than the others still in
        flight, at least one. The limit stays lowered for the gate's lifetime."""
        with self._cond:
            self._limit = max(1, min(self._limit, self._in_flight - 1))

    def release(self) -> None:
        """Give back a slot taken by acquire()."""
        with self._cond:
            if self._in_flight < 1:
                raise RuntimeError("handshake gate released more often than acquired")
            self._in_flight -= 1
            self._cond.notify()


class HandshakeGates:
    """The handshake gate of every sshd, by (address, port): several hosts or logins may share
    one sshd, and they must share its gate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gates: dict[tuple[str, int], HandshakeGate] = {}

    def gate(self, address: str, port: int, limit: int) -> HandshakeGate:
        """The gate of the sshd at ``address``:``port``, created with ``limit`` on first use."""
        with self._lock:
            gate = self._gates.get((address, port))
            if gate is None:
                gate = self._gates[(address, port)] = HandshakeGate(limit)
            return gate


#: the process-wide registry SSHTransport.open uses: every pool and thread shares it
HANDSHAKE_GATES = HandshakeGates()


@dataclass(frozen=True)
class HandshakeRetry:
    """Full-jitter exponential backoff for handshakes an sshd dropped: ``attempts`` in all,
    the pause before retry n drawn uniformly from [0, min(cap, base * 2**(n-1))]."""

    attempts: int = 4
    base: float = 0.1
    cap: float = 2.0

    def delay(self, retry: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        """The pause before retry number ``retry`` (1: the second attempt)."""
        return uniform(0.0, min(self.cap, self.base * 2 ** (retry - 1)))


_T = TypeVar("_T")
#: what sshd's early drop looks like through paramiko: EOF or reset while reading the banner
#: ("Error reading SSH protocol banner") or during the key exchange
_DROP_ERRORS = (EOFError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def dropped_by_server(exc: BaseException) -> bool:
    """True if ``exc`` (from SSHTransport's connect) is the sshd closing the connection during
    the banner exchange or the key exchange: what MaxStartups' random early drop looks like.

    Timeouts, refused connections, authentication and host-key failures are never drops.
    """
    if not isinstance(exc, TransportError) or exc.phase not in ("banner", "kex"):
        return False
    if isinstance(exc, (HostTimeoutError, UnreachableError, AuthenticationError, HostKeyError)):
        return False
    seen: BaseException | None = exc.__cause__
    while seen is not None:
        if isinstance(seen, _DROP_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_dropped(
    attempt: Callable[[], _T],
    *,
    deadline: float,
    policy: HandshakeRetry = HandshakeRetry(),
    retryable: Callable[[BaseException], bool] = dropped_by_server,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    uniform: Callable[[float, float], float] = random.uniform,
) -> _T:
    """``attempt()``, tried again after a jittered pause while it fails ``retryable``, at most
    ``policy.attempts`` times, and only when the pause ends before ``deadline`` (``clock``
    time); the last error is raised as is."""
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except Exception as e:
            if tries >= policy.attempts or not retryable(e):
                raise
            pause = policy.delay(tries, uniform)
            if clock() + pause >= deadline:
                raise
            sleep(pause)


def gave_up(exc: TransportError, host: Host, attempts: int) -> TransportError:
    reason = str(exc).removeprefix(f"{exc.host}: {exc.phase}: ")
    return TransportError(
        f"{reason} ({attempts} attempts, each dropped before authentication)",
        host=host.name,
        phase=exc.phase,
        hint=f"its sshd drops connections past MaxStartups: set hosts.{host.name}.max_startups "
        f"(now {host.max_startups}) to its sshd's MaxStartups start value, or raise that",
    )
