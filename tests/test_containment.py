"""Process containment: the launch watchdog that ends a program whose agent died before `ok`, and
the program's own cgroup that lets `rex stop` end what left both its group and its rex tags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers_procs as procs
import pytest
from helpers_world import World
from sshrig import RigHost, SshdRig, cgroup_unavailable_reason

from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import PendingStep
from rexplan.remote.agent.cgroup import _recorded_cgroup, cgroup_dir
from rexplan.transport import shipping
from rexplan.wire import keyfile
from rexplan.wire.launch import make_launch

PY = sys.executable
TRIPLE = "h1.alice.app"
STEP = "app@h1"
DEADLINES = {"start": 3.0, "ready": 10.0, "callback": 3.0, "stop": 0.5}


# ---- where the agent finds its cgroup (pure) ----------------------------------------------------

HYBRID = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
UNIFIED = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
#: a container's view: the mount shows the hierarchy from /lxc/c1 down
CONTAINER = "88 70 0:26 /lxc/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize(
    ("cgroups", "mountinfo", "expected"),
    [
        ("4:memory:/x\n0::/rexrig/h10-0\n", HYBRID, "/sys/fs/cgroup/unified/rexrig/h10-0"),
        ("0::/\n", HYBRID, "/sys/fs/cgroup/unified"),
        ("0::/user.slice/u.service\n", UNIFIED, "/sys/fs/cgroup/user.slice/u.service"),
        ("0::/lxc/c1/app\n", CONTAINER, "/sys/fs/cgroup/app"),
        ("0::/lxc/c2\n", CONTAINER, None),  # not below what the mount shows
        ("0::/../other\n", UNIFIED, None),  # outside the cgroup namespace
        ("1:name=systemd:/\n", HYBRID, None),  # cgroup v1 only
        ("0::/a\n", HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs"), None),
        ("0::/a b\n", UNIFIED.replace("/sys/fs/cgroup", "/mnt/c\\040g"), "/mnt/c g/a b"),
    ],
)
def test_cgroup_dir(cgroups: str, mountinfo: str, expected: str | None) -> None:
    assert cgroup_dir(cgroups, mountinfo) == expected


# ---- the launch watchdog (agent run here, as this user) -----------------------------------------


def stat_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def children(pid: int) -> list[int]:
    return [p for p in procs.pids() if (s := stat_of(p)) and s[0] != "Z" and int(s[1]) == pid]


def tagged(run: str) -> list[int]:
    return procs.tagged(REX_RUN=run)


@dataclass
class Local:
    """A REX_HOME with a key, a listener and the bundle: launches the agent directly."""

    home: Path
    bundle: Path
    lis: CallbackListener
    secret: bytes
    fronts: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def front(self, argv: list[str], ready: dict[str, Any]) -> subprocess.Popen[bytes]:
        step = PendingStep.create(STEP, TRIPLE, self.secret, 30)
        self.lis.expect(step)
        line = make_launch(
            run=self.lis.run_id,
            step=step.step_id,
            triple=TRIPLE,
            key_path="h1/alice/app.key",
            nl=step.nl,
            callback=self.lis.address,
            deadlines=DEADLINES,
            argv=argv,
            cwd=str(self.home),
            ready=ready,
            log="app",
        )
        env = {"REX_HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = subprocess.Popen(
            [PY, "-I", "-S", str(self.bundle)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdin is not None
        proc.stdin.write(line)
        proc.stdin.close()
        self.fronts.append(proc)
        return proc


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    secret = os.urandom(32)
    key = home / "keys" / "h1" / "alice" / "app.key"
    key.parent.mkdir(mode=0o700, parents=True)
    key.write_bytes(keyfile.format_key_file(TRIPLE, "2026-01-01", secret))
    key.chmod(0o600)
    bundle = tmp_path / "agent.py"
    bundle.write_bytes(shipping.bundle())
    with CallbackListener(handshake_timeout=2) as lis:
        loc = Local(home, bundle, lis, secret)
        yield loc
        for front in loc.fronts:
            if front.poll() is None:
                front.kill()
            front.wait()
            assert front.stdout is not None
            front.stdout.close()
        left = tagged(lis.run_id)
        procs.kill(left)
        assert left == [], f"processes of the run left behind: {procs.describe(left)}"


def watchdog_of(supervisor: int, program: int) -> int:
    """The supervisor's other child: the watchdog, in a session of its own."""
    (watchdog,) = [p for p in children(supervisor) if p != program]
    return watchdog


