"""A first launch on a host whose rex home has no agent is one exec: the first stage asks for
the agent (AGENT_WANTED), the launcher sends it on the same stdin before the launch line, and
the stage keeps it as the agent file for the next launches (issue 21)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers_world import World
from sshrig import RigHost

from rexplan.transport.shipping import bundle, bundle_sha

pytestmark = pytest.mark.sshd

SLEEPER = {"run": ["sleep", "300"], "ready": {"alive": 0.2}}
AGENT_FILE = f"agent-{bundle_sha()[:16]}.py"
#: sshd's VERBOSE lines for an exec and for an SFTP session
EXEC, SFTP = "Starting session: command", "subsystem request for sftp"


def test_a_first_launch_ships_the_agent_in_its_own_exec(
    world: World, fresh_sshd: Callable[..., RigHost]
) -> None:
    host = fresh_sshd(max_startups="100:30:200")  # a new rex home; sshd logs VERBOSE
    agent = Path(host.state_dir_for(world.rig.login)) / AGENT_FILE
    assert not agent.exists()
    on = {"on": [host.name]}
    m = world.manifest(
        [host], {"cold": {**SLEEPER, **on}, "warm": {**SLEEPER, **on, "requires": ["cold"]}}
    )
    world.distribute(m)  # keys over SFTP, before the apply
    before = world.rig.log_text(host)
    run = world.apply(m)
    during = world.rig.log_text(host)[len(before) :]
    world.rex("stop", str(m))
    assert run.code == 0, run.out + run.err
    assert run.states() == {f"cold@{host.name}": "ready", f"warm@{host.name}": "ready"}
    # one exec per step, the agent upload included; no SFTP session at all
    assert during.count(EXEC) == 2, during
    assert SFTP not in during, during
    # the stage kept the agent, whole, private, for the second step (which found it)
    assert hashlib.sha256(agent.read_bytes()).hexdigest() == bundle_sha()
    assert stat.S_IMODE(agent.stat().st_mode) == 0o600
    assert agent.read_bytes() == bundle()
    assert not [n for n in os.listdir(agent.parent) if n.endswith(".tmp")]
