"""Faults during `rex apply` on real sshds: each one ends with its exit code and its reason in the
summary, nobody let in, and nothing left behind (the no-orphans oracle runs after every test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faultproxy as fp
import helpers_procs as procs
import pytest
from helpers_world import Run, free_port, read_events
from oracle import Oracle
from sshrig import RigHost, SshdRig

from rexplan.cli.rex import main
from rexplan.cli.rex_key import main as rex_key
from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import PendingStep
from rexplan.transport import shipping
from rexplan.wire import keyfile
from rexplan.wire.launch import make_launch

REPO = Path(__file__).resolve().parent.parent
#: failing steps end within seconds; passing ones never wait for these
TIMEOUTS = {"connect": 3, "start": 5, "callback": 5, "ready": 3}
SLEEPER = {"run": ["sleep", "300"], "ready": {"alive": 0.2}}
#: the address agents dial when a fault proxy stands in front of the listener
PROXY_ADDRESS = "127.0.0.5"
#: where a fault proxy in front of an sshd listens
SSHD_PROXY_ADDRESS = "127.0.0.6"


# ---- processes ----------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment holds NAME=VALUE."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    if alive(int(entry)):
                        found.append(int(entry))
    return found


def wait_for(check: Callable[[], object], within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def kill_all(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- runs ---------------------------------------------------------------------------------------


@dataclass
class World:
    """Manifests over rig hosts for one test: its own manifest user, keys and program names."""

    rig: SshdRig
    tmp: Path
    oracle: Oracle
    capsys: pytest.CaptureFixture[str]
    user: str = field(default_factory=lambda: f"u{secrets.token_hex(4)}")
    hosts: dict[str, RigHost] = field(default_factory=dict)
    programs: set[str] = field(default_factory=set)
    launchers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    known_hosts: str | None = None  # default: the rig's

    @property
    def tag(self) -> str:
        return self.oracle.tag

    @property
    def keys(self) -> Path:
        return self.tmp / "keys"

    def program(self) -> str:
        name = f"p{secrets.token_hex(4)}"
        self.programs.add(name)
        return name

    def manifest(
        self,
        hosts: Sequence[RigHost],
        programs: Mapping[str, Mapping[str, Any]],
        *,
        callback: Mapping[str, Any] | None = None,
        timeouts: Mapping[str, float] | None = None,
    ) -> Path:
        self.hosts.update({h.name: h for h in hosts})
        doc: dict[str, Any] = {
            "rex": 1,
            "defaults": {"user": self.user, "timeouts": timeouts or TIMEOUTS, "stop_timeout": 1},
            "hosts": {h.name: {"address": h.address, "port": h.port} for h in hosts},
            "users": {self.user: {"login": self.rig.login, "identity": self.rig.identity}},
            "programs": {
                p: {
                    "on": [h.name for h in hosts],
                    **spec,
                    "env": {**spec.get("env", {}), "REXTEST": self.tag},
                }
                for p, spec in programs.items()
            },
            "authorize": ["*.*.*"],
        }
        if callback:
            doc["callback"] = dict(callback)
        path = self.tmp / f"m{len(list(self.tmp.glob('m*.yaml')))}.yaml"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    def key(self, manifest: Path, *, distribute: bool = True) -> None:
        argv = [["create", "-m", str(manifest)]]
        if distribute:
            argv.append(["distribute", "-m", str(manifest), "--known-hosts", self.rig.known_hosts])
        for args in argv:
            code = rex_key([*args, "--keys", str(self.keys)])
            out, err = self.capsys.readouterr()
            assert code == 0, out + err

    def argv(self, manifest: Path, events: Path) -> list[str]:
        return [
            "apply",
            str(manifest),
            "-y",
            "--keys",
            str(self.keys),
            "--known-hosts",
            self.known_hosts or self.rig.known_hosts,
            "--events",
            str(events),
        ]

    def apply(self, manifest: Path) -> Run:
        """`rex apply` in this process."""
        events = self.tmp / f"events-{secrets.token_hex(3)}.jsonl"
        code = main(self.argv(manifest, events))
        out, err = self.capsys.readouterr()
        return Run(code, read_events(events), out + err)

    def launch(self, manifest: Path) -> tuple[subprocess.Popen[bytes], Path]:
        """`rex apply` as its own process (to be signalled); its events file."""
        events = self.tmp / f"events-{secrets.token_hex(3)}.jsonl"
        argv = [
            sys.executable,
            "-c",
            "import sys; from rexplan.cli.rex import main; sys.exit(main())",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
        proc = subprocess.Popen(
            [*argv, *self.argv(manifest, events)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.launchers.append(proc)
        return proc, events

    def finish(self, proc: subprocess.Popen[bytes], events: Path, within: float = 60) -> Run:
        out, _ = proc.communicate(timeout=within)
        return Run(proc.returncode, read_events(events), out.decode(errors="replace"))

    def home(self, host: RigHost) -> Path:
        return Path(host.state_dir_for(self.rig.login))

    def tagged(self) -> list[int]:
        return with_env("REXTEST", self.tag)

    def gone(self, within: float) -> bool:
        """Every process of this test ended within ``within`` seconds."""
        return wait_for(lambda: not self.tagged(), within)

    def stop_services(self, run: Run) -> None:
        """Stop what ``run`` made ready, the way a supervisor is stopped: SIGTERM to it."""
        for e in run.final().values():
            if e["state"] != "ready":
                continue
            record = json.loads(
                procs.record_path(self.home(self.hosts[e["host"]]), e["program"]).read_text()
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(record["agent"]), signal.SIGTERM)
            assert wait_for(lambda pid=e["pid"]: not alive(pid), 10), e

    def cleanup(self) -> None:
        for proc in self.launchers:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        for host in self.hosts.values():
            home = self.home(host)
            if not home.exists():
                continue
            with contextlib.suppress(OSError):
                home.chmod(0o700)
                (home / "run").chmod(0o700)
            keys = home / "keys" / host.name
            shutil.rmtree(keys / self.user, ignore_errors=True)
            (keys / f"{self.user}.key").unlink(missing_ok=True)
            for program in self.programs:
                procs.remove_records(home, program)


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


Hosts = Callable[[int], list[RigHost]]


# ---- the agent killed ---------------------------------------------------------------------------


def never_ready(flag: Path, timeout: float = 20, shell: str | None = None) -> dict[str, Any]:
    """A service whose file probe passes only once the test creates ``flag`` (put it in the
    host's REX_HOME: the rig account cannot see into the test's tmp_path)."""
    run: dict[str, Any] = {"shell": shell} if shell else {"run": ["sleep", "300"]}
    return {**run, "ready": {"file": str(flag), "timeout": timeout}}


def agent_pids(program: int) -> tuple[int, int]:
    """(front, supervisor) of a program: its parent and grandparent."""
    supervisor = parent(program)
    return parent(supervisor), supervisor


def test_agent_sigkilled_before_ok_the_launcher_still_ends_the_group(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    flag = world.home(host) / f"never-{world.tag}"
    m = world.manifest([host], {name: never_ready(flag, shell="sleep 300 & sleep 300")})
    world.key(m)
    proc, events = world.launch(m)
    assert wait_for(lambda: len(world.tagged()) >= 2, 30), proc
    program = min(world.tagged())
    front, supervisor = agent_pids(program)
    kill_all([front, supervisor])
    run = world.finish(proc, events)
    e = run.only()
    assert run.code == 2, run.out
    assert (e["state"], e["reason"]) == ("failed", "no_callback"), e
    assert run.summarized(name, "no_callback")
    # nobody supervises the group any more: the launcher's --kill by the run's tags ended it
    assert world.gone(10), world.tagged()


def test_agent_sigkilled_with_no_launcher_its_program_still_dies(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    m = world.manifest([host], {name: SLEEPER})
    world.key(m)
    triple = f"{host.name}.{world.user}.{name}"
    secret = keyfile.parse_key_file(
        (world.keys / keyfile.key_relpath(host.name, world.user, name)).read_bytes()
    )[2]
    # ready is roomy: the agent must be killed before it could end the program by itself
    deadlines = {"start": 0.5, "ready": 3.0, "callback": 0.5, "stop": 0.5}
    with CallbackListener(handshake_timeout=1) as lis:
        step = PendingStep.create(f"{name}@{host.name}", triple, secret, 30)
        lis.expect(step)
        line = make_launch(
            run=lis.run_id,
            step=step.step_id,
            triple=triple,
            key_path=keyfile.key_relpath(host.name, world.user, name),
            nl=step.nl,
            callback=lis.address,
            deadlines=deadlines,
            argv=["sleep", "300"],
            env={"REXTEST": world.tag},
            ready={"kind": "file", "path": str(world.tmp / "never")},
            log=name,
        )
        agent = subprocess.Popen(
            host.ssh_argv(shipping.bootstrap_argv("python3")),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        world.launchers.append(agent)
        assert agent.stdin is not None
        agent.stdin.write(shipping.bootstrap_input(line))
        agent.stdin.close()
        assert wait_for(world.tagged, 20)
        program = world.tagged()[0]
        kill_all(list(agent_pids(program)))
        agent.wait(10)
        # every deadline of the launch, then the stop grace, has passed: nothing may run
        try:
            assert world.gone(sum(deadlines.values()) + 1), world.tagged()
        finally:
            kill_all(world.tagged())


# ---- the callback port faulted (a fault proxy in front of the listener) -------------------------


@contextlib.contextmanager
def callback_through(fault: fp.Fault) -> Iterator[tuple[dict[str, Any], fp.FaultProxy]]:
    """A manifest ``callback`` section whose agents dial a fault proxy in front of the listener:
    the listener binds 127.0.0.1:P, agents are told PROXY_ADDRESS:P, where the proxy listens."""
    port = free_port()
    proxy = fp.FaultProxy(("127.0.0.1", port), fault, listen=(PROXY_ADDRESS, port))
    with proxy:
        yield {"bind": "127.0.0.1", "port": port, "advertise": PROXY_ADDRESS}, proxy


@pytest.mark.parametrize("how", ["blackhole", "reset"])
def test_callback_port_blackholed_or_reset(world: World, sshd_hosts: Hosts, how: str) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    fault = fp.blackhole() if how == "blackhole" else fp.reset()
    with callback_through(fault) as (callback, proxy):
        timeouts = {**TIMEOUTS, "callback": 1.5}
        m = world.manifest([host], {name: SLEEPER}, callback=callback, timeouts=timeouts)
        world.key(m)
        run = world.apply(m)
        assert proxy.connections or how == "reset"
    e = run.only()
    assert run.code == 2, run.out
    assert (e["state"], e["reason"], e["phase"]) == ("failed", "no_callback", "callback"), e
    assert run.summarized(name, "no_callback")
    assert PROXY_ADDRESS in e["detail"]  # the agent's own report: it gave up on the proxy
    assert world.gone(5), world.tagged()


def test_slow_callback_still_verifies(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    with callback_through(fp.delay(300)) as (callback, proxy):
        m = world.manifest([host], {name: SLEEPER}, callback=callback)
        world.key(m)
        run = world.apply(m)
        assert len(proxy.connections) == 1
    try:
        assert run.code == 0, run.out
        assert run.only()["state"] == "ready"
    finally:
        world.stop_services(run)


def test_flipped_proof_in_a_real_launch_is_refused(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    # resp (the agent's second frame), a byte inside the ap hex
    with callback_through(fp.bitflip(1, 30, 0)) as (callback, _):
        m = world.manifest([host], {name: SLEEPER}, callback=callback)
        world.key(m)
        run = world.apply(m)
    e = run.only()
    assert run.code == 6, run.out
    # a flip that leaves ap hex is BAD_PROOF; one that does not, MALFORMED: the listener says
    # no, which the agent reports as rejected
    assert e["state"] == "failed" and e["reason"] in ("bad_proof", "rejected"), e
    assert run.summarized(name, e["reason"])
    assert world.gone(5), world.tagged()


def test_lost_ok_frame_is_not_reported_ready(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    with callback_through(fp.drop(1, fp.DOWN)) as (callback, _):
        timeouts = {**TIMEOUTS, "callback": 1.5}
        m = world.manifest([host], {name: SLEEPER}, callback=callback, timeouts=timeouts)
        world.key(m)
        run = world.apply(m)
    e = run.only()
    try:
        assert world.gone(5), world.tagged()
        assert e["state"] != "ready", f"reported ready, but pid {e.get('pid')} is gone"
    finally:
        if e["state"] == "ready" and procs.record_path(world.home(host), name).exists():
            with contextlib.suppress(AssertionError):
                world.stop_services(run)


# ---- programs that misbehave before they are verified -------------------------------------------

MISBEHAVING = {
    # a child in the program's group outlives its parent's exit
    "exits-leaving-a-child": ("sleep 300 & exit 0", "exited"),
    # the grandchild leaves the group with setsid: only the run's tags still find it
    "double-forks": ("setsid sleep 300 & sleep 300", "not_ready"),
    "daemonizes": ("setsid sleep 300 & exit 0", "exited"),
    "ignores-sigterm": ("trap '' TERM; sleep 300 & sleep 300", "not_ready"),
}


@pytest.mark.parametrize("case", sorted(MISBEHAVING))
def test_misbehaving_program_fails_and_its_whole_tree_dies(
    world: World, sshd_hosts: Hosts, case: str
) -> None:
    (host,) = sshd_hosts(1)
    shell, reason = MISBEHAVING[case]
    name = world.program()
    spec = {"shell": shell, "ready": {"tcp": free_port(), "timeout": 1.5}}
    m = world.manifest([host], {name: spec})
    world.key(m)
    run = world.apply(m)
    e = run.only()
    assert run.code == 2, run.out
    assert (e["state"], e["reason"]) == ("failed", reason), e
    assert run.summarized(name, reason)
    assert world.gone(5), f"{case}: left {world.tagged()}"


# ---- hosts that fail ----------------------------------------------------------------------------


def test_hung_sshd_is_unreachable_by_the_banner_deadline(
    world: World, fresh_sshd: Callable[[], RigHost]
) -> None:
    host = fresh_sshd()
    name = world.program()
    m = world.manifest([host], {name: SLEEPER}, timeouts={**TIMEOUTS, "connect": 1.5})
    world.key(m, distribute=False)
    world.rig.pause(host)
    run = world.apply(m)
    world.rig.resume(host)
    e = run.only()
    assert run.code == 3, run.out
    assert (e["state"], e["reason"], e["phase"]) == ("unreachable", "timeout", "banner"), e
    assert "banner" in e["detail"]
    assert run.summarized(name, "timeout")
    assert world.tagged() == []


@pytest.mark.parametrize(
    ("where", "reason"), [("REX_HOME", "agent_upload"), ("REX_HOME/run", "start_failed")]
)
def test_state_dir_not_writable_fails_with_the_reason(
    world: World, fresh_sshd: Callable[[], RigHost], where: str, reason: str
) -> None:
    host = fresh_sshd()
    name = world.program()
    m = world.manifest([host], {name: SLEEPER})
    world.key(m)
    home = world.home(host)
    target = home if where == "REX_HOME" else home / "run"
    target.mkdir(mode=0o700, exist_ok=True)
    os.chown(target, *_owner(home))
    target.chmod(0o500)
    try:
        run = world.apply(m)
    finally:
        target.chmod(0o700)
    e = run.only()
    assert run.code == 2, run.out
    assert (e["state"], e["reason"]) == ("failed", reason), e
    assert "Permission denied" in e["detail"], e
    assert run.summarized(name, reason)
    assert world.tagged() == []


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


@contextlib.contextmanager
def sshd_through(world: World, host: RigHost, fault: fp.Fault) -> Iterator[RigHost]:
    """``host`` as reached through a fault proxy on SSHD_PROXY_ADDRESS, its key pinned there."""
    with fp.FaultProxy((host.address, host.port), fault, listen=(SSHD_PROXY_ADDRESS, 0)) as proxy:
        address, port = proxy.address
        known = world.tmp / "known_hosts"
        pinned = Path(world.rig.known_hosts).read_text()
        known.write_text(f"{pinned}[{address}]:{port} {host.host_key}\n")
        world.known_hosts = str(known)
        yield dataclasses.replace(host, address=address, port=port)


def test_slow_sshd_is_unreachable_by_the_banner_deadline(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    name = world.program()
    with sshd_through(world, host, fp.delay(2000)) as slow:
        m = world.manifest([slow], {name: SLEEPER}, timeouts={**TIMEOUTS, "connect": 1.5})
        world.key(m, distribute=False)
        run = world.apply(m)
    e = run.only()
    assert run.code == 3, run.out
    assert (e["state"], e["reason"], e["phase"]) == ("unreachable", "timeout", "banner"), e
    assert run.summarized(name, "timeout")


def test_sshd_reset_mid_upload_fails_and_leaves_no_partial_agent(
    world: World, fresh_sshd: Callable[[], RigHost]
) -> None:
    host = fresh_sshd()
    name = world.program()
    world.key(world.manifest([host], {name: SLEEPER}))
    # past the SSH handshake (a few KB), inside the ~90 KB agent upload
    with sshd_through(world, host, fp.reset_after(30_000)) as cut:
        run = world.apply(world.manifest([cut], {name: SLEEPER}))
    e = run.only()
    assert run.code == 2, run.out
    assert (e["state"], e["reason"]) == ("failed", "agent_upload"), e
    assert run.summarized(name, "agent_upload")
    partial = sorted(world.home(host).glob(".agent-*.tmp"))
    for path in partial:
        path.unlink()  # here, so the oracle reports only what this assertion does not
    assert partial == [], f"an interrupted upload left {partial} in REX_HOME"


# ---- launchers that collide, stop or die --------------------------------------------------------


def test_two_launchers_at_once_run_each_triple_once(world: World, sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(2)
    name = world.program()
    m = world.manifest(hosts, {name: {**SLEEPER, "ready": {"alive": 1.0}}})
    world.key(m)
    first, second = world.launch(m), world.launch(m)
    runs = [world.finish(*first), world.finish(*second)]
    try:
        for host in hosts:
            step = f"{name}@{host.name}"
            states = sorted(r.final()[step]["state"] for r in runs)
            assert states == ["failed", "ready"], (step, [r.out for r in runs])
            loser = next(r.final()[step] for r in runs if r.final()[step]["state"] == "failed")
            assert loser["reason"] == "already_running", loser
            triple = f"{host.name}.{world.user}.{name}"
            assert len(with_env("REX_TRIPLE", triple)) == 1
        assert sorted(r.code for r in runs) in ([0, 2], [2, 2]), [r.out for r in runs]
    finally:
        for r in runs:
            world.stop_services(r)


def test_launcher_stopped_while_awaiting_callbacks(world: World, sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(2)
    flags = [world.home(h) / f"ready-{world.tag}" for h in hosts]
    timeouts = {**TIMEOUTS, "callback": 1.5}
    programs = {
        world.program(): never_ready(flag, 10) | {"on": [h.name]}
        for h, flag in zip(hosts, flags, strict=True)
    }
    m = world.manifest(hosts, programs, timeouts=timeouts)
    world.key(m)
    proc, events = world.launch(m)
    try:
        assert wait_for(lambda: len(world.tagged()) == 2, 30)
        proc.send_signal(signal.SIGSTOP)
        for flag in flags:
            flag.write_text("")  # now ready: the agents dial a launcher that cannot answer
        # callback deadline 1.5 s, stop grace 1 s: the agents end their programs themselves
        assert world.gone(10), world.tagged()
    finally:
        proc.send_signal(signal.SIGCONT)
        for flag in flags:
            flag.unlink(missing_ok=True)
    run = world.finish(proc, events)
    assert run.code == 2, run.out
    for name in programs:
        e = next(e for e in run.final().values() if e["program"] == name)
        assert (e["state"], e["reason"]) == ("failed", "no_callback"), e
        assert run.summarized(name, "no_callback")


# ---- the oracle catches what a test leaves ------------------------------------------------------


def test_the_oracle_names_every_kind_of_leftover(sshd_rig: SshdRig, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    oracle = Oracle(sshd_rig, grace=0.2)
    home = Path(host.state_dir)
    stray = home / f".keys.rex-{secrets.token_hex(4)}.tmp"
    stray.write_text("")
    lock = home / "run" / f"held{secrets.token_hex(3)}.lock"
    session = subprocess.Popen(
        host.ssh_argv(
            [
                "sh",
                "-c",
                f"mkdir -p {home}/run; exec python3 -c 'import fcntl,os,time;"
                f'fd=os.open("{lock}",os.O_RDWR|os.O_CREAT);fcntl.flock(fd,fcntl.LOCK_EX);'
                "print(1,flush=True);time.sleep(60)'",
            ]
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert session.stdout is not None and session.stdout.readline() == b"1\n"
        orphan = subprocess.Popen(
            ["sleep", "60"], env={"PATH": os.environ["PATH"], "TAGGED": oracle.tag}
        )
        report = oracle.report()
        orphan.wait(5)
    finally:
        session.kill()
        session.wait()
        lock.unlink(missing_ok=True)
        stray.unlink(missing_ok=True)
    assert f"process pid {orphan.pid}" in report
    assert "sshd session" in report
    assert f"file {stray}" in report and f"file {lock}" in report
    assert not stray.exists()  # removed; a lock file is left (its holder was killed)
