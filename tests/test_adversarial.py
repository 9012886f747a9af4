"""rex-cb/1 under attack over real sockets: flipped bits, replays, reflection, stale agents, floods.

The fault proxy (tests/faultproxy.py) sits between agents and a real CallbackListener. Where a
case needs hundreds of handshakes, the agent side is the real agent's own handshake code
(rexplan.remote.agent._handshake) run in this process; the rest run the agent bundle as a
subprocess, the way hosts run it.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faultproxy as fp
import pytest

from rexplan.engine import slots
from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import PendingStep
from rexplan.remote.agent.dialback import _handshake, _Retry
from rexplan.remote.agent.failure import EXIT_NO_CALLBACK, EXIT_REJECTED, Failure
from rexplan.transport import fds, shipping
from rexplan.wire import codes, handshake, keyfile
from rexplan.wire.frames import MAX_FRAME, FrameReader, decode_frame, encode_frame
from rexplan.wire.launch import make_launch, parse_launch

PACKAGE = Path(__file__).resolve().parent.parent / "rexplan"
TRIPLE = "h1.alice.app"
KEY_PATH = "h1/alice/app.key"
DEADLINES = {"start": 10.0, "ready": 10.0, "callback": 10.0, "stop": 1.0}


# ---- helpers ----------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def tagged(run: str) -> list[int]:
    """Live processes carrying REX_RUN=<run>."""
    needle = f"REX_RUN={run}".encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                    if alive(int(name)):
                        found.append(int(name))
    return found


def wait_for(check: Any, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def launch_line(run: str, step: PendingStep, callback: tuple[str, int], **over: Any) -> bytes:
    args: dict[str, Any] = {
        "run": run,
        "step": step.step_id,
        "triple": step.triple,
        "key_path": KEY_PATH,
        "nl": step.nl,
        "callback": callback,
        "deadlines": DEADLINES,
        "argv": ["sleep", "30"],
        "ready": {"kind": "alive", "settle": 0.05},
        "log": "app",
    }
    args.update(over)
    return make_launch(**args)


@dataclass
class AgentHost:
    """A REX_HOME holding the triple's key and the agent bundle, as a rig-less host."""

    tmp: Path
    secret: bytes = field(default_factory=lambda: os.urandom(32))
    runs: list[str] = field(default_factory=list)
    fronts: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home = self.tmp / "home"
        self.work = self.tmp / "work"
        self.work.mkdir()
        key = self.home / "keys" / KEY_PATH
        key.parent.mkdir(mode=0o700, parents=True)
        self.home.chmod(0o700)
        (self.home / "keys").chmod(0o700)
        (self.home / "keys" / "h1").chmod(0o700)
        key.write_bytes(keyfile.format_key_file(TRIPLE, "2026-01-01", self.secret))
        key.chmod(0o600)
        self.bundle = self.tmp / "agent.py"
        self.bundle.write_bytes(shipping.bundle())

    def step(self, lis: CallbackListener, name: str, timeout: float = 30) -> PendingStep:
        step = PendingStep.create(name, TRIPLE, self.secret, timeout)
        lis.expect(step)
        return step

    def start(self, line: bytes) -> subprocess.Popen[bytes]:
        self.runs.append(json.loads(line)["run"])
        env = {"REX_HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        front = subprocess.Popen(
            [sys.executable, "-I", "-S", str(self.bundle)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.work,
            env=env,
        )
        self.fronts.append(front)
        assert front.stdin is not None
        front.stdin.write(line)
        front.stdin.flush()  # left open: communicate() closes it
        return front

    def finish(self, front: subprocess.Popen[bytes], timeout: float = 20) -> dict[str, Any]:
        """Wait for the front; its JSON report with its exit code as ``code``."""
        out, _ = front.communicate(timeout=timeout)
        lines = out.decode().splitlines()
        report: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        report["code"] = front.returncode
        return report

    def run(self, line: bytes, timeout: float = 20) -> dict[str, Any]:
        return self.finish(self.start(line), timeout)

    def cleanup(self) -> list[int]:
        for front in self.fronts:
            if front.poll() is None:
                front.kill()
            front.communicate()
        left = [pid for run in self.runs for pid in tagged(run)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


def stop_program(pid: int) -> None:
    """End a verified service by its program pid; its supervisor then exits."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not alive(pid))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[AgentHost]:
    h = AgentHost(tmp_path)
    yield h
    left = h.cleanup()
    assert left == [], f"processes of the test's runs left behind: {left}"


@pytest.fixture
def lis() -> Iterator[CallbackListener]:
    # roomy: a loaded machine must not turn a good handshake into a TIMEOUT
    with CallbackListener(handshake_timeout=1.5) as listener:
        yield listener


class Echo:
    """A threaded echo server: the proxy's target in its own tests."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.05)
        self.accepted = 0
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._loop)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.getsockname()[:2]
        return str(host), int(port)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._echo, args=(conn,))
            self.threads.append(thread)
            thread.start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(data)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for thread in self.threads:
            thread.join(5)
        self.server.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


