"""Handshake pacing: per-sshd gates sized by max_startups, jittered retry of dropped handshakes."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from helpers_world import TIMEOUTS, World
from sshrig import RigHost, SshdRig

from rexplan.core import manifest
from rexplan.core.model import Host, Manifest, Timeouts, User
from rexplan.errors import (
    AuthenticationError,
    HostKeyError,
    HostTimeoutError,
    ManifestError,
    TransportError,
    UnreachableError,
)
from rexplan.transport.base import Transport
from rexplan.transport.pacing import (
    HandshakeGate,
    HandshakeGates,
    HandshakeRetry,
    dropped_by_server,
    retry_dropped,
)
from rexplan.transport.pool import TransportPool
from rexplan.transport.ssh import SSHTransport

Spawn = Callable[..., RigHost]
#: what sshd 9.x logs when it turns a connection away past MaxStartups (the rig's sshd logs
#: at VERBOSE when spawned with max_startups, so every drop is there)
DROP_LINES = ("drop connection", "beginning MaxStartups throttling")


# --- the gate -----------------------------------------------------------------------------------


def test_a_gate_admits_up_to_its_limit_and_no_more() -> None:
    gate = HandshakeGate(2)
    assert gate.acquire(2, timeout=0) and gate.acquire(2, timeout=0)
    assert not gate.acquire(2, timeout=0)
    assert (gate.in_flight, gate.limit, gate.waiting) == (2, 2, 0)
    gate.release()
    assert gate.acquire(2, timeout=0)
    gate.release()
    gate.release()
    assert gate.in_flight == 0


def test_the_smallest_limit_asked_for_wins() -> None:
    gate = HandshakeGate(10)
    assert gate.acquire(3, timeout=0)
    assert gate.limit == 3
    assert gate.acquire(10, timeout=0) and gate.acquire(10, timeout=0)
    assert not gate.acquire(10, timeout=0)
    assert gate.limit == 3


def test_a_drop_lowers_the_limit_to_the_others_in_flight() -> None:
    gate = HandshakeGate(10)
    for _ in range(4):
        assert gate.acquire(10, timeout=0)
    gate.dropped()  # the sshd let 3 through and dropped the 4th
    assert gate.limit == 3
    for _ in range(4):
        gate.release()
    assert gate.acquire(10, timeout=0)
    gate.dropped()  # alone and still dropped: one at a time, never zero
    assert gate.limit == 1
    gate.release()


def test_a_gate_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        HandshakeGate(0)
    gate = HandshakeGate(1)
    with pytest.raises(ValueError):
        gate.acquire(0)
    with pytest.raises(RuntimeError):
        gate.release()


def test_a_waiter_gets_the_slot_a_release_frees() -> None:
    gate = HandshakeGate(1)
    assert gate.acquire(1)
    got = threading.Event()

    def waiter() -> None:
        if gate.acquire(1, timeout=10):
            got.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    while gate.waiting == 0:
        threading.Event().wait(0.001)
    assert not got.is_set()
    gate.release()
    thread.join(timeout=10)
    assert got.is_set() and gate.in_flight == 1
    gate.release()


def test_many_threads_never_hold_more_slots_than_the_limit() -> None:
    gate = HandshakeGate(3)
    lock = threading.Lock()
    holding = 0
    most = 0

    def worker() -> None:
        nonlocal holding, most
        for _ in range(20):
            assert gate.acquire(3, timeout=30)
            with lock:
                holding += 1
                most = max(most, holding)
            threading.Event().wait(0.0005)
            with lock:
                holding -= 1
            gate.release()

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most <= 3
    assert gate.in_flight == 0


def test_one_gate_per_sshd_address_and_port() -> None:
    gates = HandshakeGates()
    a = gates.gate("10.0.0.1", 22, 10)
    assert gates.gate("10.0.0.1", 22, 2) is a  # another hosts entry or login, same sshd
    assert gates.gate("10.0.0.1", 2222, 10) is not a
    assert gates.gate("10.0.0.2", 22, 10) is not a
    assert a.limit == 10  # the limit is lowered by acquire(), not by looking the gate up


# --- what counts as a drop ----------------------------------------------------------------------


def _raised(outer: BaseException, inner: BaseException | None = None) -> BaseException:
    """``outer`` as raised while handling ``inner`` (so with inner as its __context__)."""
    try:
        try:
            if inner is not None:
                raise inner
        finally:
            raise outer
    except BaseException as e:
        return e


def _mapped(error: TransportError, cause: BaseException) -> TransportError:
    """``error`` as SSHTransport raises it: ``from`` the paramiko exception."""
    error.__cause__ = cause
    return error


def test_eof_or_reset_in_banner_or_key_exchange_is_a_drop() -> None:
    banner_eof = _raised(paramiko.SSHException("Error reading SSH protocol banner"), EOFError())
    banner_reset = _raised(
        paramiko.SSHException("Error reading SSH protocol banner"), ConnectionResetError(104, "")
    )
    for phase, cause in [
        ("banner", banner_eof),
        ("banner", banner_reset),
        ("kex", EOFError()),
        ("kex", ConnectionResetError(104, "Connection reset by peer")),
    ]:
        assert dropped_by_server(_mapped(TransportError("x", host="h", phase=phase), cause))


def test_timeouts_auth_hostkey_and_protocol_errors_are_not_drops() -> None:
    eof = _raised(paramiko.SSHException("Error reading SSH protocol banner"), EOFError())
    cases = [
        # a hung sshd: the banner deadline, not a drop
        _mapped(HostTimeoutError("x", host="h", phase="banner"), eof),
        _mapped(UnreachableError("x", host="h", phase="connect"), ConnectionRefusedError()),
        _mapped(AuthenticationError("x", host="h", phase="auth"), EOFError()),
        _mapped(HostKeyError("x", host="h", phase="hostkey"), EOFError()),
        # the connection was closed after authentication
        _mapped(TransportError("x", host="h", phase="auth"), EOFError()),
        # no common algorithm: it will fail the same way every time
        _mapped(
            TransportError("x", host="h", phase="kex"),
            paramiko.IncompatiblePeer("no acceptable kex algorithm"),
        ),
        _mapped(
            TransportError("x", host="h", phase="banner"),
            paramiko.SSHException('Indecipherable protocol version "HTTP/1.1 400"'),
        ),
        EOFError(),
    ]
    for case in cases:
        assert not dropped_by_server(case), case


# --- the retry policy ---------------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


DROP = _mapped(TransportError("dropped", host="h", phase="banner"), EOFError())


def _connector(outcomes: list[BaseException | str]) -> tuple[Callable[[], str], list[int]]:
    """A fake connect that raises or returns ``outcomes`` in order, counting calls."""
    calls = [0]

    def attempt() -> str:
        outcome = outcomes[calls[0]]
        calls[0] += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return attempt, calls


def test_full_jitter_backoff_doubles_up_to_the_cap() -> None:
    policy = HandshakeRetry(attempts=8, base=0.1, cap=2.0)
    highest = [policy.delay(n, lambda low, high: high) for n in range(1, 8)]
    assert highest == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert all(policy.delay(n, lambda low, high: low) == 0.0 for n in range(1, 8))
    for n in range(1, 8):
        assert 0.0 <= policy.delay(n) <= min(2.0, 0.1 * 2 ** (n - 1))


def test_a_dropped_handshake_is_retried_after_jittered_pauses() -> None:
    fake = FakeTime()
    attempt, calls = _connector([DROP, DROP, "connected"])
    got = retry_dropped(
        attempt,
        deadline=fake.now + 10,
        clock=fake.clock,
        sleep=fake.sleep,
        uniform=lambda low, high: high / 2,
    )
    assert got == "connected" and calls[0] == 3
    assert fake.slept == pytest.approx([0.05, 0.1])


def test_retries_stop_after_the_policy_s_attempts() -> None:
    fake = FakeTime()
    attempt, calls = _connector([DROP] * 10)
    with pytest.raises(TransportError) as info:
        retry_dropped(attempt, deadline=fake.now + 60, clock=fake.clock, sleep=fake.sleep)
    assert info.value is DROP
    assert calls[0] == HandshakeRetry().attempts == 4
    assert len(fake.slept) == 3


def test_auth_and_host_key_failures_are_never_retried() -> None:
    for error in [
        AuthenticationError("refused", host="h", phase="auth"),
        HostKeyError("CHANGED", host="h", phase="hostkey"),
        HostTimeoutError("no banner", host="h", phase="banner"),
    ]:
        fake = FakeTime()
        attempt, calls = _connector([error, "connected"])
        with pytest.raises(TransportError) as info:
            retry_dropped(attempt, deadline=fake.now + 60, clock=fake.clock, sleep=fake.sleep)
        assert info.value is error and calls[0] == 1 and fake.slept == []


def test_no_retry_whose_pause_would_pass_the_connect_deadline() -> None:
    fake = FakeTime()
    attempt, calls = _connector([DROP, DROP, "connected"])
    with pytest.raises(TransportError):
        retry_dropped(
            attempt,
            deadline=fake.now + 0.15,
            clock=fake.clock,
            sleep=fake.sleep,
            uniform=lambda low, high: high,
        )
    # 0.1 fits before the deadline, the next 0.2 would not
    assert calls[0] == 2 and fake.slept == pytest.approx([0.1])


# --- the manifest -------------------------------------------------------------------------------


def test_max_startups_defaults_to_openssh_s_and_is_inherited_per_host() -> None:
    plain = manifest.loads("rex: 1\nhosts: {a: }\n", "m.yaml")
    assert plain.host("a").max_startups == Host("a", "a").max_startups == 10
    m = manifest.loads(
        "rex: 1\ndefaults: {max_startups: 3}\nhosts:\n  a:\n  b: {max_startups: 2}\n", "m.yaml"
    )
    assert (m.host("a").max_startups, m.host("b").max_startups) == (3, 2)


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("hosts: {a: {max_startups: 0}}", "1:27", "0 is less than the minimum of 1"),
        ("hosts: {a: {max_startups: two}}", "1:27", "'two' is not of type 'integer'"),
        ("defaults: {max_startups: 1.5}\nhosts: {a: }", "1:26", "is not of type 'integer'"),
    ],
)
def test_bad_max_startups_is_reported_where_it_is(text: str, where: str, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        manifest.loads("rex: 1\n" + text + "\n", "m.yaml")
    (d,) = info.value.diagnostics
    line, col = where.split(":")
    assert (d.line, d.col) == (int(line) + 1, int(col)) and message in d.message
    assert d.path.endswith("max_startups")


# --- against a real sshd with a low MaxStartups -------------------------------------------------


def _shared_sshd_manifest(
    tmp_path: Path, rig: SshdRig, host: RigHost, entries: int, logins: int, max_startups: int
) -> Manifest:
    """``entries`` hosts entries, all naming ``host``'s sshd, and ``logins`` users."""
    doc = {
        "rex": 1,
        "defaults": {"max_startups": max_startups},
        "hosts": {f"x{i}": {"address": host.address, "port": host.port} for i in range(entries)},
        "users": {
            f"u{i}": {"login": rig.account(i).login, "identity": rig.identity}
            for i in range(logins)
        },
    }
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(doc))
    return manifest.load(path)


