"""The callback listener: verifies agents' rex-cb/1 handshakes for one run.

One selector loop on one thread serves every connection, rather than LAM's blocking thread per
agent: a run may hold 10,000 pending steps and take thousands of callbacks a second, and a
handshake is two small frames and three HMACs, so a thread (stack, scheduling) per connection
would cost far more than the work. Nothing in the loop blocks; each connection is a small state
machine (hello -> chal -> resp -> verdict) with its own deadlines: a complete hello within
``hello_timeout`` seconds of its connect, the whole handshake within ``handshake_timeout``.

Slots. Only connections still in the handshake count (a verified job's connection does not):
at most ``max_per_source`` from one peer address and ``max_unauthenticated`` in all. A
connection past its address's limit is closed at once; one past the total limit takes the
slot of the oldest connection still without a hello of the address holding the most, if that
address holds more than the newcomer's, else it is closed. So one address never holds every
slot, a peer that says nothing holds one for seconds, and an agent from an address holding
few gets in at once (an agent closed before its challenge dials again). Refusals and failed
handshakes are counted and summed up in one WARNING line at most every ``report_every``
seconds (each failed handshake also has an INFO line with its ref, a refusal a DEBUG line).

Cheap checks come first (frame size, schema, version, run, pending step, expected triple,
key_id), so a stranger costs no HMAC. Nothing a peer sends without proving the key decides a
step: a wrong key_id, a wrong triple or a proof that does not verify is refused on its own
connection and kept as the step's detail (a bounded summary), and the step's deadline still
decides, so the genuine agent verifies after any number of forged attempts. A step is decided
once: OK, DECLINED (proven), or TIMEOUT/CANCELLED; any later attempt is a DUPLICATE. The peer
only ever learns ``ok`` or ``no`` with an opaque ref; the log line with that ref holds the
result code. expect/wait/cancel are thread-safe.

A job step (``PendingStep.job``) keeps its connection after ``ok``: the loop sends it a MAC'd
heartbeat every protocol.JOB_HEARTBEAT seconds and takes its ``out`` and ``exit`` frames,
each checked for sequence and MAC, until the exit status; wait_job() returns it (a
connection that ends or breaks the protocol first is LOST). Closing the listener ends every
job connection, and the agents kill their jobs.

Pending steps cost memory only (under 1 KiB each), never a thread or a descriptor; a run's
connections do cost descriptors, and ensure_fd_budget() raises RLIMIT_NOFILE for them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import secrets
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rexplan.wire import protocol

CANCELLED = "CANCELLED"  # verdict only: the launcher gave up on the step (or closed)
EXITED = "EXITED"  # a job's result: it sent its exit status
LOST = "LOST"  # a job's result: its connection ended or broke the protocol first

_HELLO, _RESP, _JOB, _DONE = "hello", "resp", "job", "done"

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
#: distinct rejected attempts a step keeps for its failure's detail (more are only counted)
KEPT_REJECTIONS = 4
#: peer addresses a summary counts apart (more are counted together as "others")
KEPT_SOURCES = 1024


@dataclass(frozen=True)
class PendingStep:
    """A launched step the listener waits for; ``deadline`` is on the listener's clock."""

    step_id: str
    triple: str
    key: bytes = field(repr=False)
    key_id: str
    nl: bytes = field(repr=False)
    deadline: float
    job: bool = False  # keep the connection after ok for the job's output and exit status

    @classmethod
    def create(
        cls,
        step_id: str,
        triple: str,
        key: bytes,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> PendingStep:
        """A step with a fresh launch nonce, due ``timeout`` seconds from now."""
        return cls(
            step_id, triple, key, protocol.key_id(key), protocol.new_nonce(), clock() + timeout
        )


@dataclass(frozen=True)
class Verdict:
    """How a step ended: ``ok`` with the agent's claims, or a result code."""

    ok: bool
    code: str
    pid: int | None = None
    pgid: int | None = None
    start: str | None = None
    peer: tuple[str, int] | None = None
    ref: str | None = None
    #: DECLINED: the reason the agent proved; TIMEOUT: the attempts rejected meanwhile
    detail: str | None = None


@dataclass(frozen=True)
class JobResult:
    """How a job ended: EXITED with its status, or LOST; ``output`` is its output's tail."""

    code: str
    status: int | None = None
    output: bytes = b""
    detail: str = ""


class _Step:
    __slots__ = (
        "cut",
        "job",
        "k_a",
        "k_l",
        "output",
        "pending",
        "rejected",
        "rejections",
        "verdict",
    )

    def __init__(self, pending: PendingStep) -> None:
        self.pending = pending
        self.k_l, self.k_a = protocol.direction_keys(pending.key)
        self.verdict: Verdict | None = None
        self.job: JobResult | None = None
        self.output = bytearray()
        self.rejected = 0  # attempts that named this step and proved nothing
        self.rejections: Counter[str] = Counter()  # the first KEPT_REJECTIONS kinds of them
        self.cut = 0  # bytes of a job's output dropped past protocol.OUT_TAIL

    def reject(self, what: str) -> None:
        """Under the lock: keep a rejected attempt as detail; it decides nothing."""
        self.rejected += 1
        if what in self.rejections or len(self.rejections) < KEPT_REJECTIONS:
            self.rejections[what] += 1

    def rejected_text(self) -> str | None:
        """``3 rejected attempts: wrong key_id ... from 127.0.0.5 (x2), ...``; None if none."""
        if not self.rejected:
            return None
        kinds = [what if n == 1 else f"{what} (x{n})" for what, n in self.rejections.items()]
        others = self.rejected - sum(self.rejections.values())
        if others:
            kinds.append(f"{others} more")
        plural = "s" if self.rejected != 1 else ""
        return f"{self.rejected} rejected attempt{plural}: {', '.join(kinds)}"

    def take(self, data: bytes) -> None:
        """Keep the last protocol.OUT_TAIL bytes of a job's output (an agent sends no more)."""
        self.output += data
        extra = len(self.output) - protocol.OUT_TAIL
        if extra > 0:
            del self.output[:extra]
            self.cut += extra

    def tail(self) -> bytes:
        """The output kept, opened by the line that says how much of it was dropped."""
        return (protocol.cut_line(self.cut) if self.cut else b"") + bytes(self.output)


class _Conn:
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
        self.named: _Step | None = None  # the pending step a refused hello named
        self.reader = protocol.FrameReader()
        self.state = _HELLO
        self.out = bytearray()
        self.closed = False
        self.writing = False  # registered for EVENT_WRITE too
        self.ref = secrets.token_hex(6)
        self.step: _Step | None = None
        self.hello: dict[str, Any] = {}
        self.t = self.ns = self.lp = b""
        self.session: protocol.Session | None = None
        self.seq_in = self.seq_out = 0


def _keepalive(sock: socket.socket) -> None:
    """A silent job agent's host may vanish without a FIN: TCP keepalive notices in ~30 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class CallbackListener:
    """One per run: register steps with expect(), launch them, then wait() for each verdict."""

    def __init__(
        self,
        bind: str = "127.0.0.1",
        port: int = 0,
        *,
        run_id: str | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        hello_timeout: float = HELLO_TIMEOUT,
        max_unauthenticated: int = MAX_HANDSHAKES,
        max_per_source: int = MAX_PER_SOURCE,
        report_every: float = REPORT_EVERY,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_id = run_id or secrets.token_hex(16)
        if not protocol.RUN_RE.match(self.run_id):
            raise ValueError(f"invalid run id {self.run_id!r}")
        self.attempts: Counter[str] = Counter()
        self._bind = (bind, port)
        self._handshake_timeout = handshake_timeout
        self._hello_timeout = min(hello_timeout, handshake_timeout)
        self._max = max_unauthenticated
        self._per_source = max(1, min(max_per_source, max_unauthenticated))
        self._log = log or logging.getLogger("rexplan.engine.callback")
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._steps: dict[str, _Step] = {}
        self._conns: dict[int, _Conn] = {}
        # connections in the handshake, per peer address, oldest first; and their number
        self._sources: dict[str, dict[int, _Conn]] = {}
        self._handshaking = 0
        # refused and failed connections since the last summary line (listener thread only)
        self._report_every = report_every
        self._tally: Counter[str] = Counter()
        self._tally_sources: Counter[str] = Counter()
        self._reported = clock()
        self._next_report = self._reported  # the first refusal is reported at once
        self._timers: list[tuple[float, int, _Conn]] = []
        self._beats: list[tuple[float, int, _Conn]] = []
        self._seq = itertools.count()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- public API ----

    @property
    def max_handshakes(self) -> int:
        """Connections the listener holds in the handshake at most (descriptors it may need)."""
        return self._max

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("listener not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        family, kind, proto, _, addr = socket.getaddrinfo(
            self._bind[0], self._bind[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(4096)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._wake_r.setblocking(False)
        self._sel.register(sock, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name="rex-callback", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving; every undecided step is decided CANCELLED. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._summarize(self._clock(), final=True)
        if self._sock is not None:
            self._sel.unregister(self._sock)
            self._sock.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        with self._changed:
            for st in self._steps.values():
                if st.verdict is None:
                    st.verdict = Verdict(False, CANCELLED)
                if st.pending.job and st.job is None:
                    st.job = JobResult(LOST, output=st.tail(), detail="listener closed")
            self._changed.notify_all()

    def __enter__(self) -> CallbackListener:
        if self._sock is None:  # not started yet
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def expect(self, step: PendingStep) -> None:
        """Register a step before launching it; its id must be new to this listener."""
        if not protocol.STEP_RE.match(step.step_id) or not protocol.TRIPLE_RE.match(step.triple):
            raise ValueError(f"invalid step id or triple: {step.step_id!r} {step.triple!r}")
        if protocol.key_id(step.key) != step.key_id or len(step.nl) != protocol.NONCE_BYTES:
            raise ValueError(f"step {step.step_id}: key_id or nl does not fit the key")
        with self._lock:
            if step.step_id in self._steps:
                raise ValueError(f"step {step.step_id} is already expected")
            self._steps[step.step_id] = _Step(step)

    def wait(self, step_id: str, timeout: float | None = None) -> Verdict:
        """Block until the step is decided, its deadline passes, or ``timeout`` seconds.

        A step still undecided then is decided TIMEOUT, so a late agent is refused.
        """
        with self._changed:
            st = self._steps[step_id]
            end = st.pending.deadline
            if timeout is not None:
                end = min(end, self._clock() + timeout)
            while st.verdict is None:
                remaining = end - self._clock()
                if remaining <= 0:
                    rejected = st.rejected_text()
                    self._decide(st, Verdict(False, protocol.TIMEOUT, detail=rejected))
                    # info, not warning: the caller reports the step as failed, with its cause
                    self._log.info(
                        "callback step=%s: no verified callback by the deadline (TIMEOUT)%s",
                        step_id,
                        f"; {rejected}" if rejected else "",
                    )
                    break
                self._changed.wait(remaining)
            assert st.verdict is not None
            return st.verdict

    def wait_job(self, step_id: str, timeout: float | None = None) -> JobResult | None:
        """Block until the verified job ``step_id`` ends (EXITED or LOST); None on timeout."""
        end = None if timeout is None else self._clock() + timeout
        with self._changed:
            st = self._steps[step_id]
            while st.job is None:
                if st.verdict is not None and not st.verdict.ok:
                    return JobResult(LOST, detail=f"not verified ({st.verdict.code})")
                remaining = None if end is None else end - self._clock()
                if remaining is not None and remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return st.job

    def cancel(self, step_id: str) -> None:
        """Give up on a step: waiters get CANCELLED, and its agent will be told ``no``."""
        with self._changed:
            st = self._steps.get(step_id)
            if st is not None and st.verdict is None:
                self._decide(st, Verdict(False, CANCELLED))

    # ---- the loop (listener thread only) ----

    def _loop(self) -> None:
        while not self._stopping:
            timeout = None
            for heap in (self._timers, self._beats):
                while heap and heap[0][2].closed:
                    heapq.heappop(heap)
                if heap:
                    due = max(0.0, heap[0][0] - self._clock())
                    timeout = due if timeout is None else min(timeout, due)
            if self._tally:
                due = max(0.0, self._next_report - self._clock())
                timeout = due if timeout is None else min(timeout, due)
            for key, mask in self._sel.select(timeout):
                if key.fileobj is self._sock:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._wake_r.recv(64)
                else:
                    conn = key.data
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._readable(conn)
                    if mask & selectors.EVENT_WRITE and not conn.closed:
                        self._flush(conn)
            now = self._clock()
            while self._timers and self._timers[0][0] <= now:
                conn = heapq.heappop(self._timers)[2]
                if conn.state == _JOB or conn.closed or conn.due > now:
                    continue  # a verified job lives until its exit; a later deadline is due
                if conn.state == _HELLO:
                    # no complete hello: nothing was claimed, so no verdict is owed, and an
                    # agent that was merely slow dials again
                    self._finish(conn, protocol.TIMEOUT, "no hello in time", send=False)
                elif conn.state != _DONE:
                    self._finish(conn, protocol.TIMEOUT, "no handshake in time")
                if not conn.closed:
                    self._drop(conn)
            while self._beats and self._beats[0][0] <= now:
                conn = heapq.heappop(self._beats)[2]
                if conn.state == _JOB and not conn.closed and conn.session is not None:
                    conn.seq_out += 1
                    self._send(conn, protocol.make_hb(conn.session, conn.seq_out))
                    self._beat(conn, now)
            self._summarize(now)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # a bounded batch, so a flood cannot starve open handshakes
            try:
                sock, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log.warning("callback accept failed: %s", exc.strerror)
                return
            peer = (str(addr[0]), int(addr[1]))
            held = self._sources.get(peer[0])
            mine = len(held) if held else 0
            if mine >= self._per_source:
                self._refuse(peer, "per-source limit")
                sock.close()
                continue
            if self._handshaking >= self._max:
                victim = self._victim(mine)
                if victim is None:
                    self._refuse(peer, "total limit")
                    sock.close()
                    continue
                self._refuse(victim.peer, "evicted")
                self._drop(victim)
            sock.setblocking(False)
            now = self._clock()
            conn = _Conn(sock, peer, next(self._seq), now)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._sources.setdefault(peer[0], {})[conn.id] = conn
            self._handshaking += 1
            conn.slot = True
            self._due(conn, now + self._hello_timeout)

    def _victim(self, mine: int) -> _Conn | None:
        """At the total limit: the oldest connection still without a hello of the address
        holding the most, if it holds more than the newcomer's (``mine``), so each address
        keeps its share. One past its hello is never taken: it may be an agent proving
        itself, which would not dial again."""
        crowded = max(self._sources.values(), key=len)
        if len(crowded) <= mine:
            return None
        return next((c for c in crowded.values() if c.state == _HELLO), None)

    def _due(self, conn: _Conn, deadline: float) -> None:
        conn.due = deadline
        heapq.heappush(self._timers, (deadline, next(self._seq), conn))

    def _release(self, conn: _Conn) -> None:
        """The connection left the handshake (verdict, verified job, closed): free its slot."""
        if not conn.slot:
            return
        conn.slot = False
        held = self._sources[conn.peer[0]]
        del held[conn.id]
        if not held:
            del self._sources[conn.peer[0]]
        self._handshaking -= 1

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(conn.reader.wanted())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.state == _JOB:
                self._job_end(conn, JobResult(LOST, detail="the agent closed the connection"))
            elif conn.state != _DONE:
                self._finish(conn, protocol.CLOSED, "peer closed", send=False)
            self._drop(conn)
            return
        try:
            msgs = conn.reader.feed(data)
            for msg in msgs:
                if conn.state == _JOB:
                    self._on_job_frame(conn, protocol.check_message(msg, "out", "exit"))
                elif conn.state == _HELLO:
                    self._on_hello(conn, protocol.check_message(msg, "hello"))
                elif conn.state == _RESP:
                    answer = protocol.check_message(msg, "resp", "decl", "same")
                    if answer["t"] == "decl":
                        self._on_decl(conn, answer)
                    elif answer["t"] == "same":
                        self._on_same(conn, answer)
                    else:
                        self._on_resp(conn, answer)
                else:
                    raise protocol.FrameError(protocol.OUT_OF_ORDER, "frame after the verdict")
        except protocol.FrameError as exc:
            if conn.state == _JOB:
                self._job_end(conn, JobResult(LOST, detail=f"the agent broke the protocol: {exc}"))
                self._drop(conn)
            elif conn.state != _DONE:
                self._finish(conn, exc.code, str(exc))
            else:
                self._drop(conn)

    def _on_hello(self, conn: _Conn, hello: dict[str, Any]) -> None:
        conn.hello = hello
        with self._changed:
            st = self._steps.get(hello["step"]) if hello["run"] == self.run_id else None
            code = self._admit(conn, st, hello)
        if st is None or code is not None:
            conn.named = st
            self._finish(conn, code or protocol.UNKNOWN_STEP, "")
            return
        conn.step = st
        conn.t = protocol.transcript(hello)
        conn.ns = protocol.new_nonce()
        conn.lp = protocol.launcher_proof(st.k_l, conn.t, conn.ns, st.pending.nl)
        conn.state = _RESP
        self._due(conn, conn.opened + self._handshake_timeout)
        self._send(conn, protocol.make_chal(conn.ns, conn.lp))

    def _admit(self, conn: _Conn, st: _Step | None, hello: dict[str, Any]) -> str | None:
        """Under the lock: the cheap checks, before any HMAC; None if the hello may go on."""
        if st is None:
            return protocol.UNKNOWN_STEP
        if st.verdict is not None:
            return protocol.DUPLICATE
        if hello["triple"] != st.pending.triple:
            return protocol.WRONG_TRIPLE
        if hello["key_id"] != st.pending.key_id:
            return protocol.WRONG_KEY  # key_id is public: a claim anyone can make decides nothing
        if self._clock() > st.pending.deadline:
            verdict = Verdict(
                False, protocol.TIMEOUT, peer=conn.peer, ref=conn.ref, detail=st.rejected_text()
            )
            self._decide(st, verdict)
            return protocol.TIMEOUT
        return None

    def _on_decl(self, conn: _Conn, decl: dict[str, Any]) -> None:
        """A decline proven with K_A: the step is decided DECLINED, with the agent's reason."""
        st = conn.step
        assert st is not None
        reason = decl["reason"]
        mac = bytes.fromhex(decl["mac"])
        proven = protocol.verify_decline(
            st.k_a, conn.t, conn.ns, st.pending.nl, conn.lp, reason, mac
        )
        with self._changed:
            if st.verdict is not None:
                code = protocol.DUPLICATE
            elif not proven:
                code = protocol.BAD_PROOF
            else:
                code = protocol.DECLINED
                verdict = Verdict(False, code, peer=conn.peer, ref=conn.ref, detail=reason)
                self._decide(st, verdict)
        self._finish(conn, code, reason if code == protocol.DECLINED else "", send=False)

    def _on_same(self, conn: _Conn, same: dict[str, Any]) -> None:
        """An "unchanged" proven with K_A: the step is decided UNCHANGED, its program the
        hello's pid, pgid and start. A job is never unchanged: such a claim, like one proven
        with another key, is a BAD_PROOF attempt that decides nothing."""
        st = conn.step
        assert st is not None
        hello = conn.hello
        mac = bytes.fromhex(same["mac"])
        proven = not st.pending.job and protocol.verify_same(
            st.k_a, conn.t, conn.ns, st.pending.nl, conn.lp, mac
        )
        with self._changed:
            if st.verdict is not None:
                code = protocol.DUPLICATE
            elif not proven:
                code = protocol.BAD_PROOF  # kept as detail by _finish: it decides nothing
            else:
                code = protocol.UNCHANGED
                pid, pgid, start = hello["pid"], hello["pgid"], hello["start"]
                self._decide(st, Verdict(False, code, pid, pgid, start, conn.peer, conn.ref))
        self._finish(conn, code, "", send=False)

    def _on_resp(self, conn: _Conn, resp: dict[str, Any]) -> None:
        st = conn.step
        assert st is not None
        nl = st.pending.nl
        ap = bytes.fromhex(resp["ap"])
        proven = protocol.verify_agent_proof(st.k_a, conn.t, conn.ns, nl, conn.lp, ap)
        hello = conn.hello
        with self._changed:
            if st.verdict is not None:
                code = protocol.DUPLICATE
            elif not proven:
                code = protocol.BAD_PROOF
            elif self._clock() > st.pending.deadline:
                code = protocol.TIMEOUT
                verdict = Verdict(
                    False, code, peer=conn.peer, ref=conn.ref, detail=st.rejected_text()
                )
                self._decide(st, verdict)
            else:
                code = protocol.OK
                verdict = Verdict(
                    True, code, hello["pid"], hello["pgid"], hello["start"], conn.peer, conn.ref
                )
                self._decide(st, verdict)
        if code != protocol.OK:
            self._finish(conn, code, "")
            return
        self._record(code, conn.ref, conn.peer, hello, "")
        self._release(conn)
        if st.pending.job:
            conn.state = _JOB
            conn.session = protocol.Session.of((st.k_l, st.k_a), conn.t, conn.ns, nl, ap)
            self._beat(conn, self._clock())
            _keepalive(conn.sock)
        else:
            conn.state = _DONE
        self._send(conn, protocol.make_ok(protocol.ok_mac(st.k_l, conn.t, conn.ns, nl, ap)))

    def _beat(self, conn: _Conn, now: float) -> None:
        heapq.heappush(self._beats, (now + protocol.JOB_HEARTBEAT, next(self._seq), conn))

    def _on_job_frame(self, conn: _Conn, msg: dict[str, Any]) -> None:
        """A verified job's ``out`` or ``exit``: in sequence and MAC'd with K_A, or LOST."""
        st, session = conn.step, conn.session
        assert st is not None and session is not None
        payload = protocol.job_payload(msg)
        if msg["seq"] != conn.seq_in + 1 or not session.verify(session.k_a, msg, payload):
            raise protocol.FrameError(protocol.BAD_PROOF, f"{msg['t']} out of sequence or forged")
        conn.seq_in = msg["seq"]
        if msg["t"] == "out":
            st.take(payload)
            return
        self._job_end(conn, JobResult(EXITED, msg["status"], st.tail()))
        conn.state = _DONE
        self._drop(conn)

    def _job_end(self, conn: _Conn, result: JobResult) -> None:
        st = conn.step
        assert st is not None
        with self._changed:
            if st.job is None:
                st.job = (
                    result
                    if result.output
                    else JobResult(result.code, result.status, st.tail(), result.detail)
                )
                self._changed.notify_all()
        conn.state = _DONE

    def _decide(self, st: _Step, verdict: Verdict) -> None:
        """Under the lock: the step's one verdict."""
        st.verdict = verdict
        self._changed.notify_all()

    def _finish(self, conn: _Conn, code: str, detail: str, *, send: bool = True) -> None:
        """End a handshake that failed: log it, tell the peer only ``no`` and its ref. If it
        named a pending step, the step keeps it as detail; it decides nothing."""
        self._record(code, conn.ref, conn.peer, conn.hello or None, detail)
        st = conn.step or conn.named
        if st is not None and code != protocol.DUPLICATE:
            with self._lock:
                if st.verdict is None:
                    st.reject(_rejection(code, conn.hello, st.pending.key_id, conn.peer[0]))
        conn.state = _DONE
        self._release(conn)
        if send:
            self._send(conn, protocol.make_no(conn.ref))
        else:
            self._drop(conn)

    def _record(
        self,
        code: str,
        ref: str,
        peer: tuple[str, int],
        hello: dict[str, Any] | None,
        detail: str,
    ) -> None:
        with self._lock:
            self.attempts[code] += 1
        if code != protocol.OK:
            self._count(code, peer[0])
        # Only validated hello fields (safe charsets) reach the log; never keys or nonces.
        # INFO (rex -vv): anyone who can connect makes these lines; _summarize warns.
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

    def _refuse(self, peer: tuple[str, int], why: str) -> None:
        """A connection closed for want of a slot (BUSY): counted, summed up, no line."""
        with self._lock:
            self.attempts[protocol.BUSY] += 1
        self._count(f"{protocol.BUSY} ({why})", peer[0])
        self._log.debug("callback %s peer=%s:%d (%s)", protocol.BUSY, peer[0], peer[1], why)

    def _count(self, what: str, source: str) -> None:
        self._tally[what] += 1
        if source in self._tally_sources or len(self._tally_sources) < KEPT_SOURCES:
            self._tally_sources[source] += 1
        else:
            self._tally_sources["others"] += 1

    def _summarize(self, now: float, *, final: bool = False) -> None:
        """One WARNING line for what was refused or failed since the last one: at most one
        per ``report_every`` seconds (and one when the listener closes)."""
        if not self._tally or (now < self._next_report and not final):
            return
        total = sum(self._tally.values())
        kinds = ", ".join(f"{n} {what}" for what, n in self._tally.most_common())
        sources = ", ".join(f"{ip} ({n})" for ip, n in self._tally_sources.most_common(3))
        self._log.warning(
            "callback: %d connection(s) refused or failed in %.1fs: %s; most from %s",
            total,
            now - self._reported,
            kinds,
            sources,
        )
        self._tally.clear()
        self._tally_sources.clear()
        self._reported = now
        self._next_report = now + self._report_every

    def _send(self, conn: _Conn, msg: dict[str, Any]) -> None:
        conn.out += protocol.encode_frame(msg)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        del conn.out[:sent]
        if conn.out:
            if not conn.writing:
                conn.writing = True
                self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        elif conn.state == _DONE:
            self._drop(conn)
        elif conn.writing:
            conn.writing = False
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Conn) -> None:
        if conn.closed:
            return
        self._release(conn)
        conn.closed = True
        self._conns.pop(conn.sock.fileno(), None)
        self._sel.unregister(conn.sock)
        conn.sock.close()


def _rejection(code: str, hello: dict[str, Any], key_id: str, source: str) -> str:
    """How a rejected attempt on a step reads in its failure: validated hello fields only."""
    what = {
        protocol.WRONG_KEY: f"wrong key_id {hello.get('key_id')} (expected {key_id})",
        protocol.WRONG_TRIPLE: f"wrong triple {str(hello.get('triple'))[:64]}",
        protocol.BAD_PROOF: "a proof that did not verify",
    }.get(code, code)
    return f"{what} from {source}"