def recv_all(sock: socket.socket, within: float = 2.0) -> bytes:
    """Everything received until the peer closes (or ``within`` seconds of silence)."""
    sock.settimeout(within)
    got = b""
    with contextlib.suppress(TimeoutError):
        while data := sock.recv(65536):
            got += data
    return got


# ---- the proxy itself -------------------------------------------------------------------------


def test_proxy_passes_records_and_joins_its_threads(echo: Echo) -> None:
    frames = [fp.frame(b'{"t":"a"}'), fp.frame(b""), fp.frame(b'{"t":"bb"}')]
    before = threading.active_count()
    with fp.proxied(echo.address) as proxy, socket.create_connection(proxy.address) as c:
        c.sendall(b"".join(frames))
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"".join(frames)
        assert proxy.wait_idle()
        assert proxy.frames(fp.UP) == frames == proxy.frames(fp.DOWN)
    assert threading.active_count() == before


def test_proxy_injects_into_an_open_connection(echo: Echo) -> None:
    with fp.proxied(echo.address) as proxy, socket.create_connection(proxy.address) as c:
        c.sendall(b"ping")
        c.settimeout(5)
        assert c.recv(4) == b"ping"  # the connection is up both ways
        proxy.inject_now(fp.frame(b"forged"), fp.DOWN)
        assert c.recv(64) == fp.frame(b"forged")


def test_proxy_delay_still_delivers_everything(echo: Echo) -> None:
    with fp.proxied(echo.address, fp.delay(20)) as proxy:
        with socket.create_connection(proxy.address) as c:
            c.sendall(b"slow but sure")
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b"slow but sure"


def test_proxy_blackhole_accepts_and_never_forwards(echo: Echo) -> None:
    with fp.proxied(echo.address, fp.blackhole()) as proxy:
        with socket.create_connection(proxy.address) as c:
            c.sendall(b"anyone there?")
            c.settimeout(0.3)
            with pytest.raises(TimeoutError):
                c.recv(10)
    assert echo.accepted == 0


def test_proxy_reset_sends_rst(echo: Echo) -> None:
    with fp.proxied(echo.address, fp.reset()) as proxy:
        with socket.create_connection(proxy.address) as c:
            c.settimeout(2)
            with pytest.raises(ConnectionResetError):
                c.sendall(b"x")
                c.recv(10)
                c.sendall(b"x")
                c.recv(10)


@pytest.mark.parametrize("fault", [fp.close_after(5), fp.reset_after(5)])
def test_proxy_cuts_after_n_bytes(echo: Echo, fault: fp.Fault) -> None:
    with fp.proxied(echo.address, fault) as proxy, socket.create_connection(proxy.address) as c:
        c.sendall(b"0123456789")
        got = b""
        with contextlib.suppress(ConnectionResetError):
            got = recv_all(c)
        # 5 bytes went up; the echo of them would be 5 more: the cut comes first
        assert got == b""
        assert proxy.wait_idle()


def test_proxy_flips_drops_and_injects_by_frame(echo: Echo) -> None:
    a, b, c = fp.frame(b"AAAA"), fp.frame(b"BBBB"), fp.frame(b"CCCC")
    with fp.proxied(echo.address, fp.bitflip(1, 5, 0)) as proxy:
        with socket.create_connection(proxy.address) as s:
            s.sendall(a + b + c)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == a + fp.frame(b"BCBB") + c
        proxy.fault = fp.drop(0)
        with socket.create_connection(proxy.address) as s:
            s.sendall(a + b)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b
        proxy.fault = fp.inject(c, fp.DOWN, before=1)
        with socket.create_connection(proxy.address) as s:
            s.sendall(a + b)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == a + c + b
        assert proxy.frames(fp.UP) == [a, b]  # as the client sent them
    assert fp.replay(echo.address, [a, b], timeout=0.5) == [a, b]


# ---- a bit flipped anywhere in hello, chal, resp or ok -----------------------------------------

AGENT_DEADLINE = 3.0
PID, START = 4242, "99"


def agent_handshake(lis: CallbackListener, step: PendingStep, key: bytes, via: Any) -> str:
    """The real agent's handshake over ``via``; what became of it, as a word."""
    launch = parse_launch(launch_line(lis.run_id, step, via))
    try:
        _handshake(launch, key, PID, START, time.monotonic() + AGENT_DEADLINE)
    except Failure as exc:
        return f"failure-{exc.code}"
    except _Retry:
        return "retry"
    except codes.FrameError as exc:
        return f"frame-{exc.code}"
    except TimeoutError:
        return "timeout"
    return "accepted"


FRAMES = {"hello": (fp.UP, 0), "chal": (fp.DOWN, 0), "resp": (fp.UP, 1), "ok": (fp.DOWN, 1)}
PER_FRAME = 60


def flip_cases(lengths: dict[str, int]) -> list[tuple[str, int, int]]:
    """(frame, byte, bit): every header byte and random payload bytes, PER_FRAME per frame."""
    rng = random.Random(20260101)
    cases = []
    for name, length in lengths.items():
        positions = [0, 1, 2, 3, *rng.sample(range(4, length), PER_FRAME - 4)]
        cases += [(name, pos, rng.randrange(8)) for pos in positions]
    return cases


