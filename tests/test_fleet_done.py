"""Issue 17's whole fleet at once: target sshds in a network namespace that cannot reach the
launcher, a bastion in front of them, every host reached through an ssh_config of aliases
(no address in the manifest), and callbacks through the SSH connection. hostkeys scan, key
distribution, apply, status, run, audit --remote and stop all work, every step verified;
a launcher SIGKILLed mid-launch leaves nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers_procs as procs
import netrig
import pytest
from helpers_world import World
from sshrig import RigHost, SshdRig

from rexplan.cli.rex import main
from rexplan.cli.rex_key import main as rex_key
from rexplan.transport import route

pytestmark = pytest.mark.skipif(
    netrig.unavailable_reason() is not None, reason=str(netrig.unavailable_reason())
)

SLEEPER = {"run": ["sleep", "300"], "ready": {"alive": 0.2}}
TIMEOUTS = {"connect": 10, "start": 10, "callback": 10, "ready": 10}


@pytest.fixture(scope="module")
def hidden(sshd_rig: SshdRig) -> Iterator[tuple[netrig.NetNs, list[RigHost]]]:
    """Two target sshds in a namespace whose hosts cannot open a connection to the launcher."""
    with netrig.hosts_in_namespace(sshd_rig, 2) as fleet:
        yield fleet


def _slow(world: World) -> list[int]:
    """The slow program's processes on either host."""
    return [
        pid
        for name in ("app1", "app2")
        for pid in procs.tagged(REXTEST=world.tag, REX_STEP=f"slow@{name}")
    ]


def _rex(world: World, known: Path, *argv: str) -> tuple[int, str, str]:
    command, *rest = argv
    code = main([command, "--keys", str(world.keys), "--known-hosts", str(known), *rest])
    out, err = world.capsys.readouterr()
    return code, out, err


def test_a_hidden_fleet_behind_a_bastion_through_ssh_config_and_ssh_callbacks(
    world: World,
    hidden: tuple[netrig.NetNs, list[RigHost]],
    fresh_sshd: Callable[..., RigHost],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, (t1, t2) = hidden
    bastion = fresh_sshd()  # on 127.0.0.x, in the launcher's namespace: it reaches the veth
    rig = world.rig
    config = tmp_path / "ssh_config"
    config.write_text(
        "".join(
            f"Host {alias}\n  HostName {h.address}\n  Port {h.port}\n  User {rig.login}\n"
            f"  IdentityFile {rig.identity}\n  IdentitiesOnly yes\n"
            + ("  ProxyJump bast\n" if alias != "bast" else "")
            for alias, h in (("bast", bastion), ("app1", t1), ("app2", t2))
        )
    )
    monkeypatch.setenv(route.ENV, str(config))  # never root's own ~/.ssh/config
    names = ["app1", "app2"]
    doc: dict[str, Any] = {
        "rex": 1,
        "defaults": {"user": world.user, "timeouts": TIMEOUTS, "stop_timeout": 1},
        "callback": {"via": "ssh"},
        "hosts": {"app1": None, "app2": None},
        "users": {world.user: None},  # login, key, address and port: all from ssh_config
        "programs": {
            "svc": {**SLEEPER, "on": names, "env": {"REXTEST": world.tag}},
            "slow": {
                "run": ["sleep", "300"],
                "ready": {"alive": 3},
                "on": names,
                "requires": ["svc"],
                "env": {"REXTEST": world.tag},
            },
            "run": {"on": names, "kind": "job", "run": ["true"]},
        },
        "authorize": ["*.*.*"],
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    world.hosts.update({"app1": t1, "app2": t2})
    world.programs.update(doc["programs"])

    # pins: an empty known_hosts, filled by scan --accept through the bastion
    known = tmp_path / "pins"
    known.write_text("")
    code = main(["hostkeys", "scan", "-m", str(path), "--known-hosts", str(known), "--accept"])
    out, err = world.capsys.readouterr()
    assert code == 0, out + err
    for h in (bastion, t1, t2):
        assert f"[{h.address}]:{h.port} {h.host_key}" in known.read_text()
    keys = ["--keys", str(world.keys)]
    assert rex_key(["create", "-m", str(path), *keys]) == 0
    assert rex_key(["distribute", "-m", str(path), *keys, "--known-hosts", str(known)]) == 0
    world.capsys.readouterr()

    events = tmp_path / "events.jsonl"
    try:
        code, out, err = _rex(world, known, "apply", str(path), "-y", "--events", str(events))
        assert code == 0, out + err
        final = {}
        for line in events.read_text().splitlines():
            event = json.loads(line)
            if event.get("kind") == "step":
                final[event["step"]] = event["state"]
        assert final == {
            **{f"{p}@{n}": "ready" for p in ("svc", "slow") for n in names},
            **{f"run@{n}": "ready" for n in names},
        }, final
        code, out, _ = _rex(world, known, "status", str(path), "--json")
        steps = {s["id"]: s["status"] for s in json.loads(out)["steps"]}
        assert {steps[f"{p}@{n}"] for p in ("svc", "slow") for n in names} == {"running"}
        code, out, err = _rex(world, known, "run", "*", "-m", str(path), "--json", "--", "true")
        assert code == 0, out + err
        assert [h["host"] for h in json.loads(out)["hosts"]] == names
        code, out, err = _rex(world, known, "audit", str(path), "--remote")
        assert code == 0, out + err
        code, out, err = _rex(world, known, "stop", str(path))
        assert code == 0, out + err
        assert procs.wait_until(lambda: world.tagged() == [], 10)

        # a launcher SIGKILLed while the slow probes run: its forwards went with its SSH
        # connections, the agents cannot call back, and they end their programs
        boot = "import sys; from rexplan.cli.rex import main; sys.exit(main())"
        argv = ["apply", "--keys", str(world.keys), "--known-hosts", str(known), str(path), "-y"]
        proc = subprocess.Popen(
            [sys.executable, "-c", boot, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, route.ENV: str(config)},
        )
        try:
            assert procs.wait_until(lambda: _slow(world) != [], 30)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert procs.wait_until(lambda: _slow(world) == [], 20)
    finally:
        _rex(world, known, "stop", str(path))