def test_watchdog_holds_only_its_pipe_and_goes_at_ok(local: Local) -> None:
    flag = local.home / "ready-flag"
    front = local.front(["sleep", "300"], {"kind": "file", "path": str(flag), "interval": 0.05})
    assert procs.wait_until(lambda: bool(tagged(local.lis.run_id)), 10)
    (program,) = tagged(local.lis.run_id)
    supervisor = int(stat_of(program)[1])
    watchdog = watchdog_of(supervisor, program)
    assert int(stat_of(watchdog)[3]) == watchdog  # its own session: a group kill misses it
    fds = {
        int(fd): os.readlink(f"/proc/{watchdog}/fd/{fd}")
        for fd in os.listdir(f"/proc/{watchdog}/fd")
    }
    assert [fds.pop(fd) for fd in (0, 1, 2)] == [os.devnull] * 3
    assert [target.startswith("pipe:") for target in fds.values()] == [True], fds
    flag.touch()
    front.wait(timeout=15)
    assert front.stdout is not None
    out = front.stdout.read()
    assert json.loads(out)["ok"] is True, out
    assert procs.wait_until(lambda: not procs.alive(watchdog), 5)
    assert children(supervisor) == [program]  # reaped, not a zombie
    # after ok the program outlives its supervisor: nothing else watches it
    os.kill(supervisor, signal.SIGKILL)
    assert procs.wait_until(lambda: not procs.alive(supervisor), 5)
    assert not procs.wait_until(lambda: not procs.alive(program), DEADLINES["stop"] + 1.5)
    procs.kill([program])


def test_sigterm_to_the_supervisor_as_ok_arrives_stops_the_program(local: Local) -> None:
    """Once verified, SIGTERM is a stop request (recorded ``stopped``), even before the
    supervisor has reported ``ok`` and reaped its watchdog: never a supervisor gone and its
    program left running."""
    front = local.front(["sleep", "300"], {"kind": "alive", "settle": 0.05})
    front.wait(timeout=15)
    assert front.stdout is not None
    report = json.loads(front.stdout.read())
    assert report["ok"] is True, report
    os.kill(report["agent"], signal.SIGTERM)
    assert procs.wait_until(lambda: not procs.alive(report["pid"]), 5)
    assert procs.wait_until(lambda: not procs.alive(report["agent"]), 5)
    record = json.loads((local.home / "run" / "app.json").read_text())
    assert record["state"] == "stopped", record


def test_front_and_supervisor_sigkilled_before_ok_the_watchdog_ends_the_group(
    local: Local,
) -> None:
    never = {"kind": "file", "path": str(local.home / "never"), "interval": 0.05}
    front = local.front(["sh", "-c", "sleep 300 & sleep 300"], never)
    assert procs.wait_until(lambda: len(tagged(local.lis.run_id)) >= 2, 10)
    program = min(tagged(local.lis.run_id))
    supervisor = int(stat_of(program)[1])
    watchdog = watchdog_of(supervisor, program)
    for pid in (front.pid, supervisor):
        os.kill(pid, signal.SIGKILL)
    front.wait(timeout=10)
    # the ready deadline (10 s) is far off: only the watchdog can have ended them
    assert procs.wait_until(lambda: not tagged(local.lis.run_id), DEADLINES["stop"] + 4)
    assert procs.wait_until(lambda: not procs.alive(watchdog), 5)


# ---- the program's cgroup (real sshd) -----------------------------------------------------------

#: the program double-forks a daemon that clears its environment (no rex tag) and calls setsid
#: (not in the program's group); the daemon writes its pid to {pidfile}
ESCAPEE = (
    "( setsid env -i /bin/sh -c 'echo $$ > {pidfile}; exec /bin/sleep 300' & ) ; exec sleep 300"
)


@pytest.fixture
def delegated(sshd_rig: SshdRig) -> Iterator[RigHost]:
    """A dedicated sshd in a cgroup v2 delegated to the rig's account (skipped where the
    cgroup v2 hierarchy is not writable)."""
    reason = cgroup_unavailable_reason()
    if reason:
        pytest.skip(reason)
    (host,) = sshd_rig.spawn(cgroup=True)
    yield host
    sshd_rig.stop(host)


class Escapee:
    """The daemon of an ESCAPEE program on one host: found by its pid file, killed by pid."""

    def __init__(self, pidfile: Path) -> None:
        self.pidfile = pidfile
        self.pid = 0

    def spec(self, **more: Any) -> dict[str, Any]:
        return {"shell": ESCAPEE.format(pidfile=self.pidfile), **more}

    def find(self) -> int:
        def written() -> bool:  # the shell's echo may be half done
            return self.pidfile.exists() and self.pidfile.read_text().endswith("\n")

        assert procs.wait_until(written, 5)
        self.pid = int(self.pidfile.read_text())
        return self.pid

    def close(self) -> None:
        if self.pid:
            procs.kill([self.pid])
        self.pidfile.unlink(missing_ok=True)