def flipped(frame: bytes, byte: int, bit: int) -> bytes:
    return frame[:byte] + bytes([frame[byte] ^ (1 << bit)]) + frame[byte + 1 :]


def same_message(original: bytes, changed: bytes) -> bool:
    """A flip that leaves the decoded message equal is no attack (none is expected)."""
    try:
        return decode_frame(original) == decode_frame(changed)
    except codes.FrameError:
        return False


def test_a_bit_flipped_in_any_frame_never_verifies(lis: CallbackListener) -> None:
    key = os.urandom(32)
    clean = PendingStep.create("clean@h1", TRIPLE, key, 30)
    lis.expect(clean)
    with fp.proxied(lis.address) as recorder:
        assert agent_handshake(lis, clean, key, recorder.address) == "accepted"
        assert recorder.wait_idle()
        recorded = {n: recorder.frames(d)[i] for n, (d, i) in FRAMES.items()}
    cases = flip_cases({n: len(f) for n, f in recorded.items()})
    assert len(cases) >= 200

    def attack(case: tuple[str, int, int]) -> tuple[str, str, bool, bool]:
        name, byte, bit = case
        direction, index = FRAMES[name]
        step = PendingStep.create(f"{name}-{byte}-{bit}@h1", TRIPLE, key, 30)
        lis.expect(step)
        with fp.proxied(lis.address, fp.bitflip(index, byte, bit, direction)) as proxy:
            outcome = agent_handshake(lis, step, key, proxy.address)
            original = (
                proxy.frames(direction)[index] if len(proxy.frames(direction)) > index else b""
            )
        verified = lis.wait(step.step_id, 0).ok
        harmless = bool(original) and same_message(original, flipped(original, byte, bit))
        return name, outcome, verified, harmless

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(attack, cases))
    by_frame: dict[str, list[str]] = {}
    for (name, byte, bit), (_, outcome, verified, harmless) in zip(cases, results, strict=True):
        by_frame.setdefault(name, []).append(outcome)
        assert not harmless, f"{name} byte {byte} bit {bit}: the flip changed nothing"
        assert outcome != "accepted", f"agent accepted a flip of {name} byte {byte} bit {bit}"
        # the listener decides on resp; only the ok that follows can still be damaged
        assert verified == (name == "ok"), f"{name} byte {byte} bit {bit}: verified={verified}"
    assert {n: len(v) for n, v in by_frame.items()} == dict.fromkeys(FRAMES, PER_FRAME)
    assert lis.attempts[codes.OK] == 1 + PER_FRAME


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_the_agent_process_refuses_a_flipped_frame_and_kills_its_program(
    host: AgentHost, lis: CallbackListener, name: str
) -> None:
    direction, index = FRAMES[name]
    step = host.step(lis, f"{name}@h1")
    with fp.proxied(lis.address, fp.bitflip(index, 20, 2, direction)) as proxy:
        report = host.run(launch_line(lis.run_id, step, proxy.address))
    assert report["code"] == EXIT_REJECTED, report
    assert not alive(report["pid"])
    assert lis.wait(step.step_id, 0).ok == (name == "ok")


# ---- replay, reflection, injection, stale agents -----------------------------------------------


def test_recorded_handshake_replayed_never_verifies(host: AgentHost, lis: CallbackListener) -> None:
    # the resp is recorded but never delivered, so the step is still pending at the replay
    pending = host.step(lis, "pending@h1")
    with fp.proxied(lis.address, fp.drop(1, fp.UP)) as proxy:
        front = host.start(launch_line(lis.run_id, pending, proxy.address, log="p1"))
        assert wait_for(lambda: len(proxy.frames(fp.UP)) == 2, 20)
        hello, resp = proxy.frames(fp.UP)
        replies = fp.replay(lis.address, [hello, resp])
        report = host.finish(front)
    assert [decode_frame(f)["t"] for f in replies] == ["chal", "no"]
    assert lis.attempts[codes.BAD_PROOF] == 1
    verdict = lis.wait(pending.step_id, 0)  # the replay decided nothing: the deadline does
    assert (verdict.ok, verdict.code) == (False, codes.TIMEOUT)
    assert verdict.detail is not None and "a proof that did not verify" in verdict.detail
    assert report["code"] in (EXIT_REJECTED, EXIT_NO_CALLBACK)
    assert not alive(report["pid"])

    # after the step verified: refused as a duplicate
    done = host.step(lis, "done@h1")
    with fp.proxied(lis.address) as proxy:
        report = host.run(launch_line(lis.run_id, done, proxy.address, log="p2"))
        assert proxy.wait_idle()
        hello, resp = proxy.frames(fp.UP)
    assert report["code"] == 0, report
    replies = fp.replay(lis.address, [hello, resp])
    assert [decode_frame(f)["t"] for f in replies] == ["no"]
    stop_program(report["pid"])

    # against a new run of the same manifest (same step, same key, fresh nl): another run id
    # is an unknown step; even a run id that repeated would fail the proof
    for run_id in ("another-run", lis.run_id):
        with CallbackListener(handshake_timeout=0.5, run_id=run_id) as new:
            again = PendingStep.create(done.step_id, TRIPLE, host.secret, 30)
            new.expect(again)
            replies = fp.replay(new.address, [hello, resp])
            assert decode_frame(replies[-1])["t"] == "no"
            verdict = new.wait(again.step_id, 0)
            assert not verdict.ok
            assert set(new.attempts) <= {codes.UNKNOWN_STEP, codes.BAD_PROOF}
    assert lis.attempts[codes.OK] == 1
    assert lis.attempts[codes.DUPLICATE] == 1


