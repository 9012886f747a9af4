"""``become``: a program run as another account than the SSH login, through ``sudo -n``, over
real sshds. The rig's login may become a second rig account without a password (a sudoers.d
drop-in the rig writes and removes); a third account it has no rule for makes sudo ask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers_procs as procs
import pytest
from helpers_world import SLEEPER, TIMEOUTS, World
from sshrig import Account, SshdRig
from sudorig import sudo_unavailable_reason

from rexplan.cli.rex import main as rex_main


@pytest.fixture(autouse=True)
def _sudo() -> None:
    reason = sudo_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def target(sshd_rig: SshdRig) -> Account:
    """The account the login may become (rig account 1)."""
    return sshd_rig.allow_become(1)


def _of(uids: set[int], tag: str) -> list[int]:
    """Live processes of these accounts carrying this test's tag (REXTEST)."""
    return [p for p in procs.tagged(REXTEST=tag) if procs.uid(p) in uids]


def _account_procs(uid: int) -> list[int]:
    """Every live process of ``uid``: a become program's supervisor and watchdog too."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if procs.uid(int(entry)) == uid and procs.alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _gone(check: Callable[[], list[int]], within: float = 15.0) -> list[int]:
    end = time.monotonic() + within
    left = check()
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = check()
    return left


def _started(world: World, target: Account, spec: dict[str, Any]) -> tuple[Path, str, int]:
    (host,) = world.rig.hosts(1)
    name = f"b{world.tag[:6]}"
    m = world.manifest([host], {name: {"on": [host.name], "become": target.login, **spec}})
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    pid = run.pids()[f"{name}@{host.name}"]
    return m, host.name, pid


def test_a_program_runs_as_the_account_and_stop_ends_both_accounts(
    world: World, target: Account
) -> None:
    m, host, pid = _started(world, target, SLEEPER)
    assert procs.uid(pid) == target.uid  # /proc/PID/status Uid: the account, not the login
    name = next(iter(world.programs))
    record = world.record(host, name)
    assert record["become"] == target.login and record["pid"] == pid
    # the keeper (the login's half) is the agent the record names; the supervisor is the
    # program's parent, as the account
    assert procs.uid(record["agent"]) == world.rig.accounts[0].uid
    assert procs.uid(_ppid(pid)) == target.uid
    code, steps = world.status(m)
    (step,) = steps.values()
    assert code == 0 and step["status"] == "running" and step["pid"] == pid, step
    assert step["become"] == target.login
    again = world.apply(m)
    assert again.code == 0 and set(again.actions().values()) == {"unchanged"}, again.out
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert _gone(lambda: _account_procs(target.uid)) == []
    assert _gone(lambda: world.tagged()) == []
    assert not procs.alive(record["agent"])  # the keeper ended with its supervisor
    assert world.record(host, name)["state"] == "stopped"


def test_restarts_run_as_the_account(world: World, target: Account) -> None:
    spec = {"shell": "sleep 0.3; exit 3", "ready": {"alive": 0.1}, "restart": "on-failure"}
    m, host, pid = _started(world, target, spec)
    name = next(iter(world.programs))
    assert procs.wait_until(lambda: world.record(host, name).get("restarts", 0) >= 2, 15)
    assert procs.wait_until(lambda: world.record(host, name).get("state") == "running", 5)
    record = world.record(host, name)
    assert record["pid"] != pid and record["become"] == target.login
    if procs.alive(record["pid"]):
        assert procs.uid(record["pid"]) == target.uid
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert _gone(lambda: _account_procs(target.uid)) == []


def test_stop_ends_a_program_whose_supervisor_was_killed(world: World, target: Account) -> None:
    m, host, pid = _started(world, target, SLEEPER)
    name = next(iter(world.programs))
    keeper = world.record(host, name)["agent"]
    supervisor = _ppid(pid)
    assert procs.uid(supervisor) == target.uid
    os.kill(supervisor, signal.SIGKILL)  # as the account could: the program is orphaned
    assert _gone(lambda: [keeper] if procs.alive(keeper) else []) == []
    assert procs.alive(pid)
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err  # ended as the account, through sudo -n
    assert _gone(lambda: _account_procs(target.uid)) == []
    assert _gone(lambda: world.tagged()) == []


def test_stop_force_leaves_nothing_of_either_account(world: World, target: Account) -> None:
    # ignores SIGTERM: only a KILL ends it
    m, _host, pid = _started(
        world,
        target,
        {"shell": "trap '' TERM; exec sleep 300", "ready": {"alive": 0.2}, "stop_timeout": 30},
    )
    assert procs.uid(pid) == target.uid
    began = time.monotonic()
    code, out, err = world.rex("stop", str(m), "--force")
    assert code == 0, out + err
    assert _gone(lambda: _account_procs(target.uid)) == []
    assert _gone(lambda: world.tagged()) == []
    assert time.monotonic() - began < 10  # KILL at once, not the TERM grace the program ignores


def test_files_are_owned_by_the_account(world: World, target: Account) -> None:
    (world.tmp / "app.conf").write_text("listen 1\n")
    spec = {
        "shell": "cat app.conf; exec sleep 300",
        "ready": {"alive": 0.2},
        "files": [{"src": "app.conf", "dest": "app.conf", "mode": "0640"}],
    }
    m, _host, pid = _started(world, target, spec)
    cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    conf = cwd / "app.conf"
    st = conf.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (target.uid, 0o640)
    assert conf.read_text() == "listen 1\n"
    assert str(cwd).startswith(target.home)
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err


def test_a_job_as_the_account_sends_its_output(world: World, target: Account) -> None:
    (host,) = world.rig.hosts(1)
    m = world.manifest(
        [host],
        {"j": {"on": [host.name], "kind": "job", "become": target.login, "run": ["id", "-un"]}},
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    (job,) = run.final().values()
    assert (job["state"], job["status"], job["output"]) == ("ready", 0, f"{target.login}\n"), job


def test_sudo_asking_for_a_password_fails_as_become_at_once(
    world: World, sshd_rig: SshdRig
) -> None:
    stranger = sshd_rig.account(2)  # no sudoers rule lets the login become it
    (host,) = sshd_rig.hosts(1)
    m = world.manifest([host], {"p": {"on": [host.name], "become": stranger.login, **SLEEPER}})
    world.distribute(m)
    began = time.monotonic()
    run = world.apply(m)
    took = time.monotonic() - began
    e = run.only()
    assert run.code != 0 and e["state"] == "failed" and e["reason"] == "become", e
    assert "NOPASSWD" in run.out + json.dumps(e)
    assert took < TIMEOUTS["start"] + TIMEOUTS["callback"]  # no prompt, no deadline waited
    assert _account_procs(stranger.uid) == []


def _launching(world: World, target: Account, ready_s: float) -> subprocess.Popen[bytes]:
    """``rex apply`` in a process of its own, of a program that is never ready (within
    ``ready_s`` s), once the program runs as the account."""
    (host,) = world.rig.hosts(1)
    spec = {"on": [host.name], "become": target.login, "run": ["sleep", "300"]}
    spec["ready"] = {"file": "/nonexistent/rex-never", "timeout": ready_s}
    m = world.manifest([host], {"slow": spec})
    world.distribute(m)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-c", "import sys; from rexplan.cli.rex import main; sys.exit(main())"]
    argv += ["apply", str(m), "-y", "--keys", str(world.keys)]
    argv += ["--known-hosts", world.rig.known_hosts]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _gone(lambda: [] if _of({target.uid}, world.tag) else [1], 30) == []
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc


def test_launcher_sigkill_before_the_verdict_leaves_nothing(world: World, target: Account) -> None:
    proc = _launching(world, target, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # not ready by its deadline, nobody to call back: the supervisor ends it, as the account
    assert _gone(lambda: _account_procs(target.uid), 20) == []
    assert _gone(lambda: world.tagged(), 10) == []


def test_the_watchdog_ends_the_program_when_its_supervisor_is_killed(
    world: World, target: Account
) -> None:
    proc = _launching(world, target, 30)
    try:
        (pid,) = _of({target.uid}, world.tag)
        os.kill(_ppid(pid), signal.SIGKILL)  # the supervisor, before its verdict
        assert _gone(lambda: _account_procs(target.uid), 15) == []
        assert proc.wait(30) == 2  # the step failed, well before its ready deadline
    finally:
        proc.kill()
        proc.wait(10)
    assert _gone(lambda: world.tagged(), 10) == []


@pytest.mark.parametrize(
    ("where", "setting"),
    [
        ("program", {"become": "db", "become_method": "su"}),
        ("defaults", {"become_method": "doas"}),
    ],
)
def test_a_bad_become_method_is_rejected_where_it_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, setting: dict[str, str]
) -> None:
    program = {"run": ["true"], "on": ["h"], **(setting if where == "program" else {})}
    doc = {
        "rex": 1,
        "defaults": {"user": "u", **(setting if where == "defaults" else {})},
        "hosts": {"h": {"address": "127.0.0.1"}},
        "users": {"u": {}},
        "programs": {"p": program},
        "authorize": ["*.*.*"],
    }
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    code = rex_main(["plan", str(path)])
    out, err = capsys.readouterr()
    assert code != 0
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "become_m" in text)
    assert f"{path}:{line}:" in out + err, out + err
    assert "become_method" in out + err and "sudo" in out + err


def test_become_is_in_the_plan_and_the_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {
        "rex": 1,
        "defaults": {"user": "u", "become": "postgres"},
        "hosts": {"h": {"address": "127.0.0.1"}},
        "users": {"u": {"become": "www"}},
        "programs": {
            "db": {"run": ["true"], "on": ["h"]},
            "web": {"run": ["true"], "on": ["h"], "user": "u", "become": "nginx"},
        },
        "authorize": ["*.*.*"],
    }
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(doc) + "\n")
    assert rex_main(["plan", str(path), "--json"]) == 0
    steps = {s["program"]: s for s in _steps(json.loads(capsys.readouterr().out))}
    assert steps["db"]["become"] == "www"  # the user's, over defaults
    assert steps["web"]["become"] == "nginx"  # the program's, over its user's


def _steps(doc: Any) -> Iterator[dict[str, Any]]:
    if isinstance(doc, dict):
        if "program" in doc and "triple" in doc:
            yield doc
        for value in doc.values():
            yield from _steps(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _steps(value)


def test_audit_shows_the_account(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = {
        "rex": 1,
        "defaults": {"user": "u"},
        "hosts": {"h": {"address": "127.0.0.1"}},
        "users": {"u": {}},
        "programs": {
            "db": {"run": ["true"], "on": ["h"], "become": "postgres"},
            "web": {"run": ["true"], "on": ["h"]},
        },
        "authorize": ["*.*.*"],
    }
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(doc) + "\n")
    keys = ["--keys", str(tmp_path / "keys")]
    rex_main(["audit", str(path), *keys])
    header, *lines = capsys.readouterr().out.splitlines()
    assert "BECOME" in header.split()
    column = header.split().index("BECOME")
    got = {line.split()[0]: line.split()[column] for line in lines if line.startswith("h.")}
    assert got == {"h.u.db": "postgres", "h.u.web": "-"}
    rex_main(["audit", str(path), "--json", *keys])
    rows = {r["triple"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["h.u.db"]["become"] == "postgres" and rows["h.u.web"]["become"] is None


def test_a_changed_program_is_replaced_as_the_account(world: World, target: Account) -> None:
    m, host, pid = _started(world, target, SLEEPER)
    name = next(iter(world.programs))
    doc = json.loads(m.read_text())
    doc["programs"][name]["env"]["CHANGED"] = "1"
    m.write_text(json.dumps(doc))
    run = world.apply(m)
    assert run.code == 0 and set(run.actions().values()) == {"restarted"}, run.out
    new = run.pids()[f"{name}@{host}"]
    assert new != pid and procs.uid(new) == target.uid
    assert _gone(lambda: [pid] if procs.alive(pid) else []) == []
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert _gone(lambda: _account_procs(target.uid)) == []


def test_a_become_programs_output_is_in_rex_logs_and_its_log_rotates(
    world: World, target: Account
) -> None:
    """The keeper (the login) owns the program's log and rotates it; the account's supervisor
    writes whole lines into the keeper's pump: rex logs reads it as for any program."""
    write = (
        "import sys, time\n"
        "for i in range(3000): sys.stdout.write('line %05d as %s\\n' % (i, 'x' * 80))\n"
        "sys.stdout.flush(); time.sleep(300)"
    )
    spec = {"run": ["python3", "-c", write], "ready": {"alive": 0.3}, "logs": {"max_size": 65536}}
    m, host, _ = _started(world, target, spec)
    name = next(iter(world.programs))
    log = Path(world.home(host), "logs", f"{host}.{world.user}.{name}.log")
    try:
        assert procs.wait_until(lambda: "line 02999" in log.read_text(), 15)
        # rotated at max_size by the login's keeper: every file bounded, owned by the login
        files = sorted(log.parent.glob(log.name + "*"))
        assert len(files) >= 2 and all(f.stat().st_size <= 65536 for f in files), files
        assert {f.stat().st_uid for f in files} == {world.rig.accounts[0].uid}
        code, out, err = world.rex("logs", str(m), "-n", "2")
        assert code == 0, out + err
        assert out.splitlines()[-1] == f"{name}@{host} | line 02999 as {'x' * 80}", out
    finally:
        code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert _gone(lambda: _account_procs(target.uid)) == []
