"""The launcher faulted on real sshds: a slow remote shell start, and the launcher SIGKILLed or
SIGSTOPped in each phase of a launch. Each ends with its reason and exit code, and whatever the
launcher started dies by its own deadlines (the no-orphans oracle runs after every test).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import helpers_procs as procs
import pytest
from helpers_world import Run, read_events
from oracle import Oracle
from sshrig import RigHost, SshdRig
from test_faults import SLEEPER, World, never_ready, wait_for, with_env
from test_tree import _rig_manifest, _steps, relay_identity  # noqa: F401 - registers the fixture

from rexplan.core.model import Host, Timeouts
from rexplan.engine.fanout import RelayError, TreeLauncher
from rexplan.errors import HostTimeoutError
from rexplan.transport.base import Gate
from rexplan.transport.local import LocalTransport
from rexplan.transport.pool import TransportPool
from rexplan.transport.shipping import LAUNCH_MARKER
from rexplan.wire import jobs

Hosts = Callable[[int], list[RigHost]]
Spawn = Callable[[], RigHost]

#: small deadlines: every failure here ends within seconds
FAST = {"connect": 1.5, "start": 1, "callback": 1.5, "ready": 1.5}
#: seconds a slow login spends in ~/.ssh/rc before each command; longer than FAST's start
SLOW_LOGIN = 2.0
#: bound on how long the remote side of a launch may take to wind down by itself: two slow
#: logins (a first launch on a host uploads the agent and runs it again), every deadline, the
#: stop grace and the agents' KILL, with slack for a loaded 2-core machine
SETTLE = 2 * SLOW_LOGIN + sum(FAST.values()) + 1 + 10
#: the agent kills a job after JOB_SILENCE s without a heartbeat, then waits out the stop grace
JOB_SETTLE = jobs.JOB_SILENCE + 1 + 10


@pytest.fixture
def world(
    sshd_rig: SshdRig,
    tmp_path: Path,
    no_orphans: Oracle,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[World]:
    w = World(sshd_rig, tmp_path, no_orphans, capsys)
    yield w
    w.cleanup()


# ---- the remote side ----------------------------------------------------------------------------


@contextlib.contextmanager
def slow_login(rig: SshdRig, host: RigHost, seconds: float) -> Iterator[Path]:
    """Every exec session on ``host`` sleeps ``seconds`` in ~/.ssh/rc before its command runs
    (sshd runs no rc for a subsystem, so SFTP stays quick). All rig hosts share the account, so
    the rc sleeps only where REX_HOME is ``host``'s: each sshd sets its own with SetEnv. Yields
    the file the rc appends ``start`` and ``end`` to around each sleep."""
    account = rig.account(0)
    rc = Path(account.home, ".ssh", "rc")
    assert not rc.exists(), f"{rc} exists: another test's slow login was not removed"
    home = host.state_dir_for(account.login)
    log = Path(home, f"slow-login-{secrets.token_hex(4)}.log")
    quoted = shlex.quote(str(log))
    rc.write_text(
        f'if [ "$REX_HOME" = {shlex.quote(home)} ]; then\n'
        f"  echo start >> {quoted}; sleep {seconds:g}; echo end >> {quoted}\n"
        "fi\n"
    )
    os.chown(rc, account.uid, account.gid)
    try:
        yield log
    finally:
        rc.unlink(missing_ok=True)


def logins(log: Path) -> tuple[int, int]:
    """(sessions that began their slow login, sessions that ended it)."""
    lines = log.read_text().split() if log.exists() else []
    return lines.count("start"), lines.count("end")


def _uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def remote_left(world: World) -> list[int]:
    """Every live process of a rig account but sshd's own (login shells, a sleeping rc, agents,
    programs: hosts are loopback sshds, and the accounts are this test session's alone), and
    any process carrying the test's tag."""
    uids = {a.uid for a in world.rig.accounts}
    left = set(world.tagged())
    for pid in procs.pids():
        if _uid(pid) in uids and procs.alive(pid):
            argv = procs.cmdline(pid)
            if not (argv and argv[0].startswith("sshd")):
                left.add(pid)
    return sorted(left)