def test_reflected_launcher_proof_is_not_an_agent_proof(lis: CallbackListener) -> None:
    key = os.urandom(32)
    step = PendingStep.create("mirror@h1", TRIPLE, key, 30)
    lis.expect(step)
    hello = handshake.make_hello(
        run=lis.run_id,
        step=step.step_id,
        triple=TRIPLE,
        key_id=keyfile.key_id(key),
        na=handshake.new_nonce(),
        pid=PID,
        pgid=PID,
        start=START,
    )
    with socket.create_connection(lis.address, timeout=5) as conn:
        conn.sendall(encode_frame(hello))
        reader = FrameReader()
        (chal,) = reader.feed(recv_frame(conn))
        # the attacker has no key: it reflects the listener's own lp as its ap
        conn.sendall(encode_frame(handshake.make_resp(bytes.fromhex(chal["lp"]))))
        (reply,) = reader.feed(recv_frame(conn))
    assert reply["t"] == "no"
    assert lis.attempts[codes.BAD_PROOF] == 1
    assert not lis.wait(step.step_id, 0).ok

    # reflecting the whole chal frame back is out of order
    other = PendingStep.create("mirror2@h1", TRIPLE, key, 30)
    lis.expect(other)
    hello = {**hello, "step": other.step_id}
    with socket.create_connection(lis.address, timeout=5) as conn:
        conn.sendall(encode_frame(hello))
        chal_frame = recv_frame(conn)
        conn.sendall(chal_frame)
        assert decode_frame(recv_frame(conn))["t"] == "no"
    assert lis.attempts[codes.OUT_OF_ORDER] == 1
    assert not lis.wait(other.step_id, 0).ok


def recv_frame(conn: socket.socket) -> bytes:
    """One whole frame (header included) from a blocking socket."""
    header = b""
    while len(header) < 4:
        header += conn.recv(4 - len(header))
    need = int.from_bytes(header, "big")
    body = b""
    while len(body) < need:
        body += conn.recv(need - len(body))
    return header + body


@pytest.mark.parametrize(
    ("forged", "before"),
    [
        pytest.param(handshake.make_ok(bytes(32)), 0, id="ok-before-chal"),
        pytest.param(handshake.make_ok(bytes(32)), 1, id="forged-ok"),
        pytest.param(handshake.make_chal(bytes(16), bytes(32)), 0, id="forged-chal"),
    ],
)
def test_injected_frames_are_never_accepted(
    lis: CallbackListener, forged: dict[str, Any], before: int
) -> None:
    key = os.urandom(32)
    step = PendingStep.create(f"inject{before}@h1", TRIPLE, key, 30)
    lis.expect(step)
    fault = fp.inject(encode_frame(forged), fp.DOWN, before=before)
    with fp.proxied(lis.address, fault) as proxy:
        outcome = agent_handshake(lis, step, key, proxy.address)
    assert outcome != "accepted"


