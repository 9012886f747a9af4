"""Callbacks through the SSH connection (``callback: {via: ssh}``, issue 17 part 3), on the
fleet-like rig (tests/netrig.py): host sshds in a network namespace whose hosts cannot open a
connection to the launcher, reached from it over a veth."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import helpers_procs as procs
import netrig
import pytest
from helpers_world import SLEEPER, World
from sshrig import RigHost, SshdRig

from rexplan.core.manifest import loads
from rexplan.engine.fanout import TreeLauncher
from rexplan.errors import UsageError
from rexplan.transport import persist_wire
from rexplan.transport.pool import TransportPool
from rexplan.transport.ssh import SSHTransport

pytestmark = pytest.mark.skipif(
    netrig.unavailable_reason() is not None, reason=str(netrig.unavailable_reason())
)

#: a short callback deadline: a direct callback from the namespace cannot succeed
FAST = {"timeouts": {"connect": 5, "start": 5, "callback": 3, "ready": 3}}


@pytest.fixture(scope="module")
def fleet(sshd_rig: SshdRig) -> Iterator[tuple[netrig.NetNs, list[RigHost]]]:
    """Two sshds in a namespace of this module's; stopped, and the namespace deleted, after."""
    with netrig.hosts_in_namespace(sshd_rig, 2) as fleet:
        yield fleet


def manifest(world: World, hosts: list[RigHost], how: str, **programs: Any) -> Path:
    names = [h.name for h in hosts]
    specs = programs or {"svc": {**SLEEPER, "on": names}}
    # the run job: its keys (host.user.run) for rex run
    specs = {"run": {"on": names, "kind": "job", "run": ["true"]}, **specs}
    path = world.manifest(hosts, specs, defaults=FAST)
    doc: dict[str, Any] = json.loads(path.read_text())
    doc["callback"] = {"via": how}
    path.write_text(json.dumps(doc))
    return path


