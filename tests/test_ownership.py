"""Identity and ownership (issue 20, item 1), over the real sshd rig: host records, locks,
logs and files are keyed by the whole triple (host.user.program), so two hosts of a manifest
on one machine and login do not collide; records of the layout before (by program) are still
found, kept unchanged and stopped; each record names the manifest that launched it, and
another manifest's apply fails that step ``owned`` unless ``--take-over``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers_procs as procs
import pytest
from helpers_world import SLEEPER, Hosts, World, nothing_left

from rexplan.core import spec as specs


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


def _with(path: Path, target: Path, **changes: Any) -> Path:
    """A copy of the manifest at ``path`` as ``target``, with top-level ``changes``."""
    doc = json.loads(path.read_text())
    doc.update(changes)
    target.write_text(json.dumps(doc, indent=2))
    return target


def test_two_hosts_on_one_machine_and_login_do_not_collide(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h, alias = host.name, f"{host.name}-alias"
    m = world.manifest([host], {"db": {"on": [h, alias], **SLEEPER}})
    doc = json.loads(m.read_text())
    doc["hosts"][alias] = dict(doc["hosts"][h])  # the same sshd, login and REX_HOME
    m.write_text(json.dumps(doc))
    world.hosts[alias] = host
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    assert run.actions() == {f"db@{h}": "started", f"db@{alias}": "started"}
    pids = run.pids()
    assert len(set(pids.values())) == 2
    assert world.tagged(h, "db") == [pids[f"db@{h}"]]
    assert world.tagged(alias, "db") == [pids[f"db@{alias}"]]
    run_dir = Path(world.home(h), "run")
    assert (run_dir / f"{world.triple(h, 'db')}.json").exists()
    assert (run_dir / f"{world.triple(alias, 'db')}.json").exists()
    assert not (run_dir / "db.json").exists()
    logs = Path(world.home(h), "logs")
    assert (logs / f"{world.triple(alias, 'db')}.log").exists()
    code, status = world.status(m)
    assert code == 0
    for host_name in (h, alias):
        st = status[f"db@{host_name}"]
        assert (st["status"], st["pid"]) == ("running", pids[f"db@{host_name}"])
        assert st["owner"] == {"name": "m", "path": str(m)}
    again = world.apply(m)
    assert set(again.actions().values()) == {"unchanged"}, again.out
    # stop one host: that one, not the other
    code, out, err = world.rex("stop", str(m), "--limit", alias)
    assert code == 0, out + err
    assert world.tagged(alias, "db") == [] and world.tagged(h, "db") == [pids[f"db@{h}"]]
    code, status = world.status(m)
    assert status[f"db@{alias}"]["status"] == "stopped"
    assert status[f"db@{h}"]["status"] == "running"
    assert world.rex("stop", str(m))[0] == 0
    assert world.tagged() == []


def _old_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch as the rex before triple-keyed records: record named by the program, no owner."""
    real = specs.launch_args

    def by_program(step: Any, **kwargs: Any) -> dict[str, Any]:
        args = real(step, **kwargs)
        args.update(log=step.program, owner=None)
        return args

    monkeypatch.setattr(specs, "launch_args", by_program)