def test_stale_agent_from_an_earlier_run_is_refused(host: AgentHost, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    probe = {"kind": "file", "path": str(flag), "interval": 0.05}
    with CallbackListener(handshake_timeout=0.5) as first:
        port = first.address[1]
        old = host.step(first, "app@h1")
        stale = host.start(launch_line(first.run_id, old, first.address, ready=probe, log="old"))
        assert wait_for(lambda: bool(tagged(first.run_id)), 20)
    # the next run of the same manifest listens on the same port and expects the same step
    with CallbackListener(port=port, handshake_timeout=0.5) as second:
        new = host.step(second, "app@h1")
        flag.write_text("")
        report = host.finish(stale)
        assert report["code"] == EXIT_REJECTED, report
        assert not alive(report["pid"])
        assert second.attempts == {codes.UNKNOWN_STEP: 1}
        fresh = host.run(launch_line(second.run_id, new, second.address, log="new"))
        assert fresh["code"] == 0, fresh
        assert second.wait(new.step_id, 0).ok
        stop_program(fresh["pid"])


# ---- malformed frames on the wire --------------------------------------------------------------


def good_hello(lis: CallbackListener, step: PendingStep) -> dict[str, Any]:
    return handshake.make_hello(
        run=lis.run_id,
        step=step.step_id,
        triple=step.triple,
        key_id=step.key_id,
        na=handshake.new_nonce(),
        pid=PID,
        pgid=PID,
        start=START,
    )


HELLO_TEXT = (
    b'{"t":"hello","v":"rex-cb/1","run":"R","step":"S","triple":"h1.alice.app",'
    b'"key_id":"K","na":"00000000000000000000000000000000","pid":4242,"pgid":4242,"start":"99"}'
)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("truncated-then-close", codes.CLOSED),
        ("truncated-then-silence", codes.TIMEOUT),
        ("not-utf8", codes.MALFORMED),
        ("duplicate-key", codes.MALFORMED),
        ("wrong-version", codes.VERSION_MISMATCH),
        ("hello-twice", codes.OUT_OF_ORDER),
        ("ok-from-agent", codes.OUT_OF_ORDER),
        ("chal-from-agent", codes.OUT_OF_ORDER),
        ("no-from-agent", codes.OUT_OF_ORDER),
    ],
)
def test_listener_refuses_malformed_frames(lis: CallbackListener, name: str, code: str) -> None:
    step = PendingStep.create("m@h1", TRIPLE, os.urandom(32), 30)
    lis.expect(step)
    hello = good_hello(lis, step)
    text = HELLO_TEXT.replace(b'"R"', f'"{lis.run_id}"'.encode()).replace(b'"S"', b'"m@h1"')
    text = text.replace(b'"K"', f'"{step.key_id}"'.encode())
    assert decode_frame(fp.frame(text)) == hello | {"na": "0" * 32}
    frames = {
        "truncated-then-close": fp.frame(text)[:-10],
        "truncated-then-silence": fp.frame(text)[:-10],
        "not-utf8": fp.frame(text.replace(b'"99"', b'"\xff9"')),
        "duplicate-key": fp.frame(text[:-1] + b',"pid":4243}'),
        "wrong-version": fp.frame(text.replace(b"rex-cb/1", b"rex-cb/2")),
        "hello-twice": encode_frame(hello) * 2,
        "ok-from-agent": encode_frame(handshake.make_ok(bytes(32))),
        "chal-from-agent": encode_frame(handshake.make_chal(bytes(16), bytes(32))),
        "no-from-agent": encode_frame(handshake.make_no("abc")),
    }
    with socket.create_connection(lis.address, timeout=5) as conn:
        conn.sendall(frames[name])
        if name == "truncated-then-close":
            conn.shutdown(socket.SHUT_WR)
        got = recv_all(conn, 3)
    types = [m["t"] for m in FrameReader().feed(got)]
    # no verdict when it closed, or when its hello never completed (nothing was claimed)
    assert types[-1:] == ([] if code in (codes.CLOSED, codes.TIMEOUT) else ["no"])
    assert lis.attempts == {code: 1}
    assert not lis.wait(step.step_id, 0).ok


ROGUE_REPLIES = {
    "zero-length": b"\0\0\0\0",
    "oversize": (MAX_FRAME + 1).to_bytes(4, "big") + b"{" * 64,
    "truncated": fp.frame(b'{"t":"chal","ns":"00"')[:-3],
    "not-utf8": fp.frame(b'{"t":"chal","ns":"\xff","lp":"00"}'),
    "duplicate-key": fp.frame(
        b'{"t":"chal","ns":"'
        + b"0" * 32
        + b'","lp":"'
        + b"0" * 64
        + b'","ns":"'
        + b"1" * 32
        + b'"}'
    ),
    "with-version": fp.frame(
        b'{"t":"chal","v":"rex-cb/2","ns":"' + b"0" * 32 + b'","lp":"' + b"0" * 64 + b'"}'
    ),
    "reflected-hello": b"",  # the agent's own hello sent back to it
    "resp": encode_frame(handshake.make_resp(bytes(32))),
    "ok-first": encode_frame(handshake.make_ok(bytes(32))),
    "nan": fp.frame(b'{"t":"chal","ns":NaN,"lp":"00"}'),
}


@pytest.mark.parametrize("name", sorted(ROGUE_REPLIES))
def test_agent_refuses_malformed_frames_and_sends_no_resp(lis: CallbackListener, name: str) -> None:
    key = os.urandom(32)
    step = PendingStep.create("rogue@h1", TRIPLE, key, 30)
    server = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []

    def rogue() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(3)
            hello = recv_frame(conn)
            conn.sendall(ROGUE_REPLIES[name] or hello)
            if name == "truncated":
                conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while data := conn.recv(4096):
                    heard.append(data)

    thread = threading.Thread(target=rogue)
    thread.start()
    with server:
        outcome = agent_handshake(lis, step, key, server.getsockname()[:2])
        thread.join(5)
    assert outcome != "accepted"
    assert heard == [], "the agent answered a listener that never proved the key"


# ---- floods: slowloris and connect-and-close during a real handshake ---------------------------


