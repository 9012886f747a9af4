"""The callback listener at scale: 10,000 pending steps on one thread, bounded threads, file
descriptors and memory; and ensure_fd_budget raising RLIMIT_NOFILE (in subprocesses)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rexplan.engine import pending
from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import PendingStep
from rexplan.transport import fds
from rexplan.wire import codes, frames, keyfile, messages
from rexplan.wire.handshake import (
    agent_proof,
    direction_keys,
    make_hello,
    make_resp,
    new_nonce,
    transcript,
    verify_launcher_proof,
    verify_ok_mac,
)

ROOT = Path(__file__).resolve().parent.parent
PENDING = 10_000
SAMPLE = 200
CLIENTS = 8
INF = resource.RLIM_INFINITY


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


def settles(count: Callable[[], int], limit: int, within: float = 3.0) -> bool:
    """True once count() <= limit: a joined thread's task can outlive join() by a moment."""
    end = time.monotonic() + within
    while count() > limit:
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def recv_msg(sock: socket.socket, reader: frames.FrameReader, *expected: str) -> dict[str, Any]:
    while True:
        data = sock.recv(reader.wanted())
        if not data:
            raise EOFError("the listener closed the connection")
        for msg in reader.feed(data):
            return messages.check_message(msg, *expected)


def handshake(lis: CallbackListener, step: PendingStep) -> str:
    """The agent's side, built with rexplan.wire as the agent builds it: ok or no."""
    k_l, k_a = direction_keys(step.key)
    hello = make_hello(
        run=lis.run_id,
        step=step.step_id,
        triple=step.triple,
        key_id=keyfile.key_id(step.key),
        na=new_nonce(),
        pid=4242,
        pgid=4242,
        start="1",
    )
    t = transcript(hello)
    reader = frames.FrameReader()
    with socket.create_connection(lis.address, timeout=5) as sock:
        sock.sendall(frames.encode_frame(hello))
        chal = recv_msg(sock, reader, "chal", "no")
        if chal["t"] == "no":
            return "no"
        ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
        assert verify_launcher_proof(k_l, t, ns, step.nl, lp)
        ap = agent_proof(k_a, t, ns, step.nl, lp)
        sock.sendall(frames.encode_frame(make_resp(ap)))
        verdict = recv_msg(sock, reader, "ok", "no")
        if verdict["t"] == "ok":
            assert verify_ok_mac(k_l, t, ns, step.nl, ap, bytes.fromhex(verdict["mac"]))
        return str(verdict["t"])


def test_ten_thousand_pending_steps_on_one_thread() -> None:
    base_threads, base_fds = threads(), open_fds()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        lis = CallbackListener(handshake_timeout=3.0)
        lis.start()
        steps = [
            PendingStep.create(f"d@n{i:05d}", f"n{i:05d}.mpi.d", os.urandom(32), 60.0)
            for i in range(PENDING)
        ]
        for step in steps:
            lis.expect(step)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    try:
        # a pending step costs memory, never a thread or a descriptor
        assert held < PENDING * 2048, f"{held / PENDING:.0f} bytes per pending step"
        assert threads() <= base_threads + 1
        assert open_fds() <= base_fds + 4  # listening socket, wake-up pair, epoll

        sample = steps[:: PENDING // SAMPLE]
        verdicts: list[str] = []
        peaks: list[int] = []
        lock = threading.Lock()

        def client(mine: list[PendingStep]) -> None:
            for step in mine:
                verdict = handshake(lis, step)
                with lock:
                    verdicts.append(verdict)
                    peaks.append(threads())

        pool = [threading.Thread(target=client, args=(sample[i::CLIENTS],)) for i in range(CLIENTS)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(30)
        assert not any(t.is_alive() for t in pool)
        assert verdicts == ["ok"] * SAMPLE
        assert max(peaks) <= base_threads + 1 + CLIENTS
        assert all(lis.wait(step.step_id, timeout=0).ok for step in sample)

        done = {step.step_id for step in sample}
        rest = [step for step in steps if step.step_id not in done]
        for step in rest:
            lis.cancel(step.step_id)
        assert {lis.wait(step.step_id, timeout=0).code for step in rest} == {pending.CANCELLED}
        # an agent of a cancelled step is refused, and only told "no"
        assert handshake(lis, rest[0]) == "no"
        assert lis.attempts[codes.OK] == SAMPLE
        assert lis.attempts[codes.DUPLICATE] == 1
    finally:
        lis.close()
    assert settles(threads, base_threads), f"{threads()} threads, {base_threads} before"
    assert settles(open_fds, base_fds), f"{open_fds()} descriptors, {base_fds} before"


# --- ensure_fd_budget: each case in its own process, whose limits it may change ------------------

_PROBE = """
import json, os, resource, sys
from rexplan.transport import fds
soft, hard = (int(v) for v in sys.argv[1:3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
notice = fds.ensure_fd_budget(int(sys.argv[3]))
after = resource.getrlimit(resource.RLIMIT_NOFILE)
opened = []
try:  # the raised limit is real: that many descriptors open
    while len(opened) < int(sys.argv[4]):
        opened.extend(os.pipe())
    ok = True
except OSError:
    ok = False
print(json.dumps({"notice": notice, "soft": after[0], "hard": after[1], "opened": ok}))
"""


def probe(soft: int, hard: int, needed: int, open_after: int = 0) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(soft), str(hard), str(needed), str(open_after)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_a_low_soft_limit_is_raised_toward_the_hard_limit() -> None:
    result = probe(256, 4000, 1000, open_after=1000)
    assert result == {"notice": None, "soft": 4000, "hard": 4000, "opened": True}


def test_enough_room_changes_nothing() -> None:
    assert probe(1024, 4000, 10) == {"notice": None, "soft": 1024, "hard": 4000, "opened": True}


def test_a_hard_limit_too_low_is_reported_and_the_soft_limit_still_raised() -> None:
    result = probe(256, 512, 1000)
    assert result["soft"] == 512 and result["hard"] == 512
    notice = result["notice"]
    assert isinstance(notice, str) and "hard limit is 512" in notice and "\n" not in notice


@pytest.mark.parametrize(
    ("soft", "hard", "want", "target"),
    [
        (1024, 4096, 100, 1024),  # room enough
        (1024, 4096, 2000, 4096),  # up to the hard limit
        (1024, 1 << 20, 2000, fds.FD_CAP),  # a huge hard limit: capped
        (1024, 1 << 20, 100_000, 100_000),  # unless the run needs more
        (1024, INF, 2000, fds.FD_CAP),  # no hard limit
        (INF, INF, 10**9, INF),  # unlimited already
    ],
)
def test_fd_target(soft: int, hard: int, want: int, target: int) -> None:
    assert fds.fd_target(soft, hard, want) == target
