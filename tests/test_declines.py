"""Declines (issue 20, item 5): a host that refuses a step by its ``when`` preconditions ends
that step ``declined``, which is not a failure: the run exits 0 if nothing else failed, leaves
no retry entry for it, and its dependents go on without that host. ``when: {required: true}``
makes the decline a failure, as it was before."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers_world import SLEEPER, Hosts, World, nothing_left

from rexplan.engine import retry


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


def _programs(h: str, required: bool) -> dict[str, Any]:
    when: dict[str, Any] = {"min_free_mb": 10**12}
    if required:
        when["required"] = True
    return {
        "hungry": {**SLEEPER, "on": [h], "when": when},
        "after": {**SLEEPER, "on": [h], "requires": ["hungry"]},
    }


def test_a_decline_is_not_a_failure_and_dependents_go_on(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    m = world.manifest([host], _programs(h, required=False))
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    final = run.final()
    hungry = final[f"hungry@{h}"]
    assert (hungry["state"], hungry["reason"]) == ("declined", "declined")
    assert "below min_free_mb 1000000000000" in hungry["detail"]
    assert final[f"after@{h}"]["state"] == "ready"  # went on without the declined host
    assert "1 declined" in run.out
    assert not retry.path_for(str(m)).exists()  # nothing to retry
    assert len(world.tagged()) == 1  # only `after` runs
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert world.tagged() == []


def test_a_required_when_makes_a_decline_a_failure(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    m = world.manifest([host], _programs(h, required=True))
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 2, run.out + run.err
    final = run.final()
    hungry = final[f"hungry@{h}"]
    assert (hungry["state"], hungry["reason"]) == ("failed", "declined")
    assert "below min_free_mb" in hungry["detail"]
    assert final[f"after@{h}"]["reason"] == "dependency_failed"
    left = retry.path_for(str(m)).read_text()
    assert f"hungry@{h}" in left and f"after@{h}" in left
    assert world.tagged() == []
