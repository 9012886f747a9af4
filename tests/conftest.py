"""Shared fixtures: the real-sshd rig (tests/sshrig.py) and a host-key policy spy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from helpers_world import World, new_tag, open_world
from oracle import no_orphans  # noqa: F401 - registers the fixture
from sshrig import RigHost, SshdRig, unavailable_reason

_RIG_FIXTURES = {"sshd_rig", "sshd_hosts", "fresh_sshd"}
_policy_violations: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using the rig are ``sshd``-marked, so ``-m 'not sshd'`` deselects them."""
    for item in items:
        if _RIG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.sshd)


@pytest.fixture(scope="session")
def sshd_rig() -> Iterator[SshdRig]:
    """The session's rig: accounts, client key, known_hosts, sshds; all removed at the end."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    rig = SshdRig()
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def sshd_hosts(sshd_rig: SshdRig) -> Callable[[int], list[RigHost]]:
    """``sshd_hosts(n)``: the first n shared, long-lived hosts. Never stop or pause these."""
    return sshd_rig.hosts


@pytest.fixture
def fresh_sshd(sshd_rig: SshdRig) -> Iterator[Callable[..., RigHost]]:
    """``fresh_sshd()``: a dedicated host for fault tests, resumed and stopped after the test.

    ``fresh_sshd(max_startups="2:100:2")`` sets that sshd's MaxStartups (see SshdRig.spawn).
    """
    spawned: list[RigHost] = []

    def spawn(max_startups: str | None = None) -> RigHost:
        spawned.append(sshd_rig.spawn(max_startups=max_startups)[0])
        return spawned[-1]

    yield spawn
    for host in spawned:
        try:
            sshd_rig.resume(host)
        except KeyError:
            continue  # the test stopped it already
        sshd_rig.stop(host)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's run store and retry files ($REX_STATE_DIR, else ./.rex): never the repo's,
    never another test's."""
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / ".rex"))


@pytest.fixture(autouse=True)
def _no_orphans_on_sshd_tests(request: pytest.FixtureRequest) -> None:
    """Every sshd-marked test runs under the no-orphans oracle (tests/oracle.py)."""
    if request.node.get_closest_marker("sshd"):
        request.getfixturevalue("no_orphans")


@pytest.fixture(autouse=True)
def _reject_policy_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any test in which an SSH client connects without RejectPolicy (never auto-add)."""
    connect = paramiko.SSHClient.connect

    def spy(self: paramiko.SSHClient, *args: Any, **kwargs: Any) -> Any:
        policy = self._policy
        if not isinstance(policy, paramiko.RejectPolicy):
            _policy_violations.append(f"{type(policy).__name__} for {args or kwargs}")
            raise AssertionError(f"SSH connect with {type(policy).__name__}, not RejectPolicy")
        return connect(self, *args, **kwargs)

    monkeypatch.setattr(paramiko.SSHClient, "connect", spy)
    yield
    found = list(_policy_violations)
    _policy_violations.clear()
    assert not found, f"connections without RejectPolicy: {found}"


@pytest.fixture
def tag() -> str:
    """The test's tag: REXTEST in the environment of every program it starts."""
    return new_tag()


@pytest.fixture
def world(
    sshd_rig: SshdRig,
    tmp_path: Path,
    tag: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    """Manifests over the rig run through rex's main() (tests/helpers_world.py); afterwards
    nothing the test started remains. A test file may define its own."""
    yield from open_world(sshd_rig, tmp_path, tag, capsys, monkeypatch)
