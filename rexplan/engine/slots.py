"""A listener's connections, its handshake slots (the limits per peer address and in all,
eviction) and its account of attempts (counts, log lines, the summary of refusals)."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections import Counter
from typing import Any

from rexplan.engine.pending import StepState
from rexplan.wire import codes, frames, jobs

#: a connection's states: awaiting its hello, its answer to the challenge, a verified job's
#: frames, or nothing more
HELLO, RESP, JOB, DONE = "hello", "resp", "job", "done"

#: seconds a new connection has to deliver its complete hello: a real agent sends it as soon
#: as it is connected, so a silent or trickling peer loses its slot after that
HELLO_TIMEOUT = 2.0
#: seconds a whole handshake may take, counted from the connect
HANDSHAKE_TIMEOUT = 5.0
#: connections in the handshake at once, in all and from one peer address
MAX_HANDSHAKES = 256
MAX_PER_SOURCE = 128
#: seconds between the WARNING lines that sum up refused and failed connections
REPORT_EVERY = 10.0
#: peer addresses a summary counts apart (more are counted together as "others")
KEPT_SOURCES = 1024


class Conn:
    """One connection to the listener and its handshake's state."""

    __slots__ = (
        "closed",
        "due",
        "hello",
        "id",
        "lp",
        "named",
        "ns",
        "opened",
        "out",
        "peer",
        "reader",
        "ref",
        "seq_in",
        "seq_out",
        "session",
        "slot",
        "sock",
        "state",
        "step",
        "t",
        "writing",
    )

    def __init__(self, sock: socket.socket, peer: tuple[str, int], cid: int, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.id = cid
        self.opened = now
        self.due = now  # its current deadline; an earlier timer of it is stale
        self.slot = False  # holds a handshake slot of its peer address
        self.named: StepState | None = None  # the pending step a refused hello named
        self.reader = frames.FrameReader()
        self.state = HELLO
        self.out = bytearray()
        self.closed = False
        self.writing = False  # registered for EVENT_WRITE too
        self.ref = secrets.token_hex(6)
        self.step: StepState | None = None
        self.hello: dict[str, Any] = {}
        self.t = self.ns = self.lp = b""
        self.session: jobs.Session | None = None
        self.seq_in = self.seq_out = 0


def keepalive(sock: socket.socket) -> None:
    """A silent job agent's host may vanish without a FIN: TCP keepalive notices in ~30 s.
    A connection forwarded over SSH (a socketpair, ``via: ssh``) has none: the SSH
    connection's end closes it, and the job's heartbeats go on as ever."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class Slots:
    """Only connections still in the handshake hold a slot (a verified job's does not): at
    most ``per_source`` from one peer address and ``total`` in all. A connection past its
    address's limit is refused; one past the total limit takes the slot of the oldest
    connection still without a hello of the address holding the most, if that address holds
    more than the newcomer's, else it is refused. So one address never holds every slot, a
    peer that says nothing holds one for seconds, and an agent from an address holding few
    gets in at once (an agent closed before its challenge dials again)."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = max(1, min(per_source, total))
        self._sources: dict[str, dict[int, Conn]] = {}  # per peer address, oldest first
        self._used = 0

    def make_room(self, source: str) -> tuple[str | None, Conn | None]:
        """(why a newcomer from ``source`` is refused, None if it may come in; the connection
        to evict first for it, if any)."""
        held = self._sources.get(source)
        mine = len(held) if held else 0
        if mine >= self.per_source:
            return "per-source limit", None
        if self._used >= self.total:
            victim = self._victim(mine)
            if victim is None:
                return "total limit", None
            return None, victim
        return None, None

    def _victim(self, mine: int) -> Conn | None:
        """At the total limit: the oldest connection still without a hello of the address
        holding the most, if it holds more than the newcomer's (``mine``), so each address
        keeps its share. One past its hello is never taken: it may be an agent proving
        itself, which would not dial again."""
        crowded = max(self._sources.values(), key=len)
        if len(crowded) <= mine:
            return None
        return next((c for c in crowded.values() if c.state == HELLO), None)

    def take(self, conn: Conn) -> None:
        """``conn`` enters the handshake: it holds a slot of its peer address."""
        self._sources.setdefault(conn.peer[0], {})[conn.id] = conn
        self._used += 1
        conn.slot = True

    def release(self, conn: Conn) -> None:
        """The connection left the handshake (verdict, verified job, closed): free its slot."""
        if not conn.slot:
            return
        conn.slot = False
        held = self._sources[conn.peer[0]]
        del held[conn.id]
        if not held:
            del self._sources[conn.peer[0]]
        self._used -= 1


class Attempts:
    """Every attempt's result, counted by code (``counts``, under the listener's lock) and
    logged: an INFO line with its ref, a DEBUG line for a refusal; what was refused or failed
    is summed up in one WARNING line at most every ``report_every`` seconds."""

    def __init__(
        self, log: logging.Logger, lock: threading.Lock, report_every: float, now: float
    ) -> None:
        self.counts: Counter[str] = Counter()
        self._log = log
        self._lock = lock
        self._report_every = report_every
        # refused and failed connections since the last summary line (listener thread only)
        self._tally: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self._reported = now
        self._next_report = now  # the first refusal is reported at once

    def record(
        self,
        code: str,
        ref: str,
        peer: tuple[str, int],
        hello: dict[str, Any] | None,
        detail: str,
    ) -> None:
        """A handshake ended with ``code``."""
        with self._lock:
            self.counts[code] += 1
        if code != codes.OK:
            self._count(code, peer[0])
        # Only validated hello fields (safe charsets) reach the log; never keys or nonces.
        # INFO (rex -vv): anyone who can connect makes these lines; summarize warns.
        step = hello["step"] if hello else "-"
        triple = hello["triple"] if hello else "-"
        self._log.info(
            "callback %s ref=%s peer=%s:%d step=%s triple=%s%s",
            code,
            ref,
            peer[0],
            peer[1],
            step,
            triple,
            f" ({detail})" if detail else "",
        )

    def refuse(self, peer: tuple[str, int], why: str) -> None:
        """A connection closed for want of a slot (BUSY): counted, summed up, no line."""
        with self._lock:
            self.counts[codes.BUSY] += 1
        self._count(f"{codes.BUSY} ({why})", peer[0])
        self._log.debug("callback %s peer=%s:%d (%s)", codes.BUSY, peer[0], peer[1], why)

    def due(self) -> float | None:
        """When the next summary line is due; None while there is nothing to report."""
        return self._next_report if self._tally else None

    def _count(self, what: str, source: str) -> None:
        self._tally[what] += 1
        if source in self._sources or len(self._sources) < KEPT_SOURCES:
            self._sources[source] += 1
        else:
            self._sources["others"] += 1

    def summarize(self, now: float, *, final: bool = False) -> None:
        """One WARNING line for what was refused or failed since the last one: at most one
        per ``report_every`` seconds (and one when the listener closes)."""
        if not self._tally or (now < self._next_report and not final):
            return
        total = sum(self._tally.values())
        kinds = ", ".join(f"{n} {what}" for what, n in self._tally.most_common())
        sources = ", ".join(f"{ip} ({n})" for ip, n in self._sources.most_common(3))
        self._log.warning(
            "callback: %d connection(s) refused or failed in %.1fs: %s; most from %s",
            total,
            now - self._reported,
            kinds,
            sources,
        )
        self._tally.clear()
        self._sources.clear()
        self._reported = now
        self._next_report = now + self._report_every