def quiet(world: World, within: float) -> bool:
    """Nothing of the test runs on the hosts any more, within ``within`` seconds."""
    return wait_for(lambda: not remote_left(world), within)


def step_state(events: Path) -> str | None:
    """The last state of the run's (only) step so far."""
    states = [e["state"] for e in read_events(events) if e["kind"] == "step"]
    return states[-1] if states else None


# ---- a slow remote shell start ------------------------------------------------------------------


def service_on(world: World, host: RigHost, *, cached: bool = True) -> tuple[Path, str]:
    """A manifest of one service on ``host`` with its key distributed, and the service's name.
    ``cached``: the agent is on the host already (a first apply, its service then stopped), as
    on any host rex launched on before; else the launch begins with its upload."""
    name = world.program()
    m = world.manifest([host], {name: SLEEPER}, timeouts=FAST)
    world.key(m)
    if cached:
        warm = world.apply(m)
        assert warm.code == 0, warm.out
        world.stop_services(warm)
    return m, name


def launch_with_slow_login(world: World, host: RigHost) -> tuple[Run, set[int]]:
    """`rex apply` of one service on ``host`` whose logins take SLOW_LOGIN s (> start); every
    pid that ever carried the test's tag or the step's triple, sampled every 20 ms until the
    launcher exited and the host is quiet."""
    m, name = service_on(world, host)
    triple = f"{host.name}.{world.user}.{name}"
    seen: set[int] = set()
    with slow_login(world.rig, host, SLOW_LOGIN) as log:
        proc, events = world.launch(m)
        end = time.monotonic() + SETTLE
        while time.monotonic() < end:
            seen.update(world.tagged(), with_env("REX_TRIPLE", triple))
            started, ended = logins(log)
            if proc.poll() is not None and started == ended:
                if step_state(events) == "ready" or not remote_left(world):
                    break
            time.sleep(0.02)
        run = world.finish(proc, events)
        assert logins(log)[0] >= 1, "the launch never went through the slow login"
    if run.only()["state"] == "ready":
        world.stop_services(run)  # wrongly ready: stopped, so that only the assertions fail
    return run, seen


def test_slow_login_fails_the_step_and_never_starts_the_program(
    world: World, fresh_sshd: Spawn
) -> None:
    run, seen = launch_with_slow_login(world, fresh_sshd())
    e = run.only()
    assert seen == set(), f"the program was started: {sorted(seen)}; {e}"
    assert run.code == 2, run.out
    assert e["state"] == "failed", e
    assert run.summarized(e["program"], e["reason"])


def test_slow_login_fails_as_agent_start_timeout(world: World, fresh_sshd: Spawn) -> None:
    run, _ = launch_with_slow_login(world, fresh_sshd())
    e = run.only()
    got = (e["state"], e.get("reason"), e["phase"])
    assert got == ("failed", "agent_start_timeout", "start"), e


# ---- the start gate, on this machine and through a relay ----------------------------------------

#: a command that announces itself as the launch stub does, then echoes its stdin's first line
PROMPT = f'echo {LAUNCH_MARKER}; read -r l; printf \'{{"ok": true, "got": %s}}\\n\' "$l"'