def test_floods_do_not_stop_a_real_handshake_and_fds_come_back(
    host: AgentHost, tmp_path: Path
) -> None:
    baseline = open_fds()
    flag = tmp_path / "half-way"
    with CallbackListener(handshake_timeout=3.0) as lis:
        listening = open_fds()
        step = host.step(lis, "real@h1")
        slow = [socket.create_connection(lis.address, timeout=5) for _ in range(200)]
        stop = threading.Event()
        dripped = [0]

        def drip() -> None:
            # 1 byte per connection every 0.5 s: a hello that never completes in time
            data = encode_frame(good_hello(lis, step))
            while not stop.wait(0.5):
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.send(data[dripped[0] : dripped[0] + 1])
                dripped[0] += 1

        def churn(count: int) -> None:
            for i in range(count):
                with contextlib.suppress(OSError):
                    socket.create_connection(lis.address, timeout=5).close()
                if i == count // 2:
                    flag.touch()  # the real program becomes ready amid the churn

        dripper = threading.Thread(target=drip)
        dripper.start()
        churners = [threading.Thread(target=churn, args=(100,)) for _ in range(5)]
        try:
            assert wait_for(lambda: dripped[0] >= 2, 20)
            probe = {"kind": "file", "path": str(flag), "interval": 0.02}
            front = host.start(launch_line(lis.run_id, step, lis.address, ready=probe))
            for t in churners:
                t.start()
            report = host.finish(front)
            for t in churners:
                t.join(30)
        finally:
            stop.set()
            dripper.join(5)
            for sock in slow:
                sock.close()
        assert report["code"] == 0, report
        verdict = lis.wait(step.step_id, 0)
        assert verdict.ok and verdict.pid == report["pid"]
        stop_program(report["pid"])
        # 200 slow hellos time out, 500 closes are CLOSED (or BUSY when over the cap)
        assert wait_for(lambda: sum(lis.attempts.values()) >= 1 + 200 + 500, 10), lis.attempts
        assert lis.attempts[codes.OK] == 1
        assert wait_for(lambda: open_fds() == listening, 10), (open_fds(), listening)
    assert wait_for(lambda: open_fds() == baseline, 5), (open_fds(), baseline)


#: a launch's deadlines under a flood: what a launch needs without one, with room to spare
FLOODED = {**DEADLINES, "callback": 4.0}


class Flood:
    """``count`` connections to the listener from 127.0.0.2..127.0.0.(1 + sources), half of
    them silent and half slowloris (one byte of a hello every ``drip`` s each), on one
    thread: each one the listener closes is opened again (at most ``refill`` per tick), so
    the flood stays at ``count`` until stopped. Bounded in count and time; every socket is
    closed when it stops."""

    def __init__(
        self,
        address: tuple[str, int],
        data: bytes,
        count: int = 2000,
        sources: int = 8,
        drip: float = 0.3,
        refill: int = 100,
    ) -> None:
        self.address = address
        self.data = data
        self.drip = drip
        self.refill = refill
        self.slots = [(f"127.0.0.{2 + i % sources}", i % 2 == 1) for i in range(count)]
        self.socks: dict[int, tuple[socket.socket, int]] = {}  # slot -> (socket, bytes sent)
        self.opened = 0  # connections made in all
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="flood")

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()

    def _open(self, slot: int) -> None:
        source, _ = self.slots[slot]
        with contextlib.suppress(OSError):
            sock = socket.create_connection(self.address, timeout=2, source_address=(source, 0))
            sock.setblocking(False)
            self.socks[slot] = (sock, 0)
            self.opened += 1

    def _loop(self) -> None:
        missing = list(range(len(self.slots)))
        next_drip = time.monotonic()
        try:
            while not self.stop.is_set():
                for slot in missing[: self.refill]:
                    self._open(slot)
                missing = missing[self.refill :]
                for slot, (sock, _) in list(self.socks.items()):
                    try:
                        if sock.recv(64) in (b"",):
                            raise ConnectionResetError
                    except BlockingIOError:
                        continue  # still open
                    except OSError:
                        pass
                    sock.close()
                    del self.socks[slot]
                    missing.append(slot)
                if time.monotonic() >= next_drip:
                    next_drip += self.drip
                    for slot, (sock, sent) in list(self.socks.items()):
                        if self.slots[slot][1] and sent < len(self.data):
                            with contextlib.suppress(OSError):
                                sock.send(self.data[sent : sent + 1])
                                self.socks[slot] = (sock, sent + 1)
                self.stop.wait(0.05)
        finally:
            for sock, _ in self.socks.values():
                sock.close()
            self.socks.clear()


def test_a_flood_of_idle_and_slowloris_connections_does_not_delay_a_real_launch(
    host: AgentHost, caplog: pytest.LogCaptureFixture
) -> None:
    # the listener as a run has it (its default limits and deadlines), 2,000 connections
    # from 8 other addresses at once, opened again as fast as they are closed
    assert fds.ensure_fd_budget(3000) is None
    caplog.set_level(logging.WARNING, logger="rexplan.engine.callback")
    baseline = open_fds()
    started = time.monotonic()
    with CallbackListener() as lis:
        step = host.step(lis, "real@h1")
        data = encode_frame(good_hello(lis, step))
        with Flood(lis.address, data, refill=250) as flood:
            assert wait_for(lambda: flood.opened >= 2000, 30), flood.opened
            time.sleep(slots.HELLO_TIMEOUT + 0.5)  # every slot taken, some turned over
            launched, before = time.monotonic(), flood.opened
            report = host.run(launch_line(lis.run_id, step, lis.address, deadlines=FLOODED))
            took = time.monotonic() - launched
            # the flood went on meanwhile: what the listener closed was opened again
            assert flood.opened - before > 100 * took, (flood.opened - before, took)
        assert report["code"] == 0, report
        verdict = lis.wait(step.step_id, 0)
        assert verdict.ok and verdict.pid == report["pid"]
        assert took < FLOODED["callback"], took  # verified before its callback deadline
        stop_program(report["pid"])
        refused = lis.attempts[codes.BUSY]
        failed = sum(lis.attempts.values()) - lis.attempts[codes.OK]
        assert refused > 2000 and flood.opened > 2000
    elapsed = time.monotonic() - started
    # no line per refusal: one summary per REPORT_EVERY seconds at most (the first at once,
    # the last when the listener closes), which together count every refused or failed one
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= elapsed / slots.REPORT_EVERY + 2, lines
    assert all(line.startswith("callback: ") and " most from 127.0.0." in line for line in lines)
    assert sum(int(line.split()[1]) for line in lines) >= failed
    assert wait_for(lambda: open_fds() == baseline, 10), (open_fds(), baseline)


