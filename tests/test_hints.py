"""Issue 19: every setup error of rex apply says what to run next, with the manifest path the
run was given (over real sshd)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from helpers_world import Hosts, World, free_port

from rexplan.cli.rex_key import main as rex_key


def _hint(world: World, run_err: str, event: dict[str, object]) -> str:
    hint = event.get("hint")
    assert isinstance(hint, str), event
    assert f"    hint: {hint}" in run_err  # shown under the FAILED line
    return hint


def test_host_key_hints(world: World, sshd_hosts: Hosts) -> None:
    h1, h2 = sshd_hosts(2)
    m = world.manifest([h1, h2], {"app": {"on": [h1.name, h2.name], "run": ["true"]}})
    world.distribute(m)
    # h1 not pinned at all; h2 pinned with h1's key: changed
    known = world.tmp / "pins" / "known_hosts"
    known.parent.mkdir(mode=0o700)
    known.write_text(f"[{h2.address}]:{h2.port} {h1.host_key}\n")
    os.chmod(known, 0o600)
    run = world.apply(m, "--json", "--known-hosts", str(known))
    assert run.code == 6, run.err
    final = run.final()
    q = shlex.quote(str(m))
    unknown = _hint(world, run.err, final[f"app@{h1.name}"])
    assert unknown == f"check the fingerprint, then pin it: rex hostkeys scan -m {q} --accept"
    changed = _hint(world, run.err, final[f"app@{h2.name}"])
    assert f"rex hostkeys verify -m {q}" in changed
    assert f"rex hostkeys scan -m {q} --replace {h2.name}" in changed
    steps = {s["id"]: s for s in json.loads(run.out)["steps"]}
    assert steps[f"app@{h2.name}"]["hint"] == changed


def test_key_and_daemon_hints(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    programs = {
        # no key anywhere
        "nolocal": {"on": [h], "run": ["sleep", "300"]},
        # a key here, none on the host
        "noremote": {"on": [h], "run": ["sleep", "300"]},
        # exits 0 before its port opens: it daemonized
        "forks": {"on": [h], "shell": "exit 0", "ready": {"tcp": free_port()}},
    }
    only = world.manifest([host], {"forks": programs["forks"]}, name="forks.yaml")
    world.distribute(only)
    m = world.manifest([host], programs)
    code = rex_key(["create", f"{h}.{world.user}.noremote", "--keys", str(world.keys)])
    assert code == 0
    world.capsys.readouterr()
    run = world.apply(m)
    assert run.code == 6, run.out  # a missing key is exit 6
    final = run.final()
    q = shlex.quote(str(m))
    nolocal = _hint(world, run.out, final[f"nolocal@{h}"])
    assert nolocal == f"create one with 'rex_key create {h}.{world.user}.nolocal'"
    noremote = _hint(world, run.out, final[f"noremote@{h}"])
    assert final[f"noremote@{h}"]["reason"] == "no_key"
    assert noremote == f"put the key on the host: rex_key distribute -m {q}"
    forks = _hint(world, run.out, final[f"forks@{h}"])
    assert "exited 0 before it was ready" in forks and "daemon off;" in forks
    assert "--nodaemon" in forks and "foreground" in forks
    # each shown again after the summary
    for hint in (nolocal, noremote, forks):
        assert run.out.count(f"    hint: {hint}") == 2


def test_callback_hint_names_the_address_dialled(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    port = free_port()
    m = world.manifest(
        [host],
        {"app": {"on": [h], "run": ["sleep", "300"]}},
        defaults={"timeouts": {"connect": 5, "start": 5, "callback": 2, "ready": 3}},
    )
    doc = json.loads(m.read_text())
    # the listener is on 127.0.0.1; the agent is told to dial 127.0.0.3, where nothing listens
    doc["callback"] = {"bind": "127.0.0.1", "port": port, "advertise": "127.0.0.3"}
    Path(m).write_text(json.dumps(doc))
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 2, run.out
    event = run.only()
    assert event["reason"] == "no_callback"
    hint = _hint(world, run.out, event)
    assert f"dialled 127.0.0.3:{port}" in hint
    assert "callback.advertise / callback.via" in hint and shlex.quote(str(m)) in hint


def test_unreachable_host_hint(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    m = world.manifest([host], {"app": {"on": [h], "run": ["sleep", "300"]}})
    world.distribute(m)
    doc = json.loads(m.read_text())
    doc["hosts"][h]["port"] = free_port()  # nothing listens there
    m.write_text(json.dumps(doc))
    run = world.apply(m)
    assert run.code == 3, run.out
    event = run.only()
    assert event["state"] == "unreachable"
    assert _hint(world, run.out, event) == f"check hosts.{h}.address/port and that sshd runs there"