def test_the_namespace_hosts_cannot_reach_the_launcher(
    fleet: tuple[netrig.NetNs, list[RigHost]],
) -> None:
    ns, _ = fleet
    probe = f"import socket; socket.create_connection(('{ns.launcher}', 22), timeout=1)"
    out = subprocess.run(
        [*ns.prefix(), sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert out.returncode != 0 and "timed out" in out.stderr


def test_direct_fails_naming_the_address_dialled_and_suggests_via_ssh(
    world: World, fleet: tuple[netrig.NetNs, list[RigHost]]
) -> None:
    ns, hosts = fleet
    m = manifest(world, hosts, "direct")
    world.distribute(m)
    run = world.apply(m, "--limit", hosts[0].name)
    step = run.final()[f"svc@{hosts[0].name}"]
    assert run.code != 0 and step["state"] == "failed", run.out + run.err
    assert step["reason"] == "no_callback"
    assert f"the agent dialled {ns.launcher}:" in step["detail"]
    assert "callback: {via: ssh}" in step["detail"]
    # the world fixture fails the test if anything it started still runs
    assert procs.wait_until(lambda: world.tagged() == [], 10)


def test_via_ssh_verifies_every_step_and_rex_stop_stops_them(
    world: World, fleet: tuple[netrig.NetNs, list[RigHost]]
) -> None:
    _, hosts = fleet
    m = manifest(world, hosts, "ssh")
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    assert run.actions() == {f"{p}@{h.name}": "started" for h in hosts for p in ("svc", "run")}
    assert len(world.tagged()) == 2
    _, steps = world.status(m)
    assert {steps[f"svc@{h.name}"]["status"] for h in hosts} == {"running"}
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert procs.wait_until(lambda: world.tagged() == [], 10)


def test_via_ssh_rex_run_and_a_job(world: World, fleet: tuple[netrig.NetNs, list[RigHost]]) -> None:
    _, hosts = fleet
    names = [h.name for h in hosts]
    job = {"on": names, "kind": "job", "shell": "sleep 0.5; echo done $REX_TRIPLE"}
    m = manifest(world, hosts, "ssh", migrate=job)
    world.distribute(m)
    run = world.apply(m, "--limit", names[0])
    final = run.final()[f"migrate@{names[0]}"]
    assert run.code == 0 and final["status"] == 0, run.out + run.err
    assert final["output"] == f"done {names[0]}.{world.user}.migrate\n"
    code, out, err = world.rex("run", "*", "-m", str(m), "--", "sh", "-c", "echo hi")
    assert code == 0, out + err
    assert out == f"----------------\n{','.join(names)}\n----------------\nhi\n"


def test_via_ssh_through_the_persistence_daemon(
    world: World, fleet: tuple[netrig.NetNs, list[RigHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, hosts = fleet
    base = Path(tempfile.mkdtemp(prefix="rexmux-", dir="/tmp"))
    monkeypatch.setenv(persist_wire.MUX_ENV, str(base / "mux"))
    m = manifest(world, hosts, "ssh")
    world.distribute(m)
    try:
        run = world.apply(m, "--persist", "30")
        assert run.code == 0, run.out + run.err
        assert {s: a for s, a in run.actions().items() if s.startswith("svc@")} == {
            f"svc@{h.name}": "started" for h in hosts
        }
        # the next run on the kept connections opens a forward again: the job runs again
        again = world.apply(m, "--persist", "30")
        assert again.code == 0, again.out + again.err
        assert again.actions() == {
            f"{p}@{h.name}": "started" if p == "run" else "unchanged"
            for h in hosts
            for p in ("svc", "run")
        }
        assert world.rex("stop", str(m), "--persist", "30")[0] == 0
    finally:
        pid_file = base / "mux" / persist_wire.PID_FILE
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            assert procs.wait_until(lambda: not procs.alive(pid), 10)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def launcher(world: World, *argv: str) -> subprocess.Popen[bytes]:
    """``rex ARGV`` in a process of its own, to be killed."""
    boot = "import sys; from rexplan.cli.rex import main; sys.exit(main())"
    command, *rest = argv
    options = ["--keys", str(world.keys), "--known-hosts", world.rig.known_hosts]
    return subprocess.Popen(
        [sys.executable, "-c", boot, command, *options, *rest],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_launcher_sigkill_before_the_callback_leaves_nothing_running(
    world: World, fleet: tuple[netrig.NetNs, list[RigHost]]
) -> None:
    """Killed while its agents probe their programs: the forward went with the SSH
    connection, so they cannot call back, and stop their programs."""
    _, hosts = fleet
    slow = {"run": ["sleep", "300"], "ready": {"alive": 2}, "on": [h.name for h in hosts]}
    m = manifest(world, hosts, "ssh", svc=slow)
    world.distribute(m)
    proc = launcher(world, "apply", str(m), "-y")
    try:
        assert procs.wait_until(lambda: len(world.tagged()) >= 2, 20)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert procs.wait_until(lambda: world.tagged() == [], 20)


def test_launcher_sigkill_under_via_ssh_leaves_nothing_running(
    world: World, fleet: tuple[netrig.NetNs, list[RigHost]]
) -> None:
    _, hosts = fleet
    host = hosts[0]
    m = manifest(world, hosts, "ssh")
    world.distribute(m)
    triple = f"{host.name}.{world.user}.run"
    proc = launcher(world, "run", host.name, "-m", str(m), "--", "sleep", "300")
    try:
        assert procs.wait_until(lambda: procs.tagged(REX_TRIPLE=triple) != [], 20)
        (job,) = procs.tagged(REX_TRIPLE=triple)
        agent = world.record(host.name, "run")["agent"]
        assert procs.alive(job) and procs.alive(agent)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the forward went with the launcher's SSH connection, and the job's callback connection
    # through it: the agent kills its job
    assert procs.wait_until(lambda: not procs.alive(job), 10)
    assert procs.wait_until(lambda: not procs.alive(agent), 10)


def test_via_is_set_per_host_and_refused_where_it_cannot_work() -> None:
    m = loads(
        "rex: 1\ncallback: {via: ssh}\nhosts:\n  a: {address: 10.0.0.1}\n"
        "  b: {address: 10.0.0.2, callback: {via: direct}}\n"
        "users: {u: {}}\nprograms: {p: {run: [x], on: [a, b], user: u}}\n"
        "authorize: ['*.*.*']\n"
    )
    assert [(h.name, h.callback) for h in m.hosts] == [("a", "ssh"), ("b", "direct")]
    with pytest.raises(Exception) as err:
        loads(
            "rex: 1\ndefaults: {strategy: tree, relay_identity: ~/.ssh/k}\n"
            "hosts:\n  a: {address: 10.0.0.1, callback: {via: ssh}}\n"
            "  b: {transport: local, callback: {via: ssh}}\n"
            "users: {u: {}}\nprograms: {p: {run: [x], on: [a], user: u}}\n"
            "authorize: ['*.*.*']\n"
        )
    text = str(err.value)
    # rex apply --strategy tree of a flat manifest: refused before any host is contacted
    flat = loads(
        "rex: 1\ndefaults: {relay_identity: ~/.ssh/k}\ncallback: {via: ssh}\n"
        "hosts: {a: {address: 10.0.0.1}}\n"
        "users: {u: {}}\nprograms: {p: {run: [x], on: [a], user: u}}\nauthorize: ['*.*.*']\n"
    )
    with pytest.raises(UsageError, match="strategy tree: host a: callback via ssh cannot"):
        TreeLauncher(flat, (), cast(TransportPool, None), None, 4)
    assert "<string>:4:42: hosts.a.callback.via: callback via ssh cannot be used with" in text
    assert "<string>:5:41: hosts.b.callback.via: a transport: local host has no SSH" in text


def test_forwards_of_one_connection_outlive_each_other(sshd_hosts: Any) -> None:
    """The daemon holds many runs' forwards on one connection: cancelling one leaves the
    others working (paramiko's cancel_port_forward would drop their shared handler)."""
    (host,) = sshd_hosts(1)
    t = SSHTransport.open(host.model_host(), host.model_user(), known_hosts=host.known_hosts)
    got: list[tuple[str, int]] = []

    def echo(sock: socket.socket, peer: tuple[str, int]) -> None:
        got.append(peer)
        with sock:
            sock.sendall(sock.recv(16).upper())

    try:
        first = t.open_forward(lambda sock, _peer: sock.close())
        second = t.open_forward(
            lambda sock, peer: threading.Thread(target=echo, args=(sock, peer)).start()
        )
        t.close_forward(first)
        dial = (
            "import socket,sys; s=socket.create_connection(('127.0.0.1',int(sys.argv[1])),5); "
            "s.sendall(b'hi'); print(s.recv(16).decode())"
        )
        res = t.run(["python3", "-c", dial, str(second)], timeout=20)
        assert res.stdout == b"HI\n", res.stderr
        assert got and got[0][0] == f"ssh:{host.name}"
        gone = t.run(["python3", "-c", dial, str(first)], timeout=20)
        assert gone.exit_status != 0 and b"Connection refused" in gone.stderr
    finally:
        t.close()


def test_an_sshd_that_refuses_forwarding_fails_the_step_saying_why(
    world: World, sshd_rig: SshdRig
) -> None:
    (host,) = sshd_rig.spawn(options=["AllowTcpForwarding local"])
    try:
        m = manifest(world, [host], "ssh")
        world.distribute(m)
        run = world.apply(m)
        step = run.final()[f"svc@{host.name}"]
        assert run.code != 0 and step["state"] == "failed"
        assert step["reason"] == "no_callback" and step["phase"] == "start"
        assert "sshd refused a remote port forward" in step["detail"]
        assert "AllowTcpForwarding yes" in step["detail"]
        assert world.tagged() == []
    finally:
        sshd_rig.stop(host)