def test_the_real_agent_verifies_while_forgers_claim_its_step(host: AgentHost) -> None:
    """Hole 1 as reproduced: anyone with the run id (every launched program has REX_RUN)
    sends hellos for a step of the run, with another key_id or a proof that does not verify,
    before and while its agent calls back; the step still verifies, once."""
    with CallbackListener() as lis:
        step = host.step(lis, "b@h1")
        stop = threading.Event()
        forged: list[str] = []

        def forger(source: str) -> None:
            while not stop.is_set():
                key = os.urandom(32)
                wrong = len(forged) % 2 == 0
                hello = handshake.make_hello(
                    run=lis.run_id,
                    step=step.step_id,
                    triple=TRIPLE,
                    key_id=keyfile.key_id(key) if wrong else step.key_id,
                    na=handshake.new_nonce(),
                    pid=PID,
                    pgid=PID,
                    start=START,
                )
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(
                        lis.address, timeout=5, source_address=(source, 0)
                    ) as conn,
                ):
                    conn.sendall(encode_frame(hello))
                    reply = decode_frame(recv_frame(conn))
                    if reply["t"] == "chal":
                        conn.sendall(encode_frame(handshake.make_resp(os.urandom(32))))
                        reply = decode_frame(recv_frame(conn))
                    forged.append(str(reply["t"]))

        threads = [threading.Thread(target=forger, args=(f"127.0.0.{5 + i}",)) for i in range(3)]
        for t in threads:
            t.start()
        try:
            assert wait_for(lambda: len(forged) >= 30, 20)
            report = host.run(launch_line(lis.run_id, step, lis.address))
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert report["code"] == 0, report
        verdict = lis.wait(step.step_id, 0)
        assert verdict.ok and verdict.pid == report["pid"]
        assert set(forged) == {"no"} and len(forged) >= 30
        assert lis.attempts[codes.OK] == 1
        assert lis.attempts[codes.WRONG_KEY] >= 15 and lis.attempts[codes.BAD_PROOF] >= 1
        stop_program(report["pid"])


def test_an_agent_with_another_key_is_refused_names_its_key_and_kills_its_program(
    host: AgentHost, tmp_path: Path
) -> None:
    with CallbackListener() as lis:
        step = PendingStep.create("w@h1", TRIPLE, os.urandom(32), 30)  # not the host's key
        lis.expect(step)
        report = host.run(launch_line(lis.run_id, step, lis.address))
        assert report["code"] == EXIT_REJECTED, report
        assert report["key_id"] == keyfile.key_id(host.secret) != step.key_id
        assert not alive(report["pid"])
        verdict = lis.wait(step.step_id, 0)  # nothing decided it: a key_id is a public claim
        assert verdict.code == codes.TIMEOUT and verdict.detail is not None
        assert f"wrong key_id {report['key_id']} (expected {step.key_id})" in verdict.detail


# ---- every MAC comparison is constant-time -----------------------------------------------------

#: words that make an operand secret-derived: MACs, proofs, keys, nonces
SECRET_WORDS = {"mac", "proof", "lp", "ap", "digest", "secret", "key", "hmac", "nl", "ns", "na"}
#: public values whose names hold such a word: key ids (a hash meant to be shown), triples,
#: pinned SSH host keys, spec/manifest digests (hashes of public text), constants. Comparing
#: them with == leaks nothing, and forcing compare_digest on them would only blur the rule.
PUBLIC_NAMES = {
    "key_id",
    "key_triple",
    "key_base64",
    "host_key",
    "spec_digest",
    "manifest_digest",
    "KEY_BYTES",
    "KEY_MAGIC",
}
#: calls whose result is public whatever their arguments
OPAQUE_CALLS = {"len", "key_id", "key_triple", "spec_digest", "isinstance", "type"}


def _identifiers(node: ast.AST) -> Iterator[str]:
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if name in OPAQUE_CALLS:
            return
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Attribute):
        yield node.attr
        if node.attr in PUBLIC_NAMES:
            return  # x.key_id is public whatever x is
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        yield str(node.slice.value)
        if node.slice.value in PUBLIC_NAMES:
            return
    for child in ast.iter_child_nodes(node):
        yield from _identifiers(child)


