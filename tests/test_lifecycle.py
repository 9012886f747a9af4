"""Lifecycle on real sshds: supervision and state, rex status, rex stop, idempotent apply."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers_procs as procs
import pytest
from helpers_world import SLEEPER, Hosts, Run, World, nothing_left
from sshrig import RigHost, SshdRig, cgroup_unavailable_reason

from rexplan.core import manifest as manifests
from rexplan.core.model import FailurePolicy, Ready, Step
from rexplan.engine import agentctl
from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import PendingStep
from rexplan.engine.placement import Load, choose, parse_load, place
from rexplan.engine.policy import batches, counts_as_failure, exceeds
from rexplan.errors import ManifestError
from rexplan.remote.agent.cgroup import cgroup_dir
from rexplan.remote.agent.failure import EXIT_BAD_LAUNCH
from rexplan.remote.agent.front import main as agent_main
from rexplan.remote.agent.load import _measured_cgroup, load_report
from rexplan.transport import shipping
from rexplan.transport.pool import connect
from rexplan.wire import codes, keyfile
from rexplan.wire.launch import make_launch, parse_launch, spec_digest

#: forks a grandchild that leaves the process group (setsid), then waits forever
DAEMON = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(300)\n"
    "    os._exit(0)\n"
    "time.sleep(300)\n"
)
#: ignores SIGTERM, so only the KILL after the grace ends it
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(300)\n"


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


# --- idempotent apply ------------------------------------------------------------------------


def test_apply_twice_changes_nothing_the_second_time(world: World, sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(2)
    names = [h.name for h in hosts]
    m = world.manifest(
        hosts,
        {"db": {"on": names, **SLEEPER}, "web": {"on": names, "requires": ["db"], **SLEEPER}},
    )
    world.distribute(m)
    first = world.apply(m)
    assert first.code == 0, first.out + first.err
    assert set(first.actions().values()) == {"started"}
    before = sorted(world.tagged())
    second = world.apply(m)
    assert second.code == 0, second.out + second.err
    assert set(second.actions().values()) == {"unchanged"}
    assert {e["state"] for e in second.final().values()} == {"unchanged"}
    assert second.pids() == first.pids()
    assert sorted(world.tagged()) == before  # no process started, none ended
    assert "4 unchanged, 0 started, 0 restarted, 0 failed" in second.out
    code, _, _ = world.rex("stop", str(m))
    assert code == 0 and world.tagged() == []


def test_unchanged_reapply_starts_no_interpreter_on_the_host(
    world: World, sshd_hosts: Hosts
) -> None:
    """The shell check (shipping.CHECK_SH) answers for an unchanged program: with the host's
    python made unusable, the re-apply still reports unchanged; a changed one needs it."""
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}})
    world.distribute(m)
    first = world.apply(m)
    assert first.code == 0, first.out + first.err
    doc = json.loads(m.read_text())
    doc["name"] = "m"  # the same manifest under another file name: still the triple's owner
    doc["hosts"][host.name]["python"] = "/nonexistent/python3"
    no_python = m.with_name("no-python.yaml")
    no_python.write_text(json.dumps(doc))
    again = world.apply(no_python)
    assert again.code == 0, again.out + again.err
    assert again.actions() == {f"db@{host.name}": "unchanged"}
    assert again.pids() == first.pids()
    doc["programs"]["db"]["env"]["CHANGED"] = "1"
    no_python.write_text(json.dumps(doc))
    changed = world.apply(no_python)
    assert changed.code != 0  # the stub runs, and there is no interpreter to run it
    assert world.tagged() == list(first.pids().values())  # the old one still runs
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err


def test_records_over_sftp_say_what_the_agent_says(world: World, sshd_hosts: Hosts) -> None:
    """apply reads a host's records over SFTP instead of running the agent's --status: both
    agree, for running programs and for stopped ones (all but the uptime)."""
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}})
    world.distribute(m)
    assert world.apply(m).code == 0

    def both() -> tuple[dict[str, Any], dict[str, Any]]:
        t = connect(host.model_host(), host.model_user(), known_hosts=host.known_hosts)
        try:
            agent = f"{t.rex_home()}/agent-{shipping.bundle_sha()[:16]}.py"
            slow = agentctl.read_records(t, host.model_host().python, agent, 5.0)
            fast = agentctl.sftp_records(t)
        finally:
            t.close()
        assert slow is not None and fast is not None
        for record in slow.values():
            record.pop("uptime", None)
        return fast, slow

    # the rig's hosts are shared: earlier tests' records may sit beside this one's
    db = world.triple(host.name, "db")  # records are named by their triple
    fast, slow = both()
    assert fast == slow and slow[db]["alive"] is True
    assert world.rex("stop", str(m))[0] == 0
    fast, slow = both()
    assert fast == slow and slow[db]["alive"] is False


def test_changed_env_restarts_only_that_program(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    programs: dict[str, dict[str, Any]] = {
        "keep": {"on": [host.name], **SLEEPER},
        "edit": {"on": [host.name], **SLEEPER, "env": {"LEVEL": "1"}},
    }
    m = world.manifest([host], programs)
    world.distribute(m)
    first = world.apply(m)
    assert first.code == 0, first.out + first.err
    programs["edit"]["env"] = {"LEVEL": "2"}
    world.manifest([host], programs)
    code, dry, _ = world.rex("apply", str(m), "--dry-run")
    assert code == 0
    header, *rows = dry.splitlines()[:3]
    column = header.split().index("action")
    assert [row.split()[column] for row in rows] == ["unchanged", "restarted"]
    assert world.record(host.name, "edit")["pid"] == first.pids()[f"edit@{host.name}"]
    second = world.apply(m)
    assert second.code == 0, second.out + second.err
    assert second.actions() == {f"keep@{host.name}": "unchanged", f"edit@{host.name}": "restarted"}
    old, new = first.pids()[f"edit@{host.name}"], second.pids()[f"edit@{host.name}"]
    assert old != new and not procs.alive(old) and procs.alive(new)
    assert procs.environ(new)["LEVEL"] == "2"
    assert second.pids()[f"keep@{host.name}"] == first.pids()[f"keep@{host.name}"]
    assert world.tagged(host.name, "edit") == [new]
    assert world.rex("stop", str(m))[0] == 0


# --- status ------------------------------------------------------------------------------------


def test_status_shows_each_kind_of_state(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    home = host.state_dir_for(world.rig.login)
    marker = f"flapped-{world.tag}"
    world.leftovers.append(Path(home, marker))
    programs: dict[str, dict[str, Any]] = {
        "up": {"on": [h], **SLEEPER},
        # passes its 0.2 s readiness, then exits 3
        "quits": {"on": [h], "shell": "sleep 0.6; exit 3", "ready": {"alive": 0.2}},
        # the first run passes readiness; every restart exits 3 at once
        "flaps": {
            "on": [h],
            "shell": f"if [ -e {marker} ]; then exit 3; fi; touch {marker}; sleep 0.6; exit 3",
            "cwd": home,
            "ready": {"alive": 0.2},
            "restart": "on-failure",
        },
        "never": {"on": [h], **SLEEPER},
    }
    m = world.manifest([host], programs)
    world.distribute(m)
    code, before = world.status(m)
    assert code == 2 and {s["status"] for s in before.values()} == {"absent"}
    run = world.apply(m, "--limit", h)
    assert run.code == 0, run.out + run.err
    code, _, _ = world.rex("stop", str(m), "--program", "never")
    assert code == 0

    def settled() -> bool:
        _, now = world.status(m)
        return now[f"quits@{h}"]["status"] == "exited" and now[f"flaps@{h}"]["restarts"] >= 2

    assert procs.wait_until(settled, 10)
    code, now = world.status(m)
    assert code == 2
    assert now[f"up@{h}"]["status"] == "running"
    assert now[f"up@{h}"]["pid"] == run.pids()[f"up@{h}"]
    assert now[f"up@{h}"]["uptime"] >= 0
    assert (now[f"quits@{h}"]["label"], now[f"quits@{h}"]["code"]) == ("exited(3)", 3)
    flaps = now[f"flaps@{h}"]
    assert flaps["status"] == "restarting" and flaps["code"] == 3, flaps
    assert now[f"never@{h}"]["status"] == "stopped"
    record = world.record(h, "flaps")
    assert record["restart"] == "on-failure" and record["state"] == "restarting"
    # the plain table names each state
    code, out, _ = world.rex("status", str(m))
    assert code == 2
    lines = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert lines[f"quits@{h}"].split()[2] == "exited(3)"
    assert lines[f"up@{h}"].split()[2] == "running"
    # a changed spec shows as drifted
    programs["up"]["env"] = {"NEW": "1"}
    world.manifest([host], programs)
    assert world.status(m)[1][f"up@{h}"]["status"] == "drifted"
    code, out, _ = world.rex("stop", str(m))
    assert code == 0, out
    assert world.tagged() == []
    states = {s["status"] for s in world.status(m)[1].values()}
    assert states == {"stopped"}


def test_status_of_an_unreachable_host(world: World, fresh_sshd: Callable[[], RigHost]) -> None:
    host = fresh_sshd()
    m = world.manifest([host], {"svc": {"on": [host.name], **SLEEPER}})
    world.rig.stop(host)
    code, steps = world.status(m)
    assert code == 2
    assert steps[f"svc@{host.name}"]["status"] == "unreachable"


# --- stop --------------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_stop_leaves_no_tagged_process(world: World, sshd_hosts: Hosts, force: bool) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    m = world.manifest(
        [host],
        {
            "daemon": {"on": [h], "run": ["python3", "-c", DAEMON], "ready": {"alive": 0.3}},
            "stubborn": {"on": [h], "run": ["python3", "-c", STUBBORN], "ready": {"alive": 0.3}},
            "front": {"on": [h], "requires": ["daemon", "stubborn"], **SLEEPER},
        },
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    daemon = world.tagged(h, "daemon")
    assert len(daemon) == 2, procs.describe(daemon)  # the program and its grandchild
    pgid = run.pids()[f"daemon@{h}"]
    assert {os.getpgid(p) for p in daemon} != {pgid}  # one of them left the group
    agents = [world.record(h, p)["agent"] for p in ("daemon", "stubborn", "front")]
    code, out, _ = world.rex("stop", str(m), *(["--force"] if force else []))
    assert code == 0, out
    assert world.tagged() == []
    assert not any(procs.alive(a) for a in agents)
    lines = out.splitlines()
    # dependents first
    assert lines[0].startswith("STOPPED") and f"front@{h}" in lines[0]
    assert "3 steps: 3 stopped" in lines[-1]
    for program in ("daemon", "stubborn", "front"):
        assert world.record(h, program)["state"] == "stopped"
    # stopping again finds nothing running, and says so
    code, out, _ = world.rex("stop", str(m))
    assert code == 0 and "killed" not in out


def test_stop_one_program_and_its_supervisor_does_not_restart_it(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    m = world.manifest(
        [host],
        {
            "always": {"on": [h], **SLEEPER, "restart": "always"},
            "other": {"on": [h], **SLEEPER},
        },
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    code, out, _ = world.rex("stop", str(m), "--program", "always")
    assert code == 0, out
    assert world.tagged(h, "always") == []
    assert world.tagged(h, "other") == [run.pids()[f"other@{h}"]]
    record = world.record(h, "always")
    assert record["state"] == "stopped" and record["restarts"] == 0
    code, _, err = world.rex("stop", str(m), "--program", "nope")
    assert code == 5 and "no such program" in err
    assert world.rex("stop", str(m))[0] == 0


def test_restart_always_brings_a_killed_program_back(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    m = world.manifest([host], {"phoenix": {"on": [h], **SLEEPER, "restart": "always"}})
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    first = run.pids()[f"phoenix@{h}"]
    os.kill(first, signal.SIGKILL)

    def back() -> bool:
        record = world.record(h, "phoenix")
        return record["state"] == "running" and record["pid"] != first

    assert procs.wait_until(back, 10)
    record = world.record(h, "phoenix")
    assert record["restarts"] == 1 and record["status"] == -signal.SIGKILL
    assert world.tagged(h, "phoenix") == [record["pid"]]
    # the restarted program is current: apply leaves it alone
    again = world.apply(m)
    assert again.actions() == {f"phoenix@{h}": "unchanged"}
    assert again.pids()[f"phoenix@{h}"] == record["pid"]
    assert world.rex("stop", str(m))[0] == 0


# --- the agent's lock and records, without SSH ----------------------------------------------------


@dataclass
class Local:
    """One REX_HOME with a key, a listener and the agent bundle: launches by hand."""

    home: Path
    work: Path
    bundle: Path
    lis: CallbackListener
    tag: str
    secret: bytes = field(default_factory=lambda: os.urandom(32))

    @property
    def host(self) -> str:
        # a host name of this test's own: the agent's sweeps match the triple, and other test
        # sessions on this machine run as the same user
        return f"l{self.tag}"

    @property
    def triple(self) -> str:
        return f"{self.host}.alice.app"

    @property
    def key_path(self) -> str:
        return f"{self.host}/alice/app.key"

    def launch(self, argv: list[str], step: str, **over: Any) -> dict[str, Any]:
        pending = PendingStep.create(step, self.triple, self.secret, 10)
        self.lis.expect(pending)
        line = make_launch(
            run=self.lis.run_id,
            step=step,
            triple=self.triple,
            key_path=self.key_path,
            nl=pending.nl,
            callback=self.lis.address,
            deadlines={"start": 5, "ready": 5, "callback": 5, "stop": 1},
            argv=argv,
            env={"REXTEST": self.tag},
            cwd=str(self.work),
            ready={"kind": "alive", "settle": 0.1},
            log="app",
            **over,
        )
        return self.agent(stdin=line)

    def agent(self, *args: str, stdin: bytes = b"") -> dict[str, Any]:
        env = {"REX_HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        done = subprocess.run(
            [sys.executable, "-I", "-S", str(self.bundle), *args],
            input=stdin,
            capture_output=True,
            cwd=self.work,
            env=env,
            timeout=30,
        )
        report = json.loads(done.stdout.decode().splitlines()[-1])
        report["code"] = done.returncode
        return dict(report)

    def record(self) -> dict[str, Any]:
        return dict(procs.read_state(self.home, "app"))


@pytest.fixture
def local(tmp_path: Path, tag: str) -> Iterator[Local]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(mode=0o700)
    work.mkdir()
    bundle = tmp_path / "agent.py"
    bundle.write_bytes(shipping.bundle())
    with CallbackListener(handshake_timeout=2) as lis:
        rig = Local(home, work, bundle, lis, tag)
        key = home / "keys" / rig.key_path
        key.parent.mkdir(mode=0o700, parents=True)
        key.write_bytes(keyfile.format_key_file(rig.triple, "2026-01-01", rig.secret))
        key.chmod(0o600)
        yield rig
        if procs.tagged(REXTEST=tag):
            rig.agent("--stop", "app", "1", "force")


def test_an_agent_proves_its_program_unchanged_when_asked(local: Local) -> None:
    first = local.launch(["sleep", "300"], "u1")
    assert first["code"] == 0, first
    # the same spec alive: proven to the listener (protocol ``same``), nothing started
    same = local.launch(["sleep", "300"], "u2", replace=True, unchanged=True)
    assert same == {"ok": True, "same": True, "pid": first["pid"], "code": 0}, same
    verdict = local.lis.wait("u2", 5)
    assert (verdict.ok, verdict.code, verdict.pid) == (False, codes.UNCHANGED, first["pid"])
    assert verdict.start == local.record()["start"]
    assert procs.tagged(REXTEST=local.tag) == [first["pid"]]
    # another spec is replaced as before: ``unchanged`` proves only the same spec
    other = local.launch(["sleep", "301"], "u3", replace=True, unchanged=True)
    assert other["code"] == 0 and other["replaced"] is True, other
    assert local.lis.wait("u3", 5).ok


def test_one_instance_per_triple_unless_replaced(local: Local) -> None:
    first = local.launch(["sleep", "300"], "s1")
    assert first["code"] == 0, first
    again = local.launch(["sleep", "300"], "s2")
    assert again["code"] == 18 and "already running" in again["reason"], again
    assert local.lis.wait("s2", 0.1).ok is False
    assert procs.tagged(REXTEST=local.tag) == [first["pid"]]
    # a running program whose supervisor was killed still counts
    os.kill(first["agent"], signal.SIGKILL)
    assert procs.wait_until(lambda: not procs.alive(first["agent"]), 5)
    assert procs.alive(first["pid"])
    assert local.launch(["sleep", "300"], "s3")["code"] == 18
    # replace is for another spec: the same one, alive, is a concurrent launch that won
    same = local.launch(["sleep", "300"], "s3b", replace=True)
    assert same["code"] == 18 and "already running" in same["reason"], same
    assert procs.alive(first["pid"])
    replaced = local.launch(["sleep", "301"], "s4", replace=True)
    assert replaced["code"] == 0 and replaced["replaced"] is True, replaced
    assert not procs.alive(first["pid"])
    assert procs.tagged(REXTEST=local.tag) == [replaced["pid"]]
    record = local.record()
    assert (record["step"], record["state"], record["pid"]) == ("s4", "running", replaced["pid"])
    stopped = local.agent("--stop", "app", "1")
    assert stopped["ok"] and stopped["was"] == "running"
    assert procs.tagged(REXTEST=local.tag) == []
    assert local.record()["state"] == "stopped"


def test_status_checks_pid_and_start_time(local: Local) -> None:
    started = local.launch(["sleep", "300"], "s1", restart="on-failure")
    assert started["code"] == 0, started
    (program,) = local.agent("--status")["programs"]
    assert program["alive"] and program["supervised"] and program["uptime"] >= 0
    assert program["restart"] == "on-failure" and program["restarts"] == 0
    assert program["spec"] != spec_digest(
        parse_launch(
            make_launch(
                run="r",
                step="s1",
                triple=local.triple,
                key_path=local.key_path,
                nl=bytes(16),
                callback=("127.0.0.1", 1),
                deadlines={"start": 5, "ready": 5, "callback": 5, "stop": 1},
                argv=["sleep", "300"],
                env={"REXTEST": local.tag},
                cwd=str(local.work),
                ready={"kind": "alive", "settle": 0.1},
                log="app",
            )
        )
    ), "the restart policy is part of the spec"
    # the same pid with another start time is another process: not ours
    record = local.record()
    record["start"] = str(int(record["start"]) + 1)
    (local.home / "run" / "app.json").write_text(json.dumps(record))
    (program,) = local.agent("--status")["programs"]
    assert not program["alive"] and "uptime" not in program
    bad = local.agent("--stop", "Bad.Name")
    assert bad["code"] == 16 and "usage" in bad["reason"]
    local.agent("--stop", "app", "1")
    assert procs.tagged(REXTEST=local.tag) == []


def test_restart_backoff_is_recorded_and_stop_ends_it(local: Local) -> None:
    started = local.launch(
        ["sh", "-c", "if [ -e again ]; then exit 4; fi; touch again; sleep 0.4; exit 4"],
        "s1",
        restart="on-failure",
    )
    assert started["code"] == 0, started
    seen: list[dict[str, Any]] = []

    def backing_off() -> bool:
        seen.append(local.record())
        return seen[-1]["state"] == "restarting" and seen[-1]["restarts"] >= 2

    assert procs.wait_until(backing_off, 10)
    record = seen[-1]
    assert record["status"] == 4
    # 0.5 s, 1 s, 2 s...: each restart waits twice as long as the last
    assert record["delay"] == 0.5 * 2 ** (record["restarts"] - 1)
    log = (local.home / "logs" / "app.log").read_text()
    assert f"restart {record['restarts'] - 1}" in log  # the last restart it waits to make
    stopped = local.agent("--stop", "app", "1")
    assert stopped["ok"] and stopped["was"] == "restarting"
    assert not procs.alive(record["agent"])
    assert local.record()["state"] == "stopped"


# --- failure policy ------------------------------------------------------------------------------


def failing_on(hosts: Sequence[RigHost]) -> str:
    """A shell service that exits 3 at once on ``hosts`` and runs elsewhere."""
    names = "|".join(f"{h.name}.*" for h in hosts) or "none"
    return f'case "$REX_TRIPLE" in {names}) exit 3;; esac; exec sleep 300'


@pytest.mark.parametrize(
    ("policy", "failed", "total", "aborts"),
    [
        (FailurePolicy(), 4, 4, False),
        (FailurePolicy(max_fail_percent=25), 1, 4, False),
        (FailurePolicy(max_fail_percent=25), 2, 4, True),
        (FailurePolicy(max_fail_percent=0), 1, 10, True),
        (FailurePolicy(max_fail_percent=100), 4, 4, False),
        (FailurePolicy(max_fail_percent=50), 1, 3, False),
        (FailurePolicy(max_fail_percent=50), 2, 3, True),
        (FailurePolicy(max_fail=1), 1, 4, False),
        (FailurePolicy(max_fail=1), 2, 4, True),
        (FailurePolicy(max_fail=0), 1, 4, True),
        (FailurePolicy(max_fail=0), 0, 4, False),
        (FailurePolicy(any_errors_fatal=True), 1, 100, True),
        (FailurePolicy(any_errors_fatal=True), 0, 100, False),
    ],
)
def test_max_fail_is_strictly_more_than(
    policy: FailurePolicy, failed: int, total: int, aborts: bool
) -> None:
    assert exceeds(policy, failed, total) is aborts


def test_unreachable_counts_unless_ignored() -> None:
    assert counts_as_failure("unreachable", FailurePolicy())
    assert not counts_as_failure("unreachable", FailurePolicy(ignore_unreachable=True))
    assert counts_as_failure("failed", FailurePolicy(ignore_unreachable=True))
    assert not counts_as_failure("skipped", FailurePolicy())


def test_serial_batches_each_program() -> None:
    def step(program: str, host: str) -> Step:
        return Step(
            id=f"{program}@{host}",
            wave=0,
            host=host,
            address="127.0.0.1",
            port=22,
            transport="ssh",
            login="u",
            user="u",
            program=program,
            triple=f"{host}.u.{program}",
            argv=("true",),
            shell=None,
            ready=Ready(),
            kind="service",
        )

    steps = [step("a", f"h{i}") for i in range(5)] + [step("b", f"h{i}") for i in range(2)]
    policies = {"a": FailurePolicy(serial=2), "b": FailurePolicy()}
    assert [[s.id for s in b] for b in batches(steps, policies)] == [
        ["a@h0", "a@h1", "b@h0", "b@h1"],
        ["a@h2", "a@h3"],
        ["a@h4"],
    ]
    policies = {"a": FailurePolicy(serial_percent=50), "b": FailurePolicy(serial_percent=50)}
    assert [len(b) for b in batches(steps, policies)] == [4, 3]
    assert [len(b) for b in batches(steps, {})] == [7]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_fail", "'101%'", "is not a count or a percentage"),
        ("max_fail", "-1", "less than the minimum of 0"),
        ("max_fail", "1.5", "is not of type"),
        ("serial", "0", "less than the minimum of 1"),
        ("serial", "'0%'", "is not a count or a percentage"),
        ("any_errors_fatal", "'yes'", "is not of type 'boolean'"),
        ("ignore_unreachable", "1", "is not of type 'boolean'"),
    ],
)
def test_bad_failure_policy_keys(key: str, value: str, message: str) -> None:
    text = (
        "rex: 1\nhosts: {a: {address: 127.0.0.1}}\nusers: {me: {}}\n"
        f"programs:\n  p: {{on: a, run: [x], {key}: {value}}}\nauthorize: ['*.*.*']\n"
    )
    with pytest.raises(ManifestError) as caught:
        manifests.loads(text, "m.yaml")
    (diag,) = caught.value.diagnostics
    assert diag.path == f"programs.p.{key}" and message in diag.message, diag.format()
    assert diag.line == 5
    # the same keys are accepted under defaults, and programs inherit them
    good = text.replace(f", {key}: {value}", "").replace(
        "users: {me: {}}\n", "users: {me: {}}\ndefaults: {max_fail: 25%, serial: 2}\n"
    )
    (program,) = manifests.loads(good, "m.yaml").programs
    assert program.policy == FailurePolicy(max_fail_percent=25, serial=2)


@pytest.mark.parametrize(("failing", "aborts"), [(1, False), (2, True)])
def test_max_fail_25_percent_of_4(
    world: World, sshd_hosts: Hosts, failing: int, aborts: bool
) -> None:
    hosts = sshd_hosts(4)
    names = [h.name for h in hosts]
    m = world.manifest(
        hosts,
        {
            "base": {"on": names[:1], **SLEEPER},
            "fleet": {"on": names, "shell": failing_on(hosts[:failing]), "max_fail": "25%"},
            "after": {"on": names[:1], "requires": ["base"], **SLEEPER},
        },
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 2
    states = {s: e["state"] for s, e in run.final().items()}
    assert sorted(states[f"fleet@{n}"] for n in names) == sorted(
        ["failed"] * failing + ["ready"] * (4 - failing)
    )
    after = run.final()[f"after@{names[0]}"]
    if aborts:
        assert (after["state"], after["reason"]) == ("skipped", "aborted")
        assert "2 of 4 steps of fleet failed (max_fail 25%)" in after["detail"]
        assert "aborting the run" in run.out
    else:
        assert after["state"] == "ready"
    assert world.rex("stop", str(m))[0] == 0


def test_serial_with_any_errors_fatal_stops_after_the_first_batch(
    world: World, sshd_hosts: Hosts
) -> None:
    hosts = sshd_hosts(4)
    names = [h.name for h in hosts]
    m = world.manifest(
        hosts,
        {
            "rolling": {
                "on": names,
                "shell": failing_on(hosts[:1]),
                "serial": 2,
                "any_errors_fatal": True,
            }
        },
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 2
    final = run.final()
    assert final[f"rolling@{names[0]}"]["state"] == "failed"
    assert final[f"rolling@{names[1]}"]["state"] == "ready"  # same batch: it was in flight
    for name in names[2:]:
        assert (final[f"rolling@{name}"]["state"], final[f"rolling@{name}"]["reason"]) == (
            "skipped",
            "aborted",
        )
    # nothing of the second batch ever connected
    connecting = {e["step"] for e in run.events if e.get("state") == "connecting"}
    assert connecting == {f"rolling@{n}" for n in names[:2]}
    assert world.rex("stop", str(m))[0] == 0


def test_retry_relaunches_only_what_failed(world: World, sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(3)
    names = [h.name for h in hosts]
    marker = Path(hosts[1].state_dir_for(world.rig.login), f"broken-{world.tag}")
    world.leftovers.append(marker)
    marker.write_text("")
    m = world.manifest(
        hosts,
        {
            "svc": {
                "on": names,
                # the hosts share this machine's file system: the marker breaks one of them
                "shell": f'case "$REX_TRIPLE" in {names[1]}.*) [ -e {marker} ] && exit 3;; esac;'
                " exec sleep 300",
            },
            "top": {"on": names, "requires": ["svc"], **SLEEPER},
        },
    )
    world.distribute(m)
    code, _, err = world.rex("apply", str(m), "--retry", "-y")
    assert code == 5 and "no retry file" in err
    first = world.apply(m)
    assert first.code == 2
    assert first.final()[f"svc@{names[1]}"]["state"] == "failed"
    retry_file = Path(os.environ["REX_STATE_DIR"], "retry", "m.json")
    doc = json.loads(retry_file.read_text())
    # every top waits for every svc: all three are skipped
    assert doc["steps"] == sorted([f"svc@{names[1]}", *(f"top@{n}" for n in names)])
    assert f"{m} --retry" in first.err
    marker.unlink()
    second = world.apply(m, "--retry")
    assert second.code == 0, second.out + second.err
    assert set(second.final()) == set(doc["steps"])
    assert second.actions() == {s: "started" for s in doc["steps"]}
    # the steps that were up were not touched
    for name in (names[0], names[2]):
        assert world.record(name, "svc")["pid"] == first.pids()[f"svc@{name}"]
    assert not retry_file.exists()
    # a retry file names its manifest: another one of the same name is refused
    retry_file.write_text(json.dumps({**doc, "manifest": "/elsewhere/m.yaml"}))
    code, _, err = world.rex("apply", str(m), "--retry", "-y")
    assert code == 5 and "not of" in err
    assert world.rex("stop", str(m))[0] == 0


# --- files and preconditions -------------------------------------------------------------------


def notices(run: Run) -> list[str]:
    return [e["detail"] for e in run.events if e["kind"] == "notice"]


def test_files_upload_only_what_changed_and_restart_only_its_program(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    (world.tmp / "a.txt").write_text("alpha 1\n")
    (world.tmp / "b.txt").write_text("beta\n")
    (world.tmp / "c.txt").write_text("gamma\n")
    m = world.manifest(
        [host],
        {
            # no cwd: it starts in the directory of its files
            "conf": {
                "on": [h],
                "shell": "cat a.txt sub/b.txt; exec sleep 300",
                "ready": {"alive": 0.2},
                "files": [
                    {"src": "a.txt", "dest": "a.txt"},
                    {"src": "b.txt", "dest": "sub/b.txt", "mode": "0600"},
                ],
            },
            "other": {**SLEEPER, "on": [h], "files": [{"src": "c.txt", "dest": "c.txt"}]},
        },
    )
    world.distribute(m)
    first = world.apply(m)
    assert first.code == 0, first.out + first.err
    assert sorted(notices(first)) == [
        f"uploaded 1 file(s) for other@{h}: c.txt",
        f"uploaded 2 file(s) for conf@{h}: a.txt, sub/b.txt",
    ]
    files = Path(world.home(h), "files")
    assert (files / world.triple(h, "conf") / "a.txt").read_text() == "alpha 1\n"
    assert (files / world.triple(h, "conf") / "sub" / "b.txt").stat().st_mode & 0o777 == 0o600
    assert (files / world.triple(h, "conf") / "a.txt").stat().st_mode & 0o777 == 0o644
    log = Path(world.home(h), "logs", f"{world.triple(h, 'conf')}.log").read_text()
    assert "alpha 1\nbeta\n" in log
    second = world.apply(m)
    assert notices(second) == []
    assert set(second.actions().values()) == {"unchanged"}
    (world.tmp / "a.txt").write_text("alpha 2\n")
    code, status = world.status(m)
    assert code == 2 and status[f"conf@{h}"]["status"] == "drifted"
    assert status[f"other@{h}"]["status"] == "running"
    third = world.apply(m)
    assert third.code == 0, third.out + third.err
    assert notices(third) == [f"uploaded 1 file(s) for conf@{h}: a.txt"]
    assert third.actions() == {f"conf@{h}": "restarted", f"other@{h}": "unchanged"}
    assert (files / world.triple(h, "conf") / "a.txt").read_text() == "alpha 2\n"
    # a file changed on the host is drift too, and apply puts it back
    (files / world.triple(h, "other") / "c.txt").write_text("tampered\n")
    assert world.status(m)[1][f"other@{h}"]["status"] == "drifted"
    fourth = world.apply(m)
    assert notices(fourth) == [f"uploaded 1 file(s) for other@{h}: c.txt"]
    assert fourth.actions() == {f"conf@{h}": "unchanged", f"other@{h}": "restarted"}
    assert world.rex("stop", str(m))[0] == 0


def test_a_host_that_fails_when_declines_and_starts_nothing(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    programs: dict[str, Any] = {
        "hungry": {**SLEEPER, "on": [h], "when": {"min_free_mb": 10**12}},
    }
    busy = os.getloadavg()[0] > 0  # the rig's hosts are this machine
    if busy:
        programs["idle_only"] = {**SLEEPER, "on": [h], "when": {"max_load": 0.0}}
    m = world.manifest([host], programs)
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0  # a decline is not a failure (tests/test_declines.py)
    final = run.final()
    hungry = final[f"hungry@{h}"]
    assert (hungry["state"], hungry["reason"]) == ("declined", "declined")
    assert "below min_free_mb 1000000000000" in hungry["detail"]
    assert f"hungry@{h}" in run.out and "declined" in run.out
    if busy:
        picky = final[f"idle_only@{h}"]
        assert picky["state"] == "declined" and "above max_load 0" in picky["detail"]
    assert world.tagged() == []  # nothing was started
    assert world.record(h, "hungry")["state"] == "declined"
    _, status = world.status(m)
    assert status[f"hungry@{h}"]["status"] == "declined"
    assert "min_free_mb" in status[f"hungry@{h}"]["detail"]


# --- placement -----------------------------------------------------------------------------------


def test_least_loaded_prefers_running_then_idle_hosts() -> None:
    busy, idle, middle = Load(4.0, 100, False), Load(0.1, 100, False), Load(0.5, 9000, False)
    assert choose([("h10", busy), ("h11", idle), ("h12", middle)], 1) == {"h11"}
    assert choose([("h10", busy), ("h11", idle), ("h12", middle)], 2) == {"h11", "h12"}
    # equal load: more free memory wins, then manifest order
    assert choose([("a", Load(1.0, 10, False)), ("b", Load(1.0, 20, False))], 1) == {"b"}
    assert choose([("a", Load(1.0, 10, False)), ("b", Load(1.0, 10, False))], 1) == {"a"}
    # where it already runs current beats an idler host: a re-apply moves nothing
    assert choose([("h10", Load(4.0, 1, True)), ("h11", idle)], 1) == {"h10"}
    # a host that could not be probed comes last
    assert choose([("x", Load(None, 0, False)), ("h10", busy)], 1) == {"h10"}


def test_least_loaded_places_count_steps(world: World, sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(3)
    names = [h.name for h in hosts]
    m = world.manifest(
        hosts,
        {
            "spread": {
                **SLEEPER,
                "on": names,
                "placement": {"strategy": "least-loaded", "count": 2},
            },
            "user": {**SLEEPER, "on": names[:1], "requires": ["spread"]},
        },
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    states = {s: e["state"] for s, e in run.final().items() if s.startswith("spread@")}
    assert sorted(states.values()) == ["ready", "ready", "unplaced"]
    (choice,) = [n for n in notices(run) if "placement of spread" in n]
    placed = sorted(s.split("@")[1] for s, state in states.items() if state == "ready")
    assert choice.startswith(f"least-loaded placement of spread: {', '.join(placed)} (of ")
    assert all(f"{n} (load " in choice for n in names)
    assert run.final()[f"user@{names[0]}"]["state"] == "ready"  # unplaced steps do not block
    assert world.status(m)[0] == 0  # 2 of 3 running is all the manifest asks
    # a re-apply keeps the program where it runs
    again = world.apply(m)
    again_states = {s: e["state"] for s, e in again.final().items() if s.startswith("spread@")}
    assert again_states == {
        s: ("unchanged" if state == "ready" else "unplaced") for s, state in states.items()
    }
    assert world.rex("stop", str(m))[0] == 0


def _placement_manifest() -> manifests.Manifest:
    return manifests.loads(
        json.dumps(
            {
                "rex": 1,
                "hosts": {f"h{i}": {"address": f"127.0.0.{i}"} for i in (1, 2, 3)},
                "users": {"app": {}},
                "programs": {
                    "db": {"on": ["h1"], "user": "app", "run": ["db"]},
                    "spread": {
                        "on": ["h1", "h2", "h3"],
                        "user": "app",
                        "run": ["spread"],
                        "placement": {"strategy": "least-loaded", "count": 2},
                    },
                },
                "authorize": ["*.*.*"],
            }
        ),
        "m.yaml",
    )


def test_place_probes_the_candidates_and_dry_run_marks_the_others_unplaced() -> None:
    from rexplan.core import plan as planner
    from rexplan.core import spec as specs
    from rexplan.engine import lifecycle

    m = _placement_manifest()
    plan = planner.compile(m)
    loads = {"h1": Load(0.9, 100, False), "h2": Load(0.1, 100, False), "h3": Load(None, 0, False)}
    probed: list[str] = []

    def probe(step: Step) -> Load:
        probed.append(step.id)
        return loads[step.host]

    (placed,) = place(m, plan.steps, probe, forks=2)
    assert sorted(probed) == ["spread@h1", "spread@h2", "spread@h3"]  # db is not a candidate
    assert placed.chosen == {"spread@h1", "spread@h2"}
    assert placed.picked() == "h1, h2" and [s.id for s in placed.unplaced()] == ["spread@h3"]
    assert placed.describe() == (
        "least-loaded placement of spread: h1, h2 (of h1 (load 0.90/cpu, 100 MB free), "
        "h2 (load 0.10/cpu, 100 MB free), h3 (no probe))"
    )
    statuses = [specs.StepStatus(s, specs.ABSENT) for s in plan.steps]
    assert lifecycle.dry_run_actions(statuses, [placed]) == [
        "started",
        "started",
        "started",
        "unplaced",
    ]
    doc = lifecycle.status_to_dict(statuses, m, actions=True, placed=[placed])
    rows = doc["steps"]
    assert isinstance(rows, list)
    assert [row["action"] for row in rows] == ["started", "started", "started", "unplaced"]
    assert doc["placements"] == [
        {
            "program": "spread",
            "chosen": ["spread@h1", "spread@h2"],
            "candidates": [
                {
                    "id": "spread@h1",
                    "host": "h1",
                    "load": 0.9,
                    "source": "loadavg",
                    "fallback": None,
                    "free_mb": 100,
                    "current": False,
                },
                {
                    "id": "spread@h2",
                    "host": "h2",
                    "load": 0.1,
                    "source": "loadavg",
                    "fallback": None,
                    "free_mb": 100,
                    "current": False,
                },
                {
                    "id": "spread@h3",
                    "host": "h3",
                    "load": None,
                    "source": None,
                    "fallback": None,
                    "free_mb": None,
                    "current": False,
                },
            ],
            "detail": placed.describe(),
        }
    ]
    # rex status keeps its document; without least-loaded programs nothing is probed
    assert "placements" not in lifecycle.status_to_dict(statuses, m)
    assert place(m, plan.steps[:1], probe, forks=2) == []


def test_dry_run_shows_least_loaded_placement_and_starts_nothing(
    world: World, sshd_hosts: Hosts
) -> None:
    hosts = sshd_hosts(3)
    names = [h.name for h in hosts]
    placement = {"strategy": "least-loaded", "count": 2}
    m = world.manifest(hosts, {"dryspread": {**SLEEPER, "on": names, "placement": placement}})
    world.distribute(m)
    code, out, err = world.rex("apply", str(m), "--dry-run", "--json")
    assert code == 0, out + err
    doc = json.loads(out)
    actions = {s["id"]: s["action"] for s in doc["steps"]}
    assert sorted(actions.values()) == ["started", "started", "unplaced"]
    (placed,) = doc["placements"]
    assert placed["chosen"] == [s for s, a in actions.items() if a == "started"]
    assert [c["host"] for c in placed["candidates"]] == names
    assert all(c["load"] is not None and not c["current"] for c in placed["candidates"])
    picked = ", ".join(s.split("@")[1] for s in placed["chosen"])
    assert placed["detail"].startswith(f"least-loaded placement of dryspread: {picked} (of ")
    code, out, _ = world.rex("apply", str(m), "--dry-run")
    assert code == 0
    header, *rows, total, line = out.splitlines()
    column = header.split().index("action")
    assert sorted(row.split()[column] for row in rows) == ["started", "started", "unplaced"]
    assert total in ("3 steps: 2 started, 1 unplaced", "3 steps: 1 unplaced, 2 started")
    assert line.startswith("least-loaded placement of dryspread: ")
    assert all(f"{n} (load " in line for n in names)
    # nothing started, nothing recorded
    assert world.tagged() == []
    assert not any(Path(world.home(n), "run", "dryspread.json").exists() for n in names)
    # once applied, the dry run keeps the program where it runs, as apply would
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    running = [s for s, e in run.final().items() if e["state"] == "ready"]
    code, out, _ = world.rex("apply", str(m), "--dry-run", "--json")
    doc = json.loads(out)
    assert {s["id"]: s["action"] for s in doc["steps"]} == {
        s: ("unchanged" if s in running else "unplaced") for s in actions
    }
    assert [c["id"] for c in doc["placements"][0]["candidates"] if c["current"]] == running
    assert world.rex("stop", str(m))[0] == 0


def _fake_host(root: Path, cgroup: str, mountinfo: str) -> None:
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text("MemTotal: 4096000 kB\nMemAvailable: 2048000 kB\n")
    (root / "proc" / "self" / "cgroup").write_text(cgroup)
    (root / "proc" / "self" / "mountinfo").write_text(mountinfo)


UNIFIED = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
HYBRID = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize(
    ("cgroup", "mountinfo", "measured"),
    [
        # the rig, and a container whose sshd runs without systemd: the login's own cgroup
        ("0::/rig/h10-0\n", HYBRID, "sys/fs/cgroup/unified/rig/h10-0"),
        ("12:cpu:/x\n0::/\n", UNIFIED, "sys/fs/cgroup"),
        # a systemd inside the container: the root of its slice tree, not the login's scope
        ("0::/user.slice/user-0.slice/session-4.scope\n", UNIFIED, "sys/fs/cgroup"),
        ("0::/ct/system.slice/ssh.service\n", UNIFIED, "sys/fs/cgroup/ct"),
        # a mount that shows only a subtree, at a path with a space
        ("0::/lxc/web/app\n", "30 23 0:26 /lxc/web /cg\\040v2 rw - cgroup2 none rw\n", "cg v2/app"),
    ],
)
def test_load_probe_finds_the_cgroup_to_measure(
    tmp_path: Path, cgroup: str, mountinfo: str, measured: str
) -> None:
    _fake_host(tmp_path, cgroup, mountinfo)
    directory, top = _measured_cgroup(str(tmp_path))
    assert directory == str(tmp_path / measured)
    assert directory.startswith(top)


@pytest.mark.parametrize(
    ("cgroup", "mountinfo", "why"),
    [
        ("1:name=systemd:/\n", HYBRID, "no cgroup v2 of this login"),
        ("0::/../elsewhere\n", UNIFIED, "no cgroup v2 of this login"),
        ("0::/other\n", "30 23 0:26 /lxc /cg rw - cgroup2 none rw\n", "no cgroup2 mount shows"),
        ("0::/\n", "22 1 0:21 / /proc rw - proc proc rw\n", "no cgroup2 mount shows"),
    ],
)
def test_load_probe_falls_back_to_the_load_average_and_says_why(
    tmp_path: Path, cgroup: str, mountinfo: str, why: str
) -> None:
    _fake_host(tmp_path, cgroup, mountinfo)
    out = load_report("cgroup", 0.0, str(tmp_path))
    assert out["source"] == "loadavg" and why in out["fallback"]
    assert out["load"] >= 0
    assert (out["cpus"], out["free_mb"]) == (os.cpu_count(), 2000)


def test_load_probe_measures_cpu_time_against_the_cgroup_limits(tmp_path: Path) -> None:
    _fake_host(tmp_path, "0::/ct/app\n", UNIFIED)
    ct = tmp_path / "sys" / "fs" / "cgroup" / "ct"
    (ct / "app").mkdir(parents=True)
    (ct / "cpu.max").write_text("max 100000\n")
    (ct / "app" / "cpu.max").write_text("50000 100000\n")  # half a CPU
    (ct / "memory.max").write_text(f"{1 << 30}\n")
    (ct / "memory.current").write_text(f"{768 << 20}\n")
    (ct / "app" / "cpu.stat").write_text("usage_usec 123456\nuser_usec 100000\n")
    out = load_report("cgroup", 0.0, str(tmp_path))
    # the fake usage_usec stands still: an idle cgroup, with 256 of its 1 GiB free
    assert out == {"load": 0.0, "cpus": 0.5, "free_mb": 256, "source": "cgroup"}
    (ct / "app" / "cpu.stat").write_text("user_usec 1\n")
    out = load_report("cgroup", 0.0, str(tmp_path))
    assert out["source"] == "loadavg" and "no usage_usec in " in out["fallback"]
    # loadavg reads no cgroup file at all
    (tmp_path / "proc" / "self" / "cgroup").unlink()
    assert load_report("loadavg", 0.0, str(tmp_path))["source"] == "loadavg"


def test_load_probe_output_becomes_a_load() -> None:
    assert parse_load('{"load": 3.0, "cpus": 2, "free_mb": 100}\n', False) == Load(1.5, 100, False)
    cgroup = 'motd\n{"load": 0.25, "cpus": 0.5, "free_mb": 512, "source": "cgroup"}\n'
    got = parse_load(cgroup, True)
    assert got == Load(0.5, 512, True, "cgroup")
    assert got.describe() == "cgroup load 0.50/cpu, 512 MB free, running"
    fell = '{"load": 1, "cpus": 4, "free_mb": 9, "source": "loadavg", "fallback": "no\\u001b[1m"}'
    got = parse_load(fell, False)
    assert got == Load(0.25, 9, False, "loadavg", "no\\x1b[1m")
    assert got.describe() == (
        "load 0.25/cpu (load average: its cgroup could not be read: no\\x1b[1m), 9 MB free"
    )
    # ranked with the others: the busy cgroup loses to the idle one
    idle = parse_load('{"load": 0.01, "cpus": 2, "free_mb": 1, "source": "cgroup"}', False)
    busy = parse_load('{"load": 1.0, "cpus": 2, "free_mb": 9, "source": "cgroup"}', False)
    assert choose([("busy", busy), ("idle", idle)], 1) == {"idle"}


@pytest.mark.parametrize(
    "output",
    [
        "",
        "Traceback (most recent call last):",
        "[1, 2]",
        '{"load": 1, "cpus": 2}',
        '{"load": -1, "cpus": 2, "free_mb": 0}',
        '{"load": 1, "cpus": 0, "free_mb": 0}',
        '{"load": NaN, "cpus": 1, "free_mb": 0}',
        '{"load": 1, "cpus": 1, "free_mb": 0, "source": "psi"}',
        '{"load": 1, "cpus": 1, "free_mb": 0, "fallback": 3}',
    ],
)
def test_unusable_load_probe_output_is_refused(output: str) -> None:
    with pytest.raises(ValueError):
        parse_load(output, False)


@pytest.mark.parametrize("args", [["loadavg", "0"], ["cgroup", "0"]])
def test_the_agent_load_mode_prints_what_parse_load_reads(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent_main(["--load", *args]) == 0
    got = parse_load(capsys.readouterr().out, False)
    assert got.per_cpu is not None and got.per_cpu >= 0


@pytest.mark.parametrize(
    "args", [["psi", "0"], ["cgroup"], ["cgroup", "soon"], ["cgroup", "nan"], ["loadavg", "61"]]
)
def test_a_bad_load_mode_is_refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(["--load", *args]) == EXIT_BAD_LAUNCH
    with pytest.raises(ValueError):
        parse_load(capsys.readouterr().out, False)


def _cgroup_loads(detail: str) -> dict[str, float]:
    """Each host's figure in a placement notice of ``load: cgroup`` hosts."""
    return {h: float(x) for h, x in re.findall(r"(\w+) \(cgroup load ([0-9.]+)/cpu", detail)}


