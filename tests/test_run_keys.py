"""`rex run` keys (issue 20, item 2): ``rex_key create -m M --run`` makes the authorized
``host.user.run`` keys, and ``rex_key distribute -m M`` copies every local key whose triple the
manifest authorizes, not only the keys of its steps; then ``rex run`` works on every host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_world import SLEEPER, Hosts, World, nothing_left

from rexplan.cli.rex_key import main as rex_key


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


def _key(world: World, *argv: str) -> tuple[int, str]:
    code = rex_key([*argv, "--keys", str(world.keys)])
    out, err = world.capsys.readouterr()
    return code, out + err


def test_create_run_keys_distribute_and_rex_run_on_three_hosts(
    world: World, sshd_hosts: Hosts
) -> None:
    hosts = sshd_hosts(3)
    names = [h.name for h in hosts]
    m = world.manifest(hosts, {"svc": {"on": names[:1], **SLEEPER}})
    code, out = _key(world, "create", "-m", str(m), "--run")
    assert code == 0, out
    for name in names:
        assert f"created {name}.{world.user}.run " in out
    assert f".{world.user}.svc" not in out  # --run alone: only the run keys
    assert out.rstrip().endswith("3 keys: 3 created, 0 rotated, 0 kept")
    # distribute copies them though no step of the manifest is a `run` step, nor on 2 of them
    known = ["--known-hosts", world.rig.known_hosts]
    code, out = _key(world, "create", "-m", str(m))
    assert code == 0, out
    code, out = _key(world, "distribute", "-m", str(m), *known)
    assert code == 0, out
    assert "4 changed" in out, out
    for host in hosts:
        home = Path(world.home(host.name))
        assert (home / "keys" / host.name / world.user / "run.key").stat().st_mode & 0o777 == 0o600
    code, out = _key(world, "distribute", "-m", str(m), *known)
    assert code == 0 and "0 changed, 4 unchanged" in out, out
    code, out, err = world.rex("run", "*", "-m", str(m), "--", "sh", "-c", "echo hi")
    assert code == 0, out + err
    assert out == f"----------------\n{','.join(names)}\n----------------\nhi\n"


def test_a_run_key_made_by_hand_is_distributed_when_authorized(
    world: World, sshd_hosts: Hosts
) -> None:
    """The issue's report: `rex_key create h1.ops.run` then distribute said 0 changed."""
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"svc": {"on": [host.name], **SLEEPER}})
    triple = f"{host.name}.{world.user}.run"
    other = f"{host.name}.{world.user}.elsewhere"
    for made in (triple, other):
        assert _key(world, "create", made)[0] == 0
    assert _key(world, "create", "-m", str(m))[0] == 0
    m.write_text(m.read_text().replace('"*.*.*"', '"*.*.svc", "*.*.run"'))
    code, out = _key(world, "distribute", "-m", str(m), "--known-hosts", world.rig.known_hosts)
    assert code == 0, out
    assert triple in out and other not in out  # only what the manifest authorizes
    keys = Path(world.home(host.name)) / "keys" / host.name / world.user
    assert (keys / "run.key").exists() and not (keys / "elsewhere.key").exists()
    code, out, err = world.rex("run", "*", "-m", str(m), "--", "true")
    assert code == 0, out + err


def test_create_run_needs_an_authorized_run_triple(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"svc": {"on": [host.name], **SLEEPER}})
    m.write_text(m.read_text().replace('"*.*.*"', '"*.*.svc"'))
    code, out = _key(world, "create", "-m", str(m), "--run")
    assert code == 5 and "authorizes no host.user.run triple" in out, out
    assert _key(world, "create", "--run")[0] == 5
