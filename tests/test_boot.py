"""Surviving a reboot: autostart programs come back from the login's boot entry, without the
launcher (issue 20, part 6). The reboot is simulated: every process of the test's programs and
their supervisors is killed by pid (from the records and the processes' tags), then the
installed entry's command is run as the login, with cron's environment."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import helpers_procs as procs
import pytest
from helpers_world import SLEEPER, Hosts, World, nothing_left

from rexplan.core import manifest as manifests
from rexplan.errors import ManifestError
from rexplan.remote.agent import boot as agent_boot

needs_crontab = pytest.mark.skipif(
    shutil.which("crontab") is None, reason="no crontab here (tests/run installs cron)"
)


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


def _crontab(login: str) -> list[str]:
    res = subprocess.run(["crontab", "-l", "-u", login], capture_output=True, check=False)
    return res.stdout.decode().splitlines() if res.returncode == 0 else []


def _ours(login: str, home: str) -> list[str]:
    return [line for line in _crontab(login) if line.startswith("@reboot") and home in line]


def _drop_ours(login: str, home: str) -> None:
    """Remove what a failed test left: our line, and the login's crontab if nothing else."""
    lines = _crontab(login)
    kept = [line for line in lines if not (line.startswith("@reboot") and home in line)]
    if not any(line.strip() and not line.startswith("#") for line in kept):
        subprocess.run(["crontab", "-r", "-u", login], capture_output=True, check=False)
    elif kept != lines:
        text = "".join(f"{line}\n" for line in kept)
        subprocess.run(["crontab", "-u", login, "-"], input=text.encode(), check=True)


