"""The callback listener over real sockets on 127.0.0.1, driven by a scripted agent."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from rexplan import callback, protocol
from rexplan.callback import CallbackListener, PendingStep, Verdict

TRIPLE = "h1.alice.app"


class Client:
    """One connection of a scripted agent: raw frames in, decoded messages out."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.reader = protocol.FrameReader()

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
            "key_id": protocol.key_id(self.key),
            "na": protocol.new_nonce(),
            "pid": 4242,
            "pgid": 4242,
            "start": "99",
        }
        fields.update(over)
        self.hello = protocol.make_hello(**fields)
        self.t = protocol.transcript(self.hello)
        self.k_l, self.k_a = protocol.direction_keys(self.key)

    def resp_for(self, chal: dict[str, Any]) -> bytes:
        ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
        return protocol.encode_frame(protocol.make_resp(self.ap(ns, lp)))

    def ap(self, ns: bytes, lp: bytes) -> bytes:
        return protocol.agent_proof(self.k_a, self.t, ns, self.nl, lp)

    def run(self, hello_frame: bytes | None = None) -> tuple[dict[str, Any] | None, Client]:
        """hello, then resp if challenged; returns the last message and the open connection."""
        conn = Client(self.lis.address)
        conn.send(hello_frame or protocol.encode_frame(self.hello))
        chal = conn.recv()
        if chal is None or chal["t"] != "chal":
            return chal, conn
        conn.send(self.resp_for(chal))
        return conn.recv(), conn


@pytest.fixture
def lis(caplog: pytest.LogCaptureFixture) -> Iterator[CallbackListener]:
    caplog.set_level(logging.INFO, logger="rexplan.callback")
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
    conn.send(protocol.encode_frame(agent.hello))
    chal = conn.recv()
    assert chal is not None and chal["t"] == "chal"
    ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
    assert protocol.verify_launcher_proof(agent.k_l, agent.t, ns, step.nl, lp)
    conn.send(agent.resp_for(chal))
    ok = conn.recv()
    assert ok is not None and ok["t"] == "ok"
    ap = agent.ap(ns, lp)
    assert protocol.verify_ok_mac(agent.k_l, agent.t, ns, step.nl, ap, bytes.fromhex(ok["mac"]))
    assert conn.recv() is None
    conn.close()
    verdict = lis.wait(step.step_id, 5)
    assert verdict.ok and verdict.code == protocol.OK
    assert (verdict.pid, verdict.pgid, verdict.start) == (4242, 4242, "99")
    assert verdict.peer is not None and verdict.peer[0] == "127.0.0.1"
    assert lis.attempts == {protocol.OK: 1}


def test_forged_proof_with_the_right_key_id_is_bad_proof(lis: CallbackListener) -> None:
    step = pending(lis)
    forger = Agent(lis, step, key=os.urandom(32), key_id=step.key_id)
    reply, conn = forger.run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.wait(step.step_id, 5) == Verdict(
        False, protocol.BAD_PROOF, peer=lis.wait(step.step_id).peer, ref=reply["ref"]
    )