@pytest.fixture
def escapee(world: World) -> Iterator[Callable[[RigHost], Escapee]]:
    """``escapee(host)``: an Escapee whose pid file is in the host's REX_HOME."""
    made: list[Escapee] = []

    def make(host: RigHost) -> Escapee:
        made.append(Escapee(Path(host.state_dir_for(world.rig.login), f"esc-{world.tag}.pid")))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.fixture
def shared(sshd_rig: SshdRig) -> RigHost:
    return sshd_rig.hosts(1)[0]


def cgroup_of(pid: int) -> str | None:
    return cgroup_dir(
        Path(f"/proc/{pid}/cgroup").read_text(), Path("/proc/self/mountinfo").read_text()
    )


def launch(world: World, host: RigHost, spec: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    manifest = world.manifest([host], {"esc": {"on": [host.name], **spec}})
    world.distribute(manifest)
    run = world.apply(manifest)
    assert run.code == 0, run.out + run.err
    return manifest, world.record(host.name, "esc")


@pytest.mark.parametrize("force", [True, False], ids=["force", "grace"])
def test_stop_ends_what_left_group_and_tags_through_the_cgroup(
    world: World, delegated: RigHost, escapee: Callable[[RigHost], Escapee], force: bool
) -> None:
    daemon = escapee(delegated)
    manifest, record = launch(world, delegated, daemon.spec(ready={"alive": 0.3}))
    cgroup = record["cgroup"]
    assert os.path.dirname(cgroup) == delegated.cgroup
    triple = world.triple(delegated.name, "esc")  # the cgroup is named by the triple
    assert os.path.basename(cgroup).startswith(f"rex-{triple}-{record['run'][:8]}-")
    pid = daemon.find()
    assert cgroup_of(pid) == cgroup == cgroup_of(record["pid"])
    # neither the program's group nor a rex tag (REX_TRIPLE, REXTEST) finds it
    assert not [k for k in procs.environ(pid) if k.startswith("REX")]
    assert os.getsid(pid) == pid != record["pgid"]
    # a damaged record cannot aim a stop at another cgroup, such as the one sshd runs in
    assert _recorded_cgroup(record, triple) == cgroup
    for other in (str(delegated.cgroup), f"{cgroup}/..", f"/tmp/rex-{triple}-x"):
        assert _recorded_cgroup({**record, "cgroup": other}, triple) is None
    assert _recorded_cgroup(record, "other") is None
    code, out, err = world.rex("stop", str(manifest), *(["--force"] if force else []))
    assert code == 0, out + err
    assert procs.wait_until(lambda: not procs.alive(pid), 5)
    assert not os.path.exists(cgroup)
    assert world.record(delegated.name, "esc")["state"] == "stopped"


def test_without_a_delegated_cgroup_the_escapee_survives_force_stop(
    world: World, shared: RigHost, escapee: Callable[[RigHost], Escapee]
) -> None:
    """The known limit where the host offers no cgroup: only the group and the tag are found."""
    daemon = escapee(shared)
    manifest, record = launch(world, shared, daemon.spec(ready={"alive": 0.3}))
    assert "cgroup" not in record
    pid = daemon.find()
    code, out, err = world.rex("stop", str(manifest), "--force")
    assert code == 0, out + err
    assert not procs.alive(record["pid"])
    assert procs.alive(pid)  # the fixture kills it by its pid


def test_a_launch_failing_before_ok_ends_its_cgroup(
    world: World, delegated: RigHost, escapee: Callable[[RigHost], Escapee]
) -> None:
    daemon = escapee(delegated)
    never = {"file": str(Path(delegated.state_dir_for(world.rig.login), "never")), "timeout": 1}
    spec = {"on": [delegated.name], **daemon.spec(ready=never)}
    manifest = world.manifest([delegated], {"esc": spec})
    world.distribute(manifest)
    run = world.apply(manifest)
    assert run.code == 2, run.out + run.err
    pid = daemon.find()
    assert procs.wait_until(lambda: not procs.alive(pid), 5)
    record = world.record(delegated.name, "esc")
    assert record["state"] == "failed" and "cgroup" not in record
    assert [p for p in Path(str(delegated.cgroup)).iterdir() if p.name.startswith("rex-")] == []


def test_a_program_that_ends_leaves_no_cgroup(world: World, delegated: RigHost) -> None:
    _, record = launch(world, delegated, {"run": ["sleep", "1.5"], "ready": {"alive": 0.2}})
    assert os.path.isdir(record["cgroup"])
    assert procs.wait_until(lambda: not os.path.exists(record["cgroup"]), 5)
    assert world.record(delegated.name, "esc")["state"] == "exited"
