"""The callback listener over real sockets on 127.0.0.1, driven by a scripted agent."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import CANCELLED, KEPT_REJECTIONS, PendingStep, Verdict
from rexplan.wire import codes, frames, handshake, keyfile

TRIPLE = "h1.alice.app"


class Client:
    """One connection of a scripted agent: raw frames in, decoded messages out; ``source``
    binds it to another loopback address (127.0.0.x), another peer for the listener."""

    def __init__(self, address: tuple[str, int], source: str | None = None) -> None:
        where = None if source is None else (source, 0)
        self.sock = socket.create_connection(address, timeout=5, source_address=where)
        self.reader = frames.FrameReader()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None once the listener closed the connection."""
        while True:
            try:
                data = self.sock.recv(self.reader.wanted())
            except ConnectionResetError:
                return None
            if not data:
                return None
            msgs = self.reader.feed(data)
            if msgs:
                return msgs[0]

    def close(self) -> None:
        self.sock.close()


class Agent:
    """A scripted agent for one step: builds hello and resp the way the real agent does."""

    def __init__(self, lis: CallbackListener, pending: PendingStep, **over: Any) -> None:
        step = pending
        self.lis = lis
        self.key = over.pop("key", step.key)
        self.nl = over.pop("nl", step.nl)
        fields: dict[str, Any] = {
            "run": lis.run_id,
            "step": step.step_id,
            "triple": step.triple,
            "key_id": keyfile.key_id(self.key),
            "na": handshake.new_nonce(),
            "pid": 4242,
            "pgid": 4242,
            "start": "99",
        }
        fields.update(over)
        self.hello = handshake.make_hello(**fields)
        self.t = handshake.transcript(self.hello)
        self.k_l, self.k_a = handshake.direction_keys(self.key)

    def resp_for(self, chal: dict[str, Any]) -> bytes:
        ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
        return frames.encode_frame(handshake.make_resp(self.ap(ns, lp)))

    def ap(self, ns: bytes, lp: bytes) -> bytes:
        return handshake.agent_proof(self.k_a, self.t, ns, self.nl, lp)

    def run(
        self, hello_frame: bytes | None = None, source: str | None = None
    ) -> tuple[dict[str, Any] | None, Client]:
        """hello, then resp if challenged; returns the last message and the open connection."""
        conn = Client(self.lis.address, source)
        conn.send(hello_frame or frames.encode_frame(self.hello))
        chal = conn.recv()
        if chal is None or chal["t"] != "chal":
            return chal, conn
        conn.send(self.resp_for(chal))
        return conn.recv(), conn


@pytest.fixture
def lis(caplog: pytest.LogCaptureFixture) -> Iterator[CallbackListener]:
    caplog.set_level(logging.INFO, logger="rexplan.engine.callback")
    listener = CallbackListener(handshake_timeout=0.5)
    with listener:
        yield listener


def pending(lis: CallbackListener, name: str = "app@h1", timeout: float = 10.0) -> PendingStep:
    step = PendingStep.create(name, TRIPLE, os.urandom(32), timeout)
    lis.expect(step)
    return step


def test_good_agent_is_verified_and_can_check_the_ok(lis: CallbackListener) -> None:
    step = pending(lis)
    agent = Agent(lis, step)
    conn = Client(lis.address)
    conn.send(frames.encode_frame(agent.hello))
    chal = conn.recv()
    assert chal is not None and chal["t"] == "chal"
    ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
    assert handshake.verify_launcher_proof(agent.k_l, agent.t, ns, step.nl, lp)
    conn.send(agent.resp_for(chal))
    ok = conn.recv()
    assert ok is not None and ok["t"] == "ok"
    ap = agent.ap(ns, lp)
    assert handshake.verify_ok_mac(agent.k_l, agent.t, ns, step.nl, ap, bytes.fromhex(ok["mac"]))
    assert conn.recv() is None
    conn.close()
    verdict = lis.wait(step.step_id, 5)
    assert verdict.ok and verdict.code == codes.OK
    assert (verdict.pid, verdict.pgid, verdict.start) == (4242, 4242, "99")
    assert verdict.peer is not None and verdict.peer[0] == "127.0.0.1"
    assert lis.attempts == {codes.OK: 1}