def test_records_of_the_layout_before_are_found_kept_and_moved(
    world: World, sshd_hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    programs: dict[str, Any] = {"db": {"on": [h], **SLEEPER}, "web": {"on": [h], **SLEEPER}}
    m = world.manifest([host], programs)
    world.distribute(m)
    with monkeypatch.context() as patch:
        _old_launcher(patch)
        first = world.apply(m)
    assert first.code == 0, first.out + first.err
    run_dir = Path(world.home(h), "run")
    assert (run_dir / "db.json").exists() and (run_dir / "web.json").exists()
    assert not (run_dir / f"{world.triple(h, 'db')}.json").exists()
    # the upgraded rex finds them: running, nobody's; an unchanged apply leaves them be
    code, status = world.status(m)
    assert code == 0 and status[f"db@{h}"]["status"] == "running"
    assert status[f"db@{h}"]["pid"] == first.pids()[f"db@{h}"]
    assert status[f"db@{h}"]["owner"] is None
    same = world.apply(m)
    assert same.code == 0 and set(same.actions().values()) == {"unchanged"}, same.out
    assert same.pids() == first.pids()
    # a changed program is replaced under its new name; its old record goes
    programs["web"]["env"] = {"LEVEL": "2"}
    m = world.manifest([host], programs)
    changed = world.apply(m)
    assert changed.code == 0, changed.out + changed.err
    assert changed.actions() == {f"db@{h}": "unchanged", f"web@{h}": "restarted"}
    assert not procs.alive(first.pids()[f"web@{h}"])
    assert not (run_dir / "web.json").exists()
    assert world.record(h, "web")["manifest"] == "m"
    # stop finds both: the old-layout record (db) and the new one (web)
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert world.tagged() == []
    assert procs.read_state(world.home(h), "db")["state"] == "stopped"


def test_another_manifest_cannot_take_a_triple_without_take_over(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    (world.tmp / "conf.txt").write_text("one\n")
    programs: dict[str, Any] = {
        "svc": {"on": [h], **SLEEPER},  # the fast path: the agent refuses
        "conf": {"on": [h], **SLEEPER, "files": [{"src": "conf.txt", "dest": "conf.txt"}]},
    }
    a = _with(world.manifest([host], programs), world.tmp / "a.yaml", name="alpha")
    b = _with(a, world.tmp / "b.yaml", name="beta")
    world.distribute(a)
    first = world.apply(a)
    assert first.code == 0, first.out + first.err
    before = sorted(world.tagged())
    refused = world.apply(b)
    assert refused.code == 2
    for step in (f"svc@{h}", f"conf@{h}"):
        e = refused.final()[step]
        assert (e["state"], e["reason"]) == ("failed", "owned"), e
        assert f"owned by manifest alpha ({a})" in e["detail"], e
    assert sorted(world.tagged()) == before  # nothing changed on that host
    assert world.record(h, "svc")["manifest"] == "alpha"
    _, status = world.status(b)
    assert status[f"svc@{h}"]["owner"] == {"name": "alpha", "path": str(a)}
    out = world.rex("status", str(b))[1]
    assert "alpha" in out
    code, out, _ = world.rex("apply", str(b), "--dry-run", "--json")
    assert code == 0 and {s["action"] for s in json.loads(out)["steps"]} == {"owned"}
    taken = world.apply(b, "--take-over")
    assert taken.code == 0, taken.out + taken.err
    assert set(taken.actions().values()) == {"restarted"}
    assert world.record(h, "svc")["manifest"] == "beta"
    assert world.record(h, "conf")["manifest_path"] == str(b)
    assert not any(procs.alive(p) for p in before)
    # now alpha's apply is the one refused, and beta's is unchanged
    assert world.apply(a).code == 2
    assert set(world.apply(b).actions().values()) == {"unchanged"}
    assert world.rex("stop", str(b))[0] == 0
    assert world.tagged() == []


def test_audit_of_several_manifests_judges_against_their_union(
    world: World, sshd_hosts: Hosts
) -> None:
    """A key store (and a host) shared by two manifests: each alone finds the other's keys
    unauthorized; ``rex audit -m A -m B`` audits them against their union, clean."""
    (host,) = sshd_hosts(1)
    h = host.name
    api = world.manifest([host], {"api": {"on": [h], **SLEEPER}}, name="api.yaml")
    api.write_text(api.read_text().replace('"*.*.*"', '"*.*.api"'))
    worker = world.manifest([host], {"worker": {"on": [h], **SLEEPER}}, name="worker.yaml")
    worker.write_text(worker.read_text().replace('"*.*.*"', '"*.*.worker"'))
    for m in (api, worker):
        world.distribute(m)
    code, out, err = world.rex("audit", str(api), "--remote")
    assert code == 6 and "UNAUTHORIZED" in out, out + err
    assert f"{h}.{world.user}.worker" in out
    code, out, err = world.rex("audit", "-m", str(api), "-m", str(worker), "--remote")
    assert code == 0, out + err
    assert "2 triples: 2 OK" in out
    code, out, _ = world.rex("audit", "-m", str(api), "-m", str(worker), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["manifest"] == f"{api}, {worker}"
    assert [r["triple"] for r in doc["rows"]] == [
        f"{h}.{world.user}.api",
        f"{h}.{world.user}.worker",
    ]
    # a user name that means two logins cannot be one policy
    doc = json.loads(worker.read_text())
    doc["users"][world.user]["login"] = "someone-else"
    worker.write_text(json.dumps(doc))
    code, _, err = world.rex("audit", "-m", str(api), "-m", str(worker))
    assert code == 5 and "logs in as" in err, err