def test_least_loaded_picks_the_idle_container(
    world: World, sshd_rig: SshdRig, tmp_path: Path
) -> None:
    """The rig's hosts share this kernel, hence one load average; as ``load: cgroup`` hosts
    each is measured by its own cgroup, and a CPU burner in one makes it the busy one."""
    reason = cgroup_unavailable_reason()
    if reason:
        pytest.skip(reason)
    hosts = sshd_rig.spawn(2, cgroup=True)
    burner: subprocess.Popen[bytes] | None = None
    m = tmp_path / "m.yaml"
    try:
        names = [h.name for h in hosts]
        placement = {"strategy": "least-loaded", "count": 1}
        world.manifest(hosts, {"pick": {**SLEEPER, "on": names, "placement": placement}})
        doc = json.loads(m.read_text())
        for name in names:
            doc["hosts"][name]["load"] = "cgroup"
        m.write_text(json.dumps(doc))
        world.distribute(m)
        burner = subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # busy first the first host (manifest order would pick it), then the other
        for busy, idle in (hosts, hosts[::-1]):
            assert busy.cgroup is not None and idle.cgroup is not None
            Path(busy.cgroup, "cgroup.procs").write_text(str(burner.pid))
            run = world.apply(m)
            assert run.code == 0, run.out + run.err
            states = {s: e["state"] for s, e in run.final().items()}
            assert states == {f"pick@{idle.name}": "ready", f"pick@{busy.name}": "unplaced"}
            (choice,) = [n for n in notices(run) if "placement of pick" in n]
            assert choice.startswith(f"least-loaded placement of pick: {idle.name} (of "), choice
            loads = _cgroup_loads(choice)
            assert loads[busy.name] > loads[idle.name], choice
            (pid,) = world.tagged(idle.name, "pick")
            where = cgroup_dir(
                Path(f"/proc/{pid}/cgroup").read_text(), Path("/proc/self/mountinfo").read_text()
            )
            assert where is not None and where.startswith(idle.cgroup + "/")
            assert world.tagged(busy.name, "pick") == []
            assert world.rex("stop", str(m))[0] == 0
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
        if world.tagged():
            world.rex("stop", str(m), "--force")
        for host in hosts:
            sshd_rig.stop(host)
