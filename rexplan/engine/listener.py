"""The callback listener: verifies agents' rex-cb/1 handshakes for one run (man/rex.7, "THE
rex-cb/1 HANDSHAKE"), every connection served by one selector thread, none of it blocking."""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from rexplan.engine.pending import (
    CANCELLED,
    EXITED,
    LOST,
    JobResult,
    PendingStep,
    StepState,
    Verdict,
    rejection,
)
from rexplan.engine.slots import (
    DONE,
    HANDSHAKE_TIMEOUT,
    HELLO,
    HELLO_TIMEOUT,
    JOB,
    MAX_HANDSHAKES,
    MAX_PER_SOURCE,
    REPORT_EVERY,
    RESP,
    Attempts,
    Conn,
    Slots,
    keepalive,
)
from rexplan.wire import chars, codes, frames, handshake, jobs, keyfile, messages


class CallbackListener:
    """One per run: register steps with expect(), launch them, then wait() for each verdict.

    Cheap checks come before any HMAC, so a stranger costs none; nothing a peer sends without
    proving the key decides a step (a refused attempt is only kept as its detail), and a step
    is decided once: OK, DECLINED, UNCHANGED, TIMEOUT or CANCELLED. A job's connection stays
    after ``ok`` for its heartbeats, output and exit status (wait_job)."""

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
        if not chars.RUN_RE.match(self.run_id):
            raise ValueError(f"invalid run id {self.run_id!r}")
        self._bind = (bind, port)
        self._handshake_timeout = handshake_timeout
        self._hello_timeout = min(hello_timeout, handshake_timeout)
        self._slots = Slots(max_unauthenticated, max_per_source)
        self._log = log or logging.getLogger("rexplan.engine.callback")
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._steps: dict[str, StepState] = {}
        self._conns: dict[int, Conn] = {}
        self._attempts = Attempts(self._log, self._lock, report_every, clock())
        self.attempts = self._attempts.counts  # every attempt's result code, counted
        self._timers: list[tuple[float, int, Conn]] = []
        self._beats: list[tuple[float, int, Conn]] = []
        self._seq = itertools.count()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: connections forwarded over SSH (adopt), for the loop to take in
        self._adopted: collections.deque[tuple[socket.socket, tuple[str, int]]] = (
            collections.deque()
        )

    # ---- public API ----

    @property
    def max_handshakes(self) -> int:
        """Connections the listener holds in the handshake at most (descriptors it may need)."""
        return self._slots.total

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
        while self._adopted:
            self._adopted.popleft()[0].close()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._attempts.summarize(self._clock(), final=True)
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
        if not chars.STEP_RE.match(step.step_id) or not chars.TRIPLE_RE.match(step.triple):
            raise ValueError(f"invalid step id or triple: {step.step_id!r} {step.triple!r}")
        if keyfile.key_id(step.key) != step.key_id or len(step.nl) != handshake.NONCE_BYTES:
            raise ValueError(f"step {step.step_id}: key_id or nl does not fit the key")
        with self._lock:
            if step.step_id in self._steps:
                raise ValueError(f"step {step.step_id} is already expected")
            self._steps[step.step_id] = StepState(step)

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
                    self._decide(st, Verdict(False, codes.TIMEOUT, detail=rejected))
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

    def adopt(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Serve ``sock``, a connection that came another way than this listener's socket
        (``callback: {via: ssh}``: forwarded by a host's sshd), as if accepted from ``peer``:
        the same handshake and the same slots. Any thread; closed if the listener stopped."""
        if self._stopping:
            sock.close()
            return
        self._adopted.append((sock, peer))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"a")

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
            report = self._attempts.due()
            if report is not None:
                due = max(0.0, report - self._clock())
                timeout = due if timeout is None else min(timeout, due)
            for key, mask in self._sel.select(timeout):
                if key.fileobj is self._sock:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._wake_r.recv(64)
                    while self._adopted:
                        self._take(*self._adopted.popleft())
                else:
                    conn = key.data
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._readable(conn)
                    if mask & selectors.EVENT_WRITE and not conn.closed:
                        self._flush(conn)
            now = self._clock()
            while self._timers and self._timers[0][0] <= now:
                conn = heapq.heappop(self._timers)[2]
                if conn.state == JOB or conn.closed or conn.due > now:
                    continue  # a verified job lives until its exit; a later deadline is due
                if conn.state == HELLO:
                    # no complete hello: nothing was claimed, so no verdict is owed, and an
                    # agent that was merely slow dials again
                    self._finish(conn, codes.TIMEOUT, "no hello in time", send=False)
                elif conn.state != DONE:
                    self._finish(conn, codes.TIMEOUT, "no handshake in time")
                if not conn.closed:
                    self._drop(conn)
            while self._beats and self._beats[0][0] <= now:
                conn = heapq.heappop(self._beats)[2]
                if conn.state == JOB and not conn.closed and conn.session is not None:
                    conn.seq_out += 1
                    self._send(conn, jobs.make_hb(conn.session, conn.seq_out))
                    self._beat(conn, now)
            self._attempts.summarize(now)

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
            self._take(sock, (str(addr[0]), int(addr[1])))

    def _take(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Start the handshake of a new connection, if its peer has a slot free."""
        why, victim = self._slots.make_room(peer[0])
        if why is not None:
            self._attempts.refuse(peer, why)
            sock.close()
            return
        if victim is not None:
            self._attempts.refuse(victim.peer, "evicted")
            self._drop(victim)
        sock.setblocking(False)
        now = self._clock()
        conn = Conn(sock, peer, next(self._seq), now)
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)
        self._slots.take(conn)
        self._due(conn, now + self._hello_timeout)

    def _due(self, conn: Conn, deadline: float) -> None:
        conn.due = deadline
        heapq.heappush(self._timers, (deadline, next(self._seq), conn))

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(conn.reader.wanted())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.state == JOB:
                self._job_end(conn, JobResult(LOST, detail="the agent closed the connection"))
            elif conn.state != DONE:
                self._finish(conn, codes.CLOSED, "peer closed", send=False)
            self._drop(conn)
            return
        try:
            msgs = conn.reader.feed(data)
            for msg in msgs:
                if conn.state == JOB:
                    self._on_job_frame(conn, messages.check_message(msg, "out", "exit"))
                elif conn.state == HELLO:
                    self._on_hello(conn, messages.check_message(msg, "hello"))
                elif conn.state == RESP:
                    answer = messages.check_message(msg, "resp", "decl", "same")
                    if answer["t"] == "decl":
                        self._on_decl(conn, answer)
                    elif answer["t"] == "same":
                        self._on_same(conn, answer)
                    else:
                        self._on_resp(conn, answer)
                else:
                    raise codes.FrameError(codes.OUT_OF_ORDER, "frame after the verdict")
        except codes.FrameError as exc:
            if conn.state == JOB:
                self._job_end(conn, JobResult(LOST, detail=f"the agent broke the protocol: {exc}"))
                self._drop(conn)
            elif conn.state != DONE:
                self._finish(conn, exc.code, str(exc))
            else:
                self._drop(conn)

    def _on_hello(self, conn: Conn, hello: dict[str, Any]) -> None:
        conn.hello = hello
        with self._changed:
            st = self._steps.get(hello["step"]) if hello["run"] == self.run_id else None
            code = self._admit(conn, st, hello)
        if st is None or code is not None:
            conn.named = st
            self._finish(conn, code or codes.UNKNOWN_STEP, "")
            return
        conn.step = st
        conn.t = handshake.transcript(hello)
        conn.ns = handshake.new_nonce()
        conn.lp = handshake.launcher_proof(st.k_l, conn.t, conn.ns, st.pending.nl)
        conn.state = RESP
        self._due(conn, conn.opened + self._handshake_timeout)
        self._send(conn, handshake.make_chal(conn.ns, conn.lp))

    def _admit(self, conn: Conn, st: StepState | None, hello: dict[str, Any]) -> str | None:
        """Under the lock: the cheap checks, before any HMAC; None if the hello may go on."""
        if st is None:
            return codes.UNKNOWN_STEP
        if st.verdict is not None:
            return codes.DUPLICATE
        if hello["triple"] != st.pending.triple:
            return codes.WRONG_TRIPLE
        if hello["key_id"] != st.pending.key_id:
            return codes.WRONG_KEY  # key_id is public: a claim anyone can make decides nothing
        if self._clock() > st.pending.deadline:
            verdict = Verdict(
                False, codes.TIMEOUT, peer=conn.peer, ref=conn.ref, detail=st.rejected_text()
            )
            self._decide(st, verdict)
            return codes.TIMEOUT
        return None

    def _on_decl(self, conn: Conn, decl: dict[str, Any]) -> None:
        """A decline proven with K_A: the step is decided DECLINED, with the agent's reason."""
        st = conn.step
        assert st is not None
        reason = decl["reason"]
        mac = bytes.fromhex(decl["mac"])
        proven = handshake.verify_decline(
            st.k_a, conn.t, conn.ns, st.pending.nl, conn.lp, reason, mac
        )
        with self._changed:
            if st.verdict is not None:
                code = codes.DUPLICATE
            elif not proven:
                code = codes.BAD_PROOF
            else:
                code = codes.DECLINED
                verdict = Verdict(False, code, peer=conn.peer, ref=conn.ref, detail=reason)
                self._decide(st, verdict)
        self._finish(conn, code, reason if code == codes.DECLINED else "", send=False)

    def _on_same(self, conn: Conn, same: dict[str, Any]) -> None:
        """An "unchanged" proven with K_A: the step is decided UNCHANGED, its program the
        hello's pid, pgid and start. A job is never unchanged: such a claim, like one proven
        with another key, is a BAD_PROOF attempt that decides nothing."""
        st = conn.step
        assert st is not None
        hello = conn.hello
        mac = bytes.fromhex(same["mac"])
        proven = not st.pending.job and handshake.verify_same(
            st.k_a, conn.t, conn.ns, st.pending.nl, conn.lp, mac
        )
        with self._changed:
            if st.verdict is not None:
                code = codes.DUPLICATE
            elif not proven:
                code = codes.BAD_PROOF  # kept as detail by _finish: it decides nothing
            else:
                code = codes.UNCHANGED
                pid, pgid, start = hello["pid"], hello["pgid"], hello["start"]
                self._decide(st, Verdict(False, code, pid, pgid, start, conn.peer, conn.ref))
        self._finish(conn, code, "", send=False)

    def _on_resp(self, conn: Conn, resp: dict[str, Any]) -> None:
        st = conn.step
        assert st is not None
        nl = st.pending.nl
        ap = bytes.fromhex(resp["ap"])
        proven = handshake.verify_agent_proof(st.k_a, conn.t, conn.ns, nl, conn.lp, ap)
        hello = conn.hello
        with self._changed:
            if st.verdict is not None:
                code = codes.DUPLICATE
            elif not proven:
                code = codes.BAD_PROOF
            elif self._clock() > st.pending.deadline:
                code = codes.TIMEOUT
                verdict = Verdict(
                    False, code, peer=conn.peer, ref=conn.ref, detail=st.rejected_text()
                )
                self._decide(st, verdict)
            else:
                code = codes.OK
                verdict = Verdict(
                    True, code, hello["pid"], hello["pgid"], hello["start"], conn.peer, conn.ref
                )
                self._decide(st, verdict)
        if code != codes.OK:
            self._finish(conn, code, "")
            return
        self._attempts.record(code, conn.ref, conn.peer, hello, "")
        self._slots.release(conn)
        if st.pending.job:
            conn.state = JOB
            conn.session = jobs.Session.of((st.k_l, st.k_a), conn.t, conn.ns, nl, ap)
            self._beat(conn, self._clock())
            keepalive(conn.sock)
        else:
            conn.state = DONE
        self._send(conn, handshake.make_ok(handshake.ok_mac(st.k_l, conn.t, conn.ns, nl, ap)))

    def _beat(self, conn: Conn, now: float) -> None:
        heapq.heappush(self._beats, (now + jobs.JOB_HEARTBEAT, next(self._seq), conn))

    def _on_job_frame(self, conn: Conn, msg: dict[str, Any]) -> None:
        """A verified job's ``out`` or ``exit``: in sequence and MAC'd with K_A, or LOST."""
        st, session = conn.step, conn.session
        assert st is not None and session is not None
        payload = jobs.job_payload(msg)
        if msg["seq"] != conn.seq_in + 1 or not session.verify(session.k_a, msg, payload):
            raise codes.FrameError(codes.BAD_PROOF, f"{msg['t']} out of sequence or forged")
        conn.seq_in = msg["seq"]
        if msg["t"] == "out":
            st.take(payload)
            return
        self._job_end(conn, JobResult(EXITED, msg["status"], st.tail()))
        conn.state = DONE
        self._drop(conn)

    def _job_end(self, conn: Conn, result: JobResult) -> None:
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
        conn.state = DONE

    def _decide(self, st: StepState, verdict: Verdict) -> None:
        """Under the lock: the step's one verdict."""
        st.verdict = verdict
        self._changed.notify_all()

    def _finish(self, conn: Conn, code: str, detail: str, *, send: bool = True) -> None:
        """End a handshake that failed: log it, tell the peer only ``no`` and its ref. If it
        named a pending step, the step keeps it as detail; it decides nothing."""
        self._attempts.record(code, conn.ref, conn.peer, conn.hello or None, detail)
        st = conn.step or conn.named
        if st is not None and code != codes.DUPLICATE:
            with self._lock:
                if st.verdict is None:
                    st.reject(rejection(code, conn.hello, st.pending.key_id, conn.peer[0]))
        conn.state = DONE
        self._slots.release(conn)
        if send:
            self._send(conn, handshake.make_no(conn.ref))
        else:
            self._drop(conn)

    def _send(self, conn: Conn, msg: dict[str, Any]) -> None:
        conn.out += frames.encode_frame(msg)
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
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
        elif conn.state == DONE:
            self._drop(conn)
        elif conn.writing:
            conn.writing = False
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: Conn) -> None:
        if conn.closed:
            return
        self._slots.release(conn)
        conn.closed = True
        self._conns.pop(conn.sock.fileno(), None)
        self._sel.unregister(conn.sock)
        conn.sock.close()