def verifies(lis: CallbackListener, step: PendingStep) -> bool:
    """The genuine agent's handshake gets ``ok``: nothing decided the step before it."""
    reply, conn = Agent(lis, step).run()
    conn.close()
    return reply is not None and reply["t"] == "ok" and lis.wait(step.step_id, 5).ok


def test_a_forged_proof_is_refused_and_decides_nothing(lis: CallbackListener) -> None:
    step = pending(lis)
    forger = Agent(lis, step, key=os.urandom(32), key_id=step.key_id)
    reply, conn = forger.run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {codes.BAD_PROOF: 1}
    assert verifies(lis, step)


def test_agent_with_another_key_is_refused_before_any_challenge(
    lis: CallbackListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = pending(lis)
    calls: list[int] = []
    real = handshake.launcher_proof

    def counting(*args: bytes) -> bytes:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(handshake, "launcher_proof", counting)
    reply, conn = Agent(lis, step, key=os.urandom(32)).run()
    conn.close()
    assert reply is not None and reply["t"] == "no"  # no chal: refused on the key_id alone
    assert calls == []
    assert lis.attempts == {codes.WRONG_KEY: 1}
    assert verifies(lis, step)  # key_id is public: the claim decides nothing


def test_a_forged_decline_is_refused_and_decides_nothing(lis: CallbackListener) -> None:
    step = pending(lis)
    forger = Agent(lis, step, key=os.urandom(32), key_id=step.key_id)
    conn = Client(lis.address)
    conn.send(frames.encode_frame(forger.hello))
    chal = conn.recv()
    assert chal is not None and chal["t"] == "chal"
    ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
    decl = handshake.make_decl(forger.k_a, forger.t, ns, step.nl, lp, "load too high")
    conn.send(frames.encode_frame(decl))
    assert conn.recv() is None  # no verdict after a decl; closed
    conn.close()
    assert lis.attempts == {codes.BAD_PROOF: 1}
    assert verifies(lis, step)


def forge(lis: CallbackListener, step: PendingStep, kind: str, source: str | None = None) -> str:
    """One forged attempt on ``step`` (another key_id, a bad proof, or a bad decline); the
    last message type it got, "" for none."""
    if kind == "wrong-key":
        reply, conn = Agent(lis, step, key=os.urandom(32)).run(source=source)
    else:
        forger = Agent(lis, step, key=os.urandom(32), key_id=step.key_id)
        if kind == "bad-proof":
            reply, conn = forger.run(source=source)
        else:
            conn = Client(lis.address, source)
            conn.send(frames.encode_frame(forger.hello))
            reply = conn.recv()
            if reply is not None and reply["t"] == "chal":
                ns, lp = bytes.fromhex(reply["ns"]), bytes.fromhex(reply["lp"])
                decl = handshake.make_decl(forger.k_a, forger.t, ns, step.nl, lp, "x")
                conn.send(frames.encode_frame(decl))
                reply = conn.recv()
    conn.close()
    return "" if reply is None else str(reply["t"])


KINDS = ("wrong-key", "bad-proof", "bad-decl")


def test_forgeries_before_and_during_a_real_handshake_decide_nothing(
    lis: CallbackListener,
) -> None:
    step = pending(lis, timeout=30)
    for i in range(60):  # any number of them first: each refused (a decl gets no verdict)
        assert forge(lis, step, KINDS[i % 3]) == ("" if i % 3 == 2 else "no")
    real = Agent(lis, step)
    conn = Client(lis.address)
    conn.send(frames.encode_frame(real.hello))
    chal = conn.recv()
    assert chal is not None and chal["t"] == "chal"
    # forgers hammer the step from other addresses while the real agent is half-way
    stop = threading.Event()
    forged: list[int] = []

    def forger(n: int) -> None:
        while not stop.is_set():
            forge(lis, step, KINDS[len(forged) % 3], source=f"127.0.0.{5 + n}")
            forged.append(1)

    threads = [threading.Thread(target=forger, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + 20
        while len(forged) < 30 and time.monotonic() < end:
            time.sleep(0.01)
        conn.send(real.resp_for(chal))
        ok = conn.recv()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        conn.close()
    assert len(forged) >= 30
    assert ok is not None and ok["t"] == "ok"
    ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
    mac = bytes.fromhex(ok["mac"])
    assert handshake.verify_ok_mac(real.k_l, real.t, ns, step.nl, real.ap(ns, lp), mac)
    verdict = lis.wait(step.step_id, 0)
    assert verdict.ok and verdict.code == codes.OK
    assert lis.attempts[codes.OK] == 1
    forgeries = lis.attempts[codes.WRONG_KEY] + lis.attempts[codes.BAD_PROOF]
    assert forgeries + lis.attempts[codes.DUPLICATE] == 60 + len(forged)


def test_rejected_attempts_are_the_detail_of_a_step_that_times_out(lis: CallbackListener) -> None:
    step = pending(lis, timeout=1.0)
    one = Agent(lis, step, key=os.urandom(32))
    for _ in range(3):
        reply, conn = one.run(source="127.0.0.5")
        conn.close()
        assert reply is not None and reply["t"] == "no"
    verdict = lis.wait(step.step_id, 10)  # the deadline decides
    assert (verdict.ok, verdict.code) == (False, codes.TIMEOUT)
    claimed = one.hello["key_id"]
    assert verdict.detail == (
        f"3 rejected attempts: wrong key_id {claimed} (expected {step.key_id}) from 127.0.0.5 (x3)"
    )


def test_a_failed_step_names_its_rejected_attempts_and_a_wrong_key_is_actionable() -> None:
    from rexplan.engine.outcomes import failure

    rejected = "3 rejected attempts: wrong key_id 00000000000000aa (expected 0123456789abcdef) "
    rejected += "from 127.0.0.5 (x3)"
    timeout = Verdict(False, codes.TIMEOUT, detail=rejected)
    expected = "0123456789abcdef"
    # at the deadline, nothing heard from the agent: the rejected attempts are the detail
    assert failure(timeout, {}, None, expected) == (
        "no_callback",
        "callback",
        f"no verified callback; {rejected}",
    )
    # the agent's own report (over SSH) says it was refused holding another key
    report: dict[str, object] = {"ok": False, "exit": 15, "reason": "launcher refused the callback"}
    assert failure(timeout, {**report, "key_id": "00000000000000aa"}, None, expected) == (
        "bad_proof",
        "callback",
        "the agent proved a different key (key_id 00000000000000aa, expected 0123456789abcdef):"
        " run rex_key distribute",
    )
    # refused holding the right key (or a report that is not a key_id): still rejected
    for key_id in (expected, "not a key id \x1b[2J"):
        reason, _, detail = failure(timeout, {**report, "key_id": key_id}, None, expected)
        assert reason == "rejected" and "\x1b" not in detail


def test_the_detail_of_rejected_attempts_is_bounded(lis: CallbackListener) -> None:
    step = pending(lis, timeout=1.5)
    for i in range(40):
        forge(lis, step, KINDS[i % 2], source=f"127.0.0.{10 + i}")
    verdict = lis.wait(step.step_id, 10)
    assert verdict.code == codes.TIMEOUT and verdict.detail is not None
    assert verdict.detail.startswith("40 rejected attempts: ")
    assert verdict.detail.endswith(f", {40 - KEPT_REJECTIONS} more")
    assert len(verdict.detail) < 600


def _prove_same(agent: Agent, key: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """hello, then ``same`` proven with ``key`` in place of resp: (chal, what came after)."""
    conn = Client(agent.lis.address)
    conn.send(frames.encode_frame(agent.hello))
    chal = conn.recv()
    assert chal is not None and chal["t"] == "chal"
    ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
    conn.send(frames.encode_frame(handshake.make_same(key, agent.t, ns, agent.nl, lp)))
    after = conn.recv()
    conn.close()
    return chal, after


def test_only_the_agents_key_proves_a_step_unchanged(lis: CallbackListener) -> None:
    # proven with K_A: UNCHANGED, the program the hello names (the running one)
    step = pending(lis, "app@h1")
    agent = Agent(lis, step, pid=777, pgid=777, start="12345")
    _, after = _prove_same(agent, agent.k_a)
    assert after is None  # decided and closed, as a decline
    verdict = lis.wait(step.step_id, 5)
    assert (verdict.ok, verdict.code) == (False, codes.UNCHANGED)
    assert (verdict.pid, verdict.pgid, verdict.start) == (777, 777, "12345")
    # with anything but K_A (K_L, another key): a BAD_PROOF attempt that decides nothing,
    # never unchanged; the genuine agent still verifies after it
    for name, key in (("app@h2", "k_l"), ("app@h3", "other")):
        step = pending(lis, name)
        agent = Agent(lis, step)
        _prove_same(agent, os.urandom(32) if key == "other" else agent.k_l)
        assert verifies(lis, step), name
    # a job never runs unchanged: its claim is BAD_PROOF even with K_A, and decides nothing
    job = PendingStep.create("job@h1", TRIPLE, os.urandom(32), 1.0)
    job = dataclasses.replace(job, job=True)
    lis.expect(job)
    agent = Agent(lis, job)
    _prove_same(agent, agent.k_a)
    verdict = lis.wait(job.step_id, 10)  # its deadline decides
    assert verdict.code == codes.TIMEOUT and verdict.detail is not None
    assert verdict.detail.startswith("1 rejected attempt: a proof that did not verify")
    assert lis.attempts == {codes.UNCHANGED: 1, codes.BAD_PROOF: 3, codes.OK: 2}


def test_wrong_triple_is_refused_and_the_step_still_verifies(lis: CallbackListener) -> None:
    step = pending(lis)
    reply, conn = Agent(lis, step, triple="h1.alice.other").run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts[codes.WRONG_TRIPLE] == 1
    reply, conn = Agent(lis, step).run()
    conn.close()
    assert reply is not None and reply["t"] == "ok"
    assert lis.wait(step.step_id, 5).ok


def test_unknown_step_and_foreign_run_cost_no_hmac(
    lis: CallbackListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = pending(lis)
    calls: list[int] = []
    real = handshake.launcher_proof

    def counting(*args: bytes) -> bytes:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(handshake, "launcher_proof", counting)
    for over in ({"step": "nope@h1"}, {"run": "another-run"}, {"triple": "h2.alice.app"}):
        reply, conn = Agent(lis, step, **over).run()
        conn.close()
        assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {codes.UNKNOWN_STEP: 2, codes.WRONG_TRIPLE: 1}
    assert calls == []


def test_replayed_hello_and_resp_on_a_new_connection_never_verify(lis: CallbackListener) -> None:
    step = pending(lis)
    agent = Agent(lis, step)
    first = Client(lis.address)
    hello_frame = frames.encode_frame(agent.hello)
    first.send(hello_frame)
    chal = first.recv()
    assert chal is not None
    recorded_resp = agent.resp_for(chal)
    first.close()  # the eavesdropper keeps hello and resp
    replay = Client(lis.address)
    replay.send(hello_frame)
    new_chal = replay.recv()
    assert new_chal is not None and new_chal["ns"] != chal["ns"]
    replay.send(recorded_resp)
    reply = replay.recv()
    replay.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {codes.CLOSED: 1, codes.BAD_PROOF: 1}
    assert verifies(lis, step)  # the replay decided nothing


def test_replay_after_verification_is_a_duplicate(lis: CallbackListener) -> None:
    step = pending(lis)
    agent = Agent(lis, step)
    reply, conn = agent.run()
    conn.close()
    assert reply is not None and reply["t"] == "ok"
    reply, conn = agent.run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {codes.OK: 1, codes.DUPLICATE: 1}
    assert lis.wait(step.step_id, 1).ok


def test_silent_peer_times_out(lis: CallbackListener) -> None:
    step = pending(lis)
    silent = Client(lis.address)
    half = Client(lis.address)
    half.send(frames.encode_frame(Agent(lis, step).hello))
    chal = half.recv()  # never answered
    assert chal is not None and chal["t"] == "chal"
    reply = half.recv()
    assert reply is not None and set(reply) == {"t", "ref"} and reply["t"] == "no"
    # without a hello nothing was claimed: closed, no verdict (an agent would dial again)
    for conn in (silent, half):
        assert conn.recv() is None
        conn.close()
    assert lis.attempts == {codes.TIMEOUT: 2}
    assert lis.wait(step.step_id, 0.01).code == codes.TIMEOUT


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (struct.pack(">I", frames.MAX_FRAME + 1) + b"x" * 100, codes.OVERSIZE),
        (struct.pack(">I", 0xFFFFFFFF), codes.OVERSIZE),
        (struct.pack(">I", 0), codes.MALFORMED),
        (struct.pack(">I", 5) + b"hello", codes.MALFORMED),
        (frames.encode_frame({"t": "hello", "v": "rex-cb/9"}), codes.VERSION_MISMATCH),
        (frames.encode_frame(handshake.make_resp(bytes(32))), codes.OUT_OF_ORDER),
    ],
)
def test_broken_frames_get_no_and_a_code(lis: CallbackListener, data: bytes, code: str) -> None:
    conn = Client(lis.address)
    conn.send(data)
    reply = conn.recv()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {code: 1}


def flipped(frame: bytes, index: int) -> bytes:
    return frame[:index] + bytes([frame[index] ^ (1 << (index % 8))]) + frame[index + 1 :]


def test_bit_flipped_frames_never_verify(lis: CallbackListener) -> None:
    verdicts: list[Verdict] = []
    hello_len = len(frames.encode_frame(Agent(lis, pending(lis, "probe@h1")).hello))
    for index in range(4, hello_len):
        step = pending(lis, f"hello{index}@h1")
        agent = Agent(lis, step)
        reply, conn = agent.run(flipped(frames.encode_frame(agent.hello), index))
        conn.close()
        assert reply is None or reply["t"] == "no"
        verdicts.append(lis.wait(step.step_id, 0))
    resp_len = len(frames.encode_frame(handshake.make_resp(bytes(32))))
    for index in range(4, resp_len):
        step = pending(lis, f"resp{index}@h1")
        agent = Agent(lis, step)
        conn = Client(lis.address)
        conn.send(frames.encode_frame(agent.hello))
        chal = conn.recv()
        assert chal is not None
        conn.send(flipped(agent.resp_for(chal), index))
        reply = conn.recv()
        conn.close()
        assert reply is not None and reply["t"] == "no"
        verdicts.append(lis.wait(step.step_id, 0))
    assert not any(v.ok for v in verdicts)
    assert codes.OK not in lis.attempts


def test_flipped_length_header_never_verifies(lis: CallbackListener) -> None:
    for index in range(4):
        step = pending(lis, f"len{index}@h1")
        conn = Client(lis.address)
        conn.send(flipped(frames.encode_frame(Agent(lis, step).hello), index))
        with contextlib.suppress(OSError):  # the listener may have hung up already
            conn.sock.shutdown(socket.SHUT_WR)
        reply = conn.recv()
        conn.close()
        assert reply is None or reply["t"] == "no"
        assert not lis.wait(step.step_id, 0).ok


def test_unauthenticated_connections_are_capped() -> None:
    with CallbackListener(handshake_timeout=2, max_unauthenticated=2) as lis:
        held = [Client(lis.address), Client(lis.address)]
        extra = Client(lis.address)
        assert extra.recv() is None  # closed at once, long before the handshake deadline
        assert lis.attempts[codes.BUSY] == 1
        for conn in [*held, extra]:
            conn.close()


def test_late_agent_is_refused_after_wait_gave_up(lis: CallbackListener) -> None:
    step = pending(lis)
    assert lis.wait(step.step_id, timeout=0.05).code == codes.TIMEOUT
    reply, conn = Agent(lis, step).run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {codes.DUPLICATE: 1}


def test_agent_after_the_step_deadline_is_refused(lis: CallbackListener) -> None:
    step = pending(lis, timeout=-1.0)
    reply, conn = Agent(lis, step).run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.wait(step.step_id).code == codes.TIMEOUT


def test_cancel_and_close_release_waiters() -> None:
    lis = CallbackListener()
    lis.start()
    first, second = pending(lis, "a@h1"), pending(lis, "b@h1")
    got: dict[str, Verdict] = {}

    def waiter(step_id: str) -> None:
        got[step_id] = lis.wait(step_id, 30)

    threads = [threading.Thread(target=waiter, args=(s.step_id,)) for s in (first, second)]
    for t in threads:
        t.start()
    lis.cancel(first.step_id)
    threads[0].join(5)
    assert got[first.step_id].code == CANCELLED
    lis.close()
    lis.close()
    threads[1].join(5)
    assert got[second.step_id].code == CANCELLED


def test_expect_checks_its_step(lis: CallbackListener) -> None:
    step = pending(lis)
    with pytest.raises(ValueError):
        lis.expect(step)
    with pytest.raises(ValueError):
        lis.expect(PendingStep("x@h1", TRIPLE, os.urandom(32), "0" * 16, step.nl, 1.0))
    with pytest.raises(ValueError):
        CallbackListener(run_id="bad id")


def test_every_attempt_is_logged_with_its_code_and_no_secret(
    lis: CallbackListener, caplog: pytest.LogCaptureFixture
) -> None:
    step = pending(lis)
    forger = Agent(lis, step, key=os.urandom(32), key_id=step.key_id)
    reply, conn = forger.run()
    conn.close()
    assert reply is not None
    good = pending(lis, "good@h1")
    ok, conn = Agent(lis, good).run()
    conn.close()
    assert ok is not None and ok["t"] == "ok"
    text = caplog.text
    assert f"callback {codes.BAD_PROOF} ref={reply['ref']}" in text
    assert f"callback {codes.OK} ref=" in text
    for secret in (step.key, good.key, step.nl, good.nl, *handshake.direction_keys(good.key)):
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text
    assert repr(step.key) not in repr(step) and step.nl.hex() not in repr(step)


def test_many_agents_in_parallel_are_each_verified_once(lis: CallbackListener) -> None:
    steps = [pending(lis, f"app{i}@h{i}") for i in range(100)]
    replies: list[str] = []

    def run(step: PendingStep) -> None:
        reply, conn = Agent(lis, step).run()
        conn.close()
        replies.append("" if reply is None else reply["t"])

    threads = [threading.Thread(target=run, args=(s,)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert replies == ["ok"] * 100
    assert all(lis.wait(s.step_id, 1).ok for s in steps)
    assert lis.attempts == {codes.OK: 100}


# ---- slots: per address, a hello deadline, verified jobs do not count --------------------------


def idle(lis: CallbackListener, source: str) -> socket.socket:
    return socket.create_connection(lis.address, timeout=5, source_address=(source, 0))


def closed_now(sock: socket.socket, within: float = 5.0) -> bool:
    """The listener closed ``sock`` (end of file or reset within ``within`` s)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_one_address_cannot_take_every_slot() -> None:
    with CallbackListener(handshake_timeout=30, max_unauthenticated=4, max_per_source=2) as lis:
        crowd = [idle(lis, "127.0.0.2") for _ in range(3)]
        others = [idle(lis, "127.0.0.3") for _ in range(2)]
        try:
            assert closed_now(crowd[2])  # past its address's limit: closed at once
            assert not closed_now(crowd[0], 0.3) and not closed_now(others[0], 0.3)
            # every slot is held: a newcomer from an address holding fewer takes the slot of
            # the oldest connection of the address holding the most
            late = idle(lis, "127.0.0.4")
            assert closed_now(crowd[0])
            assert not closed_now(late, 0.3)
            step = pending(lis)
            assert verifies(lis, step)  # 127.0.0.1 holds none: it gets a slot too
            assert lis.attempts[codes.BUSY] == 3
        finally:
            for sock in [*crowd, *others, late]:
                sock.close()


def test_a_connection_without_a_hello_loses_its_slot_in_two_seconds() -> None:
    with CallbackListener(handshake_timeout=60) as lis:
        step = pending(lis)
        silent = idle(lis, "127.0.0.2")
        trickle = idle(lis, "127.0.0.3")
        frame = frames.encode_frame(Agent(lis, step).hello)
        try:
            start = time.monotonic()
            for byte in frame[:20]:  # a slowloris: one byte every 0.2 s
                with contextlib.suppress(OSError):
                    trickle.send(bytes([byte]))
                time.sleep(0.2)
            # far before the 60 s handshake deadline; no verdict: nothing was claimed
            assert closed_now(silent, 10) and closed_now(trickle, 10)
            assert time.monotonic() - start < 30
            assert lis.attempts == {codes.TIMEOUT: 2}
            assert verifies(lis, step)
        finally:
            silent.close()
            trickle.close()


def job_handshake(lis: CallbackListener, step: PendingStep) -> Client:
    """Verify a job step; its connection stays open (a running job) for the caller to close."""
    reply, conn = Agent(lis, step).run()
    assert reply is not None and reply["t"] == "ok"
    return conn


def test_running_jobs_do_not_hold_handshake_slots() -> None:
    with CallbackListener(handshake_timeout=5, max_unauthenticated=2) as lis:
        jobs = []
        try:
            for i in range(4):  # twice the handshake limit, all running
                step = PendingStep.create(f"job{i}@h1", TRIPLE, os.urandom(32), 10.0)
                step = replace(step, job=True)  # as the executor makes a job's
                lis.expect(step)
                jobs.append(job_handshake(lis, step))
            assert all(lis.wait(f"job{i}@h1", 0).ok for i in range(4))
            assert verifies(lis, pending(lis, "svc@h1"))
            assert codes.BUSY not in lis.attempts
        finally:
            for conn in jobs:
                conn.close()


# ---- refusals are counted and summed up, not a line each ---------------------------------------


def test_refusals_are_summed_up_in_one_warning_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rexplan.engine.callback")
    every = 0.5
    with CallbackListener(max_unauthenticated=2, max_per_source=1, report_every=every) as lis:
        start = time.monotonic()
        held = idle(lis, "127.0.0.2")
        refused = 0
        try:
            while time.monotonic() - start < 2.0:
                sock = idle(lis, "127.0.0.2")  # past the address's limit
                assert closed_now(sock)
                sock.close()
                refused += 1
        finally:
            held.close()
        # its close is a failed connection too (CLOSED), once the listener has read it
        end = time.monotonic() + 5
        while sum(lis.attempts.values()) <= refused and time.monotonic() < end:
            time.sleep(0.01)
    elapsed = time.monotonic() - start
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert refused >= 20
    assert 1 <= len(warnings) <= elapsed / every + 2, warnings
    counted = 0
    for line in warnings:
        assert line.startswith("callback: ") and "most from 127.0.0.2" in line, line
        counted += int(line.split()[1])
    # every refusal and the held connection's close are in the lines, none is left out
    assert counted == refused + 1 == sum(lis.attempts.values())
    assert lis.attempts[codes.BUSY] == refused


#: listens on a free loopback port, prints it, and holds it until its stdin ends
HOLDER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""


def test_a_fixed_callback_port_in_use_fails_before_any_host_is_contacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rexplan.cli.rex import main

    # another user's process listens there first, with SO_REUSEADDR as rex's listener has it
    # (as root: nobody, with the system's python3, which that user may run)
    other = os.geteuid() == 0 and os.access("/usr/bin/python3", os.X_OK)
    holder = subprocess.Popen(
        ["/usr/bin/python3" if other else sys.executable, "-I", "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/",
        user="nobody" if other else None,
    )
    assert holder.stdout is not None and holder.stdin is not None
    port = int(holder.stdout.readline())
    decoy = socket.create_server(("127.0.0.1", 0))  # the host's "sshd": must see nobody
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "rex: 1\n"
        "defaults: {user: me}\n"
        f"hosts: {{h1: {{address: 127.0.0.1, port: {decoy.getsockname()[1]}}}}}\n"
        "users: {me: {}}\n"
        "programs: {app: {on: [h1], run: [sleep, '30']}}\n"
        "authorize: [h1.me.app]\n"
        f"callback: {{bind: 127.0.0.1, port: {port}}}\n"
    )
    try:
        with decoy:
            code = main(["apply", str(manifest), "-y", "--keys", str(tmp_path / "keys")])
            out, err = capsys.readouterr()
            decoy.settimeout(0.5)
            with pytest.raises(TimeoutError):
                decoy.accept()
    finally:
        holder.stdin.close()  # it exits at end of input
        holder.wait(10)
    assert code == 4, out + err
    assert f"callback.port: 127.0.0.1:{port} is already in use by another process" in err
    assert "no host was contacted" in err and "hint:" in err
    assert "internal error" not in err and "Traceback" not in err