def _connect_all(
    m: Manifest, known_hosts: str
) -> tuple[TransportPool, dict[tuple[str, str], Transport | BaseException]]:
    """Every (hosts entry, user) pair of ``m`` through one pool, all threads released at once.

    The connect deadline covers the wait for a handshake slot too: generous, because 12
    handshakes two at a time on a loaded 2-core machine can take seconds (it only matters
    when the test fails)."""
    pool = TransportPool(known_hosts=known_hosts, timeouts=Timeouts(connect=20.0))
    pairs = [(h, u) for h in m.hosts for u in m.users]
    results: dict[tuple[str, str], Transport | BaseException] = {}
    start = threading.Barrier(len(pairs))

    def one(host: Host, user: User) -> None:
        start.wait()
        try:
            results[(host.name, user.name)] = pool.get(host, user)
        except BaseException as e:
            results[(host.name, user.name)] = e

    threads = [threading.Thread(target=one, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pool, results


def test_twelve_logins_on_one_sshd_never_exceed_its_max_startups(
    sshd_rig: SshdRig, fresh_sshd: Spawn, tmp_path: Path
) -> None:
    # MaxStartups 2:100:2: sshd drops every connection past 2 unauthenticated ones
    host = fresh_sshd(max_startups="2:100:2")
    m = _shared_sshd_manifest(tmp_path, sshd_rig, host, entries=3, logins=4, max_startups=2)
    pool, results = _connect_all(m, host.known_hosts)
    with pool:
        failed = {k: v for k, v in results.items() if not isinstance(v, SSHTransport)}
        assert not failed, failed
        for (_, user), transport in results.items():
            assert isinstance(transport, SSHTransport)
            assert transport.run(["id", "-un"], timeout=5).stdout.decode().strip() == (
                m.user(user).login
            )
    assert len(results) == 12
    log = sshd_rig.log_text(host)
    assert not [line for line in log.splitlines() if any(d in line for d in DROP_LINES)], log


def test_a_too_high_max_startups_is_rescued_by_the_jittered_retry(
    sshd_rig: SshdRig, fresh_sshd: Spawn, tmp_path: Path
) -> None:
    host = fresh_sshd(max_startups="2:100:2")
    # rex believes 12 may handshake at once; the sshd drops everything past 2
    m = _shared_sshd_manifest(tmp_path, sshd_rig, host, entries=3, logins=4, max_startups=12)
    pool, results = _connect_all(m, host.known_hosts)
    with pool:
        for key, got in results.items():
            if isinstance(got, SSHTransport):
                assert got.run(["true"], timeout=5).exit_status == 0
                continue
            # a host that still could not get through says why, in one line, as rex's own error
            assert isinstance(got, TransportError), (key, got)
            assert "dropped before authentication" in str(got) and got.hint, (key, got)
            assert "max_startups" in got.hint
    connected = sum(isinstance(v, SSHTransport) for v in results.values())
    drops = sum("drop connection" in line for line in sshd_rig.log_text(host).splitlines())
    # the retries (and the gate learning the sshd's real limit from the drops) get all through
    assert connected == 12, (connected, drops, results)


def test_a_hung_sshd_holds_its_slots_and_the_waiters_say_so(
    sshd_rig: SshdRig, fresh_sshd: Spawn, tmp_path: Path
) -> None:
    host = fresh_sshd(max_startups="2:100:2")
    m = _shared_sshd_manifest(tmp_path, sshd_rig, host, entries=2, logins=1, max_startups=1)
    sshd_rig.pause(host)
    try:
        outcomes: list[BaseException] = []

        def one(h: Host) -> None:
            try:
                SSHTransport.open(
                    h, m.users[0], known_hosts=host.known_hosts, timeouts=Timeouts(connect=0.5)
                ).close()
            except BaseException as e:
                outcomes.append(e)

        threads = [threading.Thread(target=one, args=(h,)) for h in m.hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sshd_rig.resume(host)
    assert len(outcomes) == 2 and all(isinstance(e, HostTimeoutError) for e in outcomes)
    # one waited out the banner deadline holding the only slot; the other never got the slot
    # (or got it too late for its own banner: both are timeouts, never a drop)
    assert any(e.phase == "banner" for e in outcomes), outcomes
    phases = sorted(e.phase for e in outcomes if isinstance(e, TransportError))
    assert phases in (["banner", "banner"], ["banner", "connect"]), outcomes
    for e in outcomes:
        if isinstance(e, TransportError) and e.phase == "connect":
            assert "no handshake slot" in str(e) and "max_startups 1" in str(e)


# --- rex apply through one sshd -----------------------------------------------------------------


def test_rex_apply_of_twelve_hosts_entries_on_one_sshd(
    world: World, sshd_rig: SshdRig, fresh_sshd: Spawn
) -> None:
    host = fresh_sshd(max_startups="2:100:2")
    names = [f"x{i}" for i in range(12)]
    doc = {
        "rex": 1,
        "defaults": {
            "user": world.user,
            "timeouts": {**TIMEOUTS, "connect": 20},
            "max_startups": 2,
        },
        "hosts": {n: {"address": host.address, "port": host.port} for n in names},
        "users": {world.user: {"login": sshd_rig.login, "identity": sshd_rig.identity}},
        # one job per hosts entry: they share the login's state dir on the one sshd
        "programs": {
            f"j{i}": {"on": [n], "kind": "job", "run": ["true"], "env": {"REXTEST": world.tag}}
            for i, n in enumerate(names)
        },
        "authorize": ["*.*.*"],
    }
    path = world.tmp / "m.yaml"
    path.write_text(json.dumps(doc))
    world.distribute(path)
    run = world.apply(path)
    assert run.code == 0, run.err
    assert {s: e["state"] for s, e in run.final().items()} == {
        f"j{i}@{n}": "ready" for i, n in enumerate(names)
    }
    assert "Traceback" not in run.err
    log = sshd_rig.log_text(host)
    assert not [line for line in log.splitlines() if any(d in line for d in DROP_LINES)], log