def test_local_gate_feeds_only_a_command_that_announced_itself(tmp_path: Path) -> None:
    local = LocalTransport(Host(name="here", address="127.0.0.1", transport="local"))
    gate = Gate(LAUNCH_MARKER.encode(), 2.0)
    fed = local.run(["sh", "-c", PROMPT], stdin=b'{"n": 1}\n', timeout=10, gate=gate)
    assert fed.stdout == f'{LAUNCH_MARKER}\n{{"ok": true, "got": {{"n": 1}}}}\n'.encode()
    # no marker before its output ends (as the stub's `unchanged` answer): never fed
    flag = tmp_path / "fed"
    quiet = f"echo answer; exec >&-; read -r l && touch {shlex.quote(str(flag))}"
    done = local.run(["sh", "-c", quiet], stdin=b"line\n", timeout=10, gate=gate)
    assert (done.exit_status, done.stdout) == (1, b"answer\n")
    # the marker too late: the command is killed unfed
    late = f"sleep 5; echo {LAUNCH_MARKER}; read -r l && touch {shlex.quote(str(flag))}"
    with pytest.raises(HostTimeoutError) as info:
        local.run(["sh", "-c", late], stdin=b"line\n", timeout=10, gate=replace(gate, within=0.3))
    assert info.value.phase == "start" and "did not start within 0.3s" in str(info.value)
    assert not flag.exists()


def test_a_relay_feeds_only_a_command_that_announced_itself_in_time(
    sshd_rig: SshdRig, sshd_hosts: Hosts, request: pytest.FixtureRequest
) -> None:
    rig_hosts = sshd_hosts(4)
    m = _rig_manifest(sshd_rig, rig_hosts, request.getfixturevalue("relay_identity"))
    fast = Timeouts(connect=2.0, start=0.5)
    account = sshd_rig.account(0)
    flag = Path(account.home, f"fed-{secrets.token_hex(4)}")
    late = f"sleep {SLOW_LOGIN + 3:g}; echo {LAUNCH_MARKER}; read -r l && touch {flag}"
    with TransportPool(known_hosts=sshd_rig.known_hosts) as pool:
        steps = _steps(m)
        tree = TreeLauncher(m, steps, pool, sshd_rig.known_hosts, 2)
        try:
            prompt, slow = [replace(s, timeouts=fast) for s in steps if tree.relayed(s.host)]
            argv = ["sh", "-c", PROMPT]
            report = tree.launch(prompt, b'{"n": 1}\n', 10, argv=argv, start=fast.start)
            assert report == {"ok": True, "got": {"n": 1}}
            with pytest.raises(RelayError) as info:
                tree.launch(slow, b'{"n": 2}\n', 10, argv=["sh", "-c", late], start=fast.start)
        finally:
            tree.close()
    try:
        e = info.value
        assert (e.reason, e.phase, e.launched) == ("agent_start_timeout", "start", False), e
        assert "did not start within 2.5s" in str(e)
        # the late command outlives its session a while; it must end without being fed
        gone = wait_for(lambda: not running(account.uid, late), SETTLE)
        assert gone and not flag.exists()
    finally:
        flag.unlink(missing_ok=True)


def running(uid: int, command: str) -> list[int]:
    """Live processes of ``uid`` whose argv holds ``command``."""
    return [p for p in procs.pids() if _uid(p) == uid and command in procs.cmdline(p)]


# ---- the launcher SIGKILLed or SIGSTOPped in each phase -----------------------------------------


def until(check: Callable[[], object], what: str, proc: subprocess.Popen[bytes]) -> None:
    assert wait_for(check, 30), f"the launch never reached {what}; launcher exit {proc.poll()}"


def signalled(
    world: World,
    launch: tuple[subprocess.Popen[bytes], Path],
    how: str,
    *,
    stop_for: float = 0.0,
    settle: float = SETTLE,
) -> Run | None:
    """Send ``how`` to the launcher. SIGKILL: everything it started must end by its own
    deadlines within ``settle`` s. SIGSTOP: stopped for ``stop_for`` s at least (past the
    phase's deadline) and until the hosts are quiet, then SIGCONT; its Run."""
    proc, events = launch
    if how == "SIGKILL":
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert quiet(world, settle), procs.describe(remote_left(world))
        return None
    proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(stop_for)
        assert quiet(world, settle), procs.describe(remote_left(world))
    finally:
        proc.send_signal(signal.SIGCONT)
    run = world.finish(proc, events)
    assert quiet(world, settle), procs.describe(remote_left(world))
    return run