def _kill(pid: object) -> None:
    if isinstance(pid, int) and pid > 1:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _as_login(login: str, command: str) -> subprocess.CompletedProcess[bytes]:
    """``command`` run as cron runs an @reboot line: /bin/sh as the login, cron's environment."""
    entry = pwd.getpwnam(login)
    env = {"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir, "LOGNAME": login, "SHELL": "/bin/sh"}
    return subprocess.run(
        [
            shutil.which("runuser") or "/usr/sbin/runuser",
            "-u",
            login,
            "--",
            "/bin/sh",
            "-c",
            command,
        ],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )


@needs_crontab
def test_autostart_programs_come_back_from_the_boot_entry(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h, login = host.name, world.rig.login
    home = host.state_dir_for(login)
    m = world.manifest(
        [host],
        {
            "svc": {"on": [h], "autostart": True, **SLEEPER},
            "plain": {"on": [h], **SLEEPER},
        },
    )
    world.distribute(m)
    try:
        first = world.apply(m)
        assert first.code == 0, first.out + first.err
        (line,) = _ours(login, home)
        assert line.endswith(f"# rex-boot {line.split('# rex-boot ')[1]}")
        command = line[len("@reboot ") : line.rindex(" # rex-boot ")]
        assert "--boot" in command

        # the reboot: supervisors first (they would restart), then every program process
        for program in ("svc", "plain"):
            record = world.record(h, program)
            _kill(record.get("agent"))
            _kill(record.get("pid"))
        for pid in world.tagged():
            _kill(pid)
        deadline = time.monotonic() + 10
        while world.tagged() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert world.tagged() == []

        booted = _as_login(login, command)
        assert booted.returncode == 0, booted.stdout + booted.stderr
        report = json.loads(booted.stdout.decode().splitlines()[-1])
        assert report["resumed"] == [f"{h}.{world.user}.svc"] and report["failed"] == []

        code, status = world.status(m)
        assert status[f"svc@{h}"]["label"] == "running (resumed at boot)"
        assert status[f"svc@{h}"]["status"] == "running"
        assert status[f"plain@{h}"]["status"] != "running"  # not autostart: stays down
        resumed_pid = status[f"svc@{h}"]["pid"]
        assert world.tagged(h, "svc") == [resumed_pid]
        # a second boot finds it running and starts nothing
        again = _as_login(login, command)
        report = json.loads(again.stdout.decode().splitlines()[-1])
        assert report["resumed"] == [] and report["running"] == [f"{h}.{world.user}.svc"]

        code, out, err = world.rex("stop", str(m))
        assert code == 0, out + err
        assert world.tagged() == []
        assert _ours(login, home) == []  # no autostart program left: the entry is gone
        listed = subprocess.run(["crontab", "-l", "-u", login], capture_output=True, check=False)
        assert listed.returncode != 0  # nor an empty crontab: "no crontab for LOGIN"
        assert not procs.find(lambda env: env.get("REX_TRIPLE") == f"{h}.{world.user}.svc")
    finally:
        _drop_ours(login, home)


@needs_crontab
def test_removing_autostart_removes_the_entry(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h, login = host.name, world.rig.login
    home = host.state_dir_for(login)
    m = world.manifest([host], {"svc": {"on": [h], "autostart": True, **SLEEPER}})
    world.distribute(m)
    try:
        assert world.apply(m).code == 0
        assert len(_ours(login, home)) == 1
        m = world.manifest([host], {"svc": {"on": [h], **SLEEPER}})
        changed = world.apply(m)
        assert changed.code == 0, changed.out + changed.err
        assert changed.actions() == {f"svc@{h}": "restarted"}
        assert _ours(login, home) == []
        assert world.rex("stop", str(m))[0] == 0
    finally:
        _drop_ours(login, home)


def test_a_job_cannot_autostart(tmp_path: Path) -> None:
    doc = {
        "rex": 1,
        "hosts": {"h1": {"address": "127.0.0.1"}},
        "users": {"u": {"login": "u"}},
        "authorize": ["*.*.*"],
        "programs": {"j": {"on": "h1", "run": ["true"], "kind": "job", "autostart": True}},
    }
    path = os.path.join(tmp_path, "m.yaml")
    with open(path, "w") as f:
        f.write(json.dumps(doc, indent=2))
    with pytest.raises(ManifestError, match="a job cannot autostart") as info:
        manifests.load(path)
    assert info.value.diagnostics[0].line > 0


def _home_with_autostart(tmp: Path) -> Path:
    home = tmp / "rex home"
    (home / "run").mkdir(parents=True)
    record = {"state": "running", "launched": {"autostart": True}, "pid": 0}
    (home / "run" / "svc.json").write_text(json.dumps(record))
    return home


def test_the_entry_is_a_systemd_unit_when_systemctl_user_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _home_with_autostart(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    calls: list[list[str]] = []

    def tool(argv: list[str], stdin: bytes | None = None) -> tuple[int, bytes]:
        calls.append(argv)
        return (0, b"") if argv[0] == "systemctl" else (127, b"")

    monkeypatch.setattr(agent_boot, "_tool", tool)
    agent = str(home / "agent-0123.py")
    report = agent_boot.boot_entry(str(home), agent)
    assert report["entry"] == "systemd" and report["wanted"] == ["svc"]
    (unit,) = (tmp_path / ".config" / "systemd" / "user").iterdir()
    text = unit.read_text()
    assert f'Environment="REX_HOME={home}"' in text
    assert f'"{agent}" --boot' in text
    assert ["systemctl", "--user", "enable", unit.name] in calls
    (home / "run" / "svc.json").write_text(json.dumps({"state": "stopped"}))
    assert agent_boot.boot_entry(str(home), agent)["removed"] is True
    assert not unit.exists()


def test_no_systemd_and_no_crontab_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _home_with_autostart(tmp_path)
    monkeypatch.setattr(agent_boot, "_tool", lambda argv, stdin=None: (127, b""))
    report = agent_boot.boot_entry(str(home), str(home / "agent-0123.py"))
    assert report["entry"] is None and "neither systemctl --user nor crontab" in report["warning"]