def _prove_same(agent: Agent, key: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """hello, then ``same`` proven with ``key`` in place of resp: (chal, what came after)."""
    conn = Client(agent.lis.address)
    conn.send(protocol.encode_frame(agent.hello))
    chal = conn.recv()
    assert chal is not None and chal["t"] == "chal"
    ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
    conn.send(protocol.encode_frame(protocol.make_same(key, agent.t, ns, agent.nl, lp)))
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
    assert (verdict.ok, verdict.code) == (False, protocol.UNCHANGED)
    assert (verdict.pid, verdict.pgid, verdict.start) == (777, 777, "12345")
    # with anything but K_A (K_L, another key): BAD_PROOF, never unchanged
    for name, key in (("app@h2", "k_l"), ("app@h3", "other")):
        step = pending(lis, name)
        agent = Agent(lis, step)
        _prove_same(agent, os.urandom(32) if key == "other" else agent.k_l)
        assert lis.wait(step.step_id, 5).code == protocol.BAD_PROOF, name
    # a job never runs unchanged: its claim is BAD_PROOF even with K_A
    job = PendingStep.create("job@h1", TRIPLE, os.urandom(32), 10)
    job = dataclasses.replace(job, job=True)
    lis.expect(job)
    agent = Agent(lis, job)
    _prove_same(agent, agent.k_a)
    assert lis.wait(job.step_id, 5).code == protocol.BAD_PROOF
    assert lis.attempts == {protocol.UNCHANGED: 1, protocol.BAD_PROOF: 3}


def test_agent_with_another_key_is_refused_before_any_challenge(lis: CallbackListener) -> None:
    step = pending(lis)
    reply, conn = Agent(lis, step, key=os.urandom(32)).run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.wait(step.step_id, 5).code == protocol.WRONG_KEY


def test_wrong_triple_is_refused_and_the_step_still_verifies(lis: CallbackListener) -> None:
    step = pending(lis)
    reply, conn = Agent(lis, step, triple="h1.alice.other").run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts[protocol.WRONG_TRIPLE] == 1
    reply, conn = Agent(lis, step).run()
    conn.close()
    assert reply is not None and reply["t"] == "ok"
    assert lis.wait(step.step_id, 5).ok


def test_unknown_step_and_foreign_run_cost_no_hmac(
    lis: CallbackListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = pending(lis)
    calls: list[int] = []
    real = protocol.launcher_proof

    def counting(*args: bytes) -> bytes:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(protocol, "launcher_proof", counting)
    for over in ({"step": "nope@h1"}, {"run": "another-run"}, {"triple": "h2.alice.app"}):
        reply, conn = Agent(lis, step, **over).run()
        conn.close()
        assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {protocol.UNKNOWN_STEP: 2, protocol.WRONG_TRIPLE: 1}
    assert calls == []


def test_replayed_hello_and_resp_on_a_new_connection_never_verify(lis: CallbackListener) -> None:
    step = pending(lis)
    agent = Agent(lis, step)
    first = Client(lis.address)
    hello_frame = protocol.encode_frame(agent.hello)
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
    verdict = lis.wait(step.step_id, 5)
    assert not verdict.ok and verdict.code == protocol.BAD_PROOF


def test_replay_after_verification_is_a_duplicate(lis: CallbackListener) -> None:
    step = pending(lis)
    agent = Agent(lis, step)
    reply, conn = agent.run()
    conn.close()
    assert reply is not None and reply["t"] == "ok"
    reply, conn = agent.run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {protocol.OK: 1, protocol.DUPLICATE: 1}
    assert lis.wait(step.step_id, 1).ok


def test_silent_peer_times_out(lis: CallbackListener) -> None:
    step = pending(lis)
    silent = Client(lis.address)
    half = Client(lis.address)
    half.send(protocol.encode_frame(Agent(lis, step).hello))
    chal = half.recv()  # never answered
    assert chal is not None and chal["t"] == "chal"
    for conn in (silent, half):
        reply = conn.recv()
        assert reply is not None and set(reply) == {"t", "ref"} and reply["t"] == "no"
        assert conn.recv() is None
        conn.close()
    assert lis.attempts == {protocol.TIMEOUT: 2}
    assert lis.wait(step.step_id, 0.01).code == protocol.TIMEOUT


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (struct.pack(">I", protocol.MAX_FRAME + 1) + b"x" * 100, protocol.OVERSIZE),
        (struct.pack(">I", 0xFFFFFFFF), protocol.OVERSIZE),
        (struct.pack(">I", 0), protocol.MALFORMED),
        (struct.pack(">I", 5) + b"hello", protocol.MALFORMED),
        (protocol.encode_frame({"t": "hello", "v": "rex-cb/9"}), protocol.VERSION_MISMATCH),
        (protocol.encode_frame(protocol.make_resp(bytes(32))), protocol.OUT_OF_ORDER),
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
    hello_len = len(protocol.encode_frame(Agent(lis, pending(lis, "probe@h1")).hello))
    for index in range(4, hello_len):
        step = pending(lis, f"hello{index}@h1")
        agent = Agent(lis, step)
        reply, conn = agent.run(flipped(protocol.encode_frame(agent.hello), index))
        conn.close()
        assert reply is None or reply["t"] == "no"
        verdicts.append(lis.wait(step.step_id, 0))
    resp_len = len(protocol.encode_frame(protocol.make_resp(bytes(32))))
    for index in range(4, resp_len):
        step = pending(lis, f"resp{index}@h1")
        agent = Agent(lis, step)
        conn = Client(lis.address)
        conn.send(protocol.encode_frame(agent.hello))
        chal = conn.recv()
        assert chal is not None
        conn.send(flipped(agent.resp_for(chal), index))
        reply = conn.recv()
        conn.close()
        assert reply is not None and reply["t"] == "no"
        verdicts.append(lis.wait(step.step_id, 0))
    assert not any(v.ok for v in verdicts)
    assert protocol.OK not in lis.attempts


def test_flipped_length_header_never_verifies(lis: CallbackListener) -> None:
    for index in range(4):
        step = pending(lis, f"len{index}@h1")
        conn = Client(lis.address)
        conn.send(flipped(protocol.encode_frame(Agent(lis, step).hello), index))
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
        assert lis.attempts[protocol.BUSY] == 1
        for conn in [*held, extra]:
            conn.close()


def test_late_agent_is_refused_after_wait_gave_up(lis: CallbackListener) -> None:
    step = pending(lis)
    assert lis.wait(step.step_id, timeout=0.05).code == protocol.TIMEOUT
    reply, conn = Agent(lis, step).run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.attempts == {protocol.DUPLICATE: 1}


def test_agent_after_the_step_deadline_is_refused(lis: CallbackListener) -> None:
    step = pending(lis, timeout=-1.0)
    reply, conn = Agent(lis, step).run()
    conn.close()
    assert reply is not None and reply["t"] == "no"
    assert lis.wait(step.step_id).code == protocol.TIMEOUT


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
    assert got[first.step_id].code == callback.CANCELLED
    lis.close()
    lis.close()
    threads[1].join(5)
    assert got[second.step_id].code == callback.CANCELLED


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
    assert f"callback {protocol.BAD_PROOF} ref={reply['ref']}" in text
    assert f"callback {protocol.OK} ref=" in text
    for secret in (step.key, good.key, step.nl, good.nl, *protocol.direction_keys(good.key)):
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
    assert lis.attempts == {protocol.OK: 100}
