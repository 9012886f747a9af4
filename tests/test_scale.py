"""Scale in CI: `rex apply` and `rex stop` on 128 loopback hosts, as a test of correctness."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import helpers_procs as procs
import pytest
from helpers_world import SLEEPER, World
from sshrig import RigHost, SshdRig

HOSTS = 128


@contextlib.contextmanager
def own_hosts(rig: SshdRig, count: int) -> Iterator[list[RigHost]]:
    """``count`` hosts of the test's own, stopped afterwards. Not the shared ones: the rig keeps
    those for the session, and the no-orphans oracle after every later sshd test walks each rig
    sshd's process tree (with 128 more, seconds per test)."""
    hosts = rig.spawn(count)
    try:
        yield hosts
    finally:
        for host in hosts:
            rig.stop(host)


@pytest.fixture
def hosts(sshd_rig: SshdRig) -> Iterator[list[RigHost]]:
    with own_hosts(sshd_rig, HOSTS) as spawned:
        yield spawned


# hosts before world: the world's teardown (`rex stop` of any leftover) still finds them up
def test_apply_and_stop_on_128_hosts(hosts: list[RigHost], world: World) -> None:
    m = world.manifest(hosts, {"wide": {"on": [h.name for h in hosts], **SLEEPER}})
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    final = run.final()
    assert set(final) == {f"wide@{h.name}" for h in hosts}
    bad = {s: e for s, e in final.items() if e["state"] != "ready" or e["action"] != "started"}
    assert not bad, bad
    # every step verified by its own program: one live, tagged process per host
    pids = run.pids()
    assert len(set(pids.values())) == HOSTS
    assert sorted(world.tagged()) == sorted(pids.values())
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    left = procs.tagged(REXTEST=world.tag) + procs.tagged(REX_RUN=run.id)
    assert left == [], procs.describe(left)