def secret_operands(source: str) -> list[tuple[int, str]]:
    """(line, identifier) of every ==/!= whose operand names a secret-derived value."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            continue
        for operand in [node.left, *node.comparators]:
            for word in _identifiers(operand):
                if word not in PUBLIC_NAMES and set(word.lower().split("_")) & SECRET_WORDS:
                    found.append((node.lineno, word))
    return found


def test_the_scan_finds_equality_on_macs_and_spares_public_ids() -> None:
    flagged = [
        "ok = msg['mac'] == expected",
        "ok = lp != x",
        "ok = hmac.new(k, m, sha256).digest() == sig",
        "ok = self.secret == other",
        "ok = proof(a) == b",
    ]
    spared = [
        "ok = key_id(a) == b.key_id",
        "ok = len(secret) == 32",
        "ok = info.key_id != found.key_id",
        "ok = key is None",
        "ok = spec_digest(launch) == record['spec']",
        "ok = entry.get_base64() == key.key_base64",
    ]
    assert all(secret_operands(line) for line in flagged)
    assert not any(secret_operands(line) for line in spared)


def test_every_mac_comparison_in_rexplan_uses_compare_digest() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}: {word}"
        for path in sources
        for line, word in secret_operands(path.read_text())
    ]
    assert offenders == [], "compare secrets with compare_digest: " + ", ".join(offenders)
    # and the verifiers themselves compare with it
    tree = ast.parse((PACKAGE / "wire" / "handshake.py").read_text())
    verifiers = [
        f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("verify_")
    ]
    assert len(verifiers) >= 3
    for func in verifiers:
        assert " compare_digest(" in ast.unparse(func), func.name


# ---- a compromised host answering with deeply nested JSON ------------------------------------

#: a host whose interpreter answers every rex command with one JSON line nested 200,000 deep:
#: json.loads raises RecursionError on it (not ValueError)
DEEP_PYTHON = """\
#!/bin/sh
head -c 200000 /dev/zero | tr '\\0' '['
echo
exit 0
"""
DEEP = b"[" * 200_000


def test_a_hosts_deeply_nested_json_fails_only_that_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One host's nested answer cost every host's result: `rex status` and `rex stop` ended
    in an internal error (exit 1) naming RecursionError, and a least-loaded placement with
    it as a candidate ended the whole `rex apply` before any step (2afc094 and b45bb26)."""
    from rexplan.cli import rex as cli

    fake = tmp_path / "python3"
    fake.write_text(DEEP_PYTHON)
    fake.chmod(0o755)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "rex: 1\n"
        "defaults: {user: me, transport: local, timeouts: {start: 5, callback: 5}}\n"
        f"hosts:\n  evil: {{transport: local, python: {fake}}}\n  good: {{transport: local}}\n"
        "users:\n  me: {}\n"
        "programs:\n"
        "  app: {on: [evil, good], run: [sleep, '60'],"
        " placement: {strategy: least-loaded, count: 1}}\n"
        "authorize: ['*.*.*']\n"
    )
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("REX_HOME", str(tmp_path / "home"))
    keys = ["--keys", str(tmp_path / "keys")]
    try:
        assert cli.main(["apply", "-y", str(manifest), *keys]) == 0
        out, err = capsys.readouterr()
        assert "RecursionError" not in out + err and "READY" in out and "app@good" in out
        assert cli.main(["status", str(manifest), *keys]) == 0
        out, err = capsys.readouterr()
        assert "RecursionError" not in out + err
        assert "unknown" in out and "the agent gave no status report" in out
        assert "running" in out
    finally:
        code = cli.main(["stop", str(manifest), *keys])
        out, err = capsys.readouterr()
    assert code == 2 and "RecursionError" not in out + err
    assert "app@evil" in out and "STOPPED     app@good" in out


def test_a_deeply_nested_line_is_no_report_anywhere_rex_reads_a_host() -> None:
    """Each reader of a host's (or relay's) JSON: no answer, never a RecursionError."""
    import types

    from rexplan.core import spec
    from rexplan.engine import fanout as tree
    from rexplan.engine.placement import parse_load
    from rexplan.remote.relay import client as relay
    from rexplan.transport.base import last_report

    with pytest.raises(ValueError):
        parse_load(DEEP.decode(), False)
    with pytest.raises(ValueError):
        spec.parse_status(DEEP)
    assert last_report(DEEP) == {}  # the agent front's report, and --status/--stop's
    assert relay._report(DEEP) is None
    # the launcher's reader of a relay: the nested line is no JSON, the relay's end is seen
    lines = iter([DEEP[: tree._LINE] + b"\n", b'{"up": true}\n', b""])
    stream = types.SimpleNamespace(readline=lambda _limit: next(lines))
    them = tree._Relay(types.SimpleNamespace(), types.SimpleNamespace(host="r1"))  # type: ignore[arg-type]
    waiter = tree._Waiter()
    them.waiters["app@h1"] = waiter
    them._read(stream)  # type: ignore[arg-type]
    assert waiter.done.is_set() and waiter.error is not None
    assert waiter.error[1] == tree.RELAY_LOST and "lost" in waiter.error[0]