def failed_with(run: Run | None, code: int, state: str, reason: str | None = None) -> None:
    """The resumed launcher reported its one step ``state`` (``reason``) and exited ``code``."""
    assert run is not None
    e = run.only()
    assert e["state"] == state, e
    assert reason is None or e["reason"] == reason, e
    assert run.summarized(e["program"], e["reason"]), run.out
    assert run.code == code, run.out


SIGNALS = ["SIGKILL", "SIGSTOP"]


@pytest.mark.parametrize("how", SIGNALS)
def test_launcher_signalled_while_connecting(world: World, fresh_sshd: Spawn, how: str) -> None:
    host = fresh_sshd()
    name = world.program()
    m = world.manifest([host], {name: SLEEPER}, timeouts=FAST)
    world.key(m, distribute=False)
    # a paused sshd still accepts TCP (the kernel's backlog) but sends no banner
    world.rig.pause(host)
    try:
        launch = world.launch(m)
        until(lambda: step_state(launch[1]) == "connecting", "connect", launch[0])
        run = signalled(world, launch, how, stop_for=FAST["connect"] + 1)
    finally:
        world.rig.resume(host)
    if run is not None:
        failed_with(run, 3, "unreachable", "timeout")
    assert quiet(world, SETTLE), procs.describe(remote_left(world))


@pytest.mark.parametrize(
    ("how", "cached"),
    [
        pytest.param("SIGKILL", True, id="SIGKILL"),
        pytest.param("SIGSTOP", True, id="SIGSTOP"),
        pytest.param("SIGSTOP", False, id="SIGSTOP-first-launch"),
    ],
)
def test_launcher_signalled_during_agent_start(
    world: World, fresh_sshd: Spawn, how: str, cached: bool
) -> None:
    host = fresh_sshd()
    m, _ = service_on(world, host, cached=cached)
    with slow_login(world.rig, host, SLOW_LOGIN) as log:
        launch = world.launch(m)
        until(
            lambda: logins(log)[0] >= 1 and step_state(launch[1]) in ("connecting", "starting"),
            "agent start (a session in its slow login)",
            launch[0],
        )
        run = signalled(world, launch, how, stop_for=SLOW_LOGIN + FAST["start"])
    if run is not None:
        failed_with(run, 2, "failed")


@pytest.mark.parametrize("how", SIGNALS)
def test_launcher_signalled_while_awaiting_the_callback(
    world: World, sshd_hosts: Hosts, how: str
) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    # the probe never passes: the agent's ready deadline ends the program
    flag = world.home(host) / f"never-{world.tag}"
    m = world.manifest([host], {name: never_ready(flag, FAST["ready"])}, timeouts=FAST)
    world.key(m)
    launch = world.launch(m)
    until(
        lambda: world.tagged() and step_state(launch[1]) in ("starting", "awaiting-callback"),
        "the readiness probe",
        launch[0],
    )
    run = signalled(world, launch, how)
    if run is not None:
        failed_with(run, 2, "failed", "not_ready")


@pytest.mark.parametrize("how", SIGNALS)
def test_launcher_signalled_while_a_job_runs(world: World, sshd_hosts: Hosts, how: str) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    m = world.manifest([host], {name: {"kind": "job", "run": ["sleep", "300"]}}, timeouts=FAST)
    world.key(m)
    launch = world.launch(m)
    until(lambda: step_state(launch[1]) == "running", "a verified job", launch[0])
    assert world.tagged()
    # SIGKILL closes the job's connection at once; SIGSTOP stops the heartbeats
    run = signalled(world, launch, how, settle=JOB_SETTLE)
    if run is not None:
        failed_with(run, 2, "failed", "job_lost")
