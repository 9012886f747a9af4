"""Selection (--program, --tags), rex restart and restart_with (issue 20, part 3)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_world import SLEEPER, Hosts, Run, World, nothing_left

from rexplan.cli.rex import main
from rexplan.core import manifest as manifests
from rexplan.core import plan as planner
from rexplan.core import selection
from rexplan.errors import ManifestError, UsageError


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


def _restart(world: World, m: Path, *extra: str) -> Run:
    world.count += 1
    path = world.tmp / f"events-{world.count}.jsonl"
    code, out, err = world.rex("restart", str(m), "-y", "--events", str(path), *extra)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return Run(code, events, out, err)


def _ready_order(run: Run) -> list[str]:
    return [e["step"] for e in run.events if e.get("state") == "ready"]


def test_restart_selected_and_followers_in_wave_order(world: World, sshd_hosts: Hosts) -> None:
    h1, h2 = sshd_hosts(2)
    programs: dict[str, dict[str, Any]] = {
        "store": {"on": [h1.name], **SLEEPER},
        "worker": {"on": [h1.name, h2.name], "restart_with": ["store"], **SLEEPER},
        "batch": {"on": [h2.name], "tags": ["nightly"], **SLEEPER},
    }
    m = world.manifest([h1, h2], programs)
    world.distribute(m)
    first = world.apply(m)
    assert first.code == 0, first.out + first.err
    store, workers = f"store@{h1.name}", [f"worker@{h1.name}", f"worker@{h2.name}"]
    batch = f"batch@{h2.name}"

    # restart store: it is replaced although it runs current, then both workers after it
    again = _restart(world, m, "--program", "st*")
    assert again.code == 0, again.out + again.err
    assert again.actions() == {store: "restarted", **{w: "restarted" for w in workers}}
    order = _ready_order(again)
    assert order[0] == store and set(order[1:]) == set(workers)
    pids = again.pids()
    assert all(pids[s] != first.pids()[s] for s in pids)
    code, status = world.status(m)
    assert code == 0 and {s["status"] for s in status.values()} == {"running"}
    assert status[batch]["pid"] == first.pids()[batch]  # not selected, not touched

    # an apply that changes store restarts the workers after it, not the unrelated batch
    programs["store"]["env"] = {"CHANGED": "1"}
    m = world.manifest([h1, h2], programs)
    changed = world.apply(m)
    assert changed.code == 0, changed.out + changed.err
    assert changed.actions() == {
        store: "restarted",
        **{w: "restarted" for w in workers},
        batch: "unchanged",
    }
    assert any("restart_with" in (e.get("detail") or "") for e in changed.events)
    # a plain re-apply restarts nothing
    assert set(world.apply(m).actions().values()) == {"unchanged"}

    # a restart of a follower alone does not restart what it follows
    alone = _restart(world, m, "--program", "worker", "--limit", h2.name)
    assert alone.actions() == {f"worker@{h2.name}": "restarted"}

    # --tags selects for status and stop too
    code, status = world.status(m, "--tags", "nightly")
    assert list(status) == [batch]
    code, out, err = world.rex("stop", str(m), "--tags", "nightly")
    assert code == 0, out + err
    assert world.tagged(h2.name, "batch") == []
    assert world.tagged(h1.name, "store") != []
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert world.tagged() == []


def _write(tmp_path: Path, programs: dict[str, Any]) -> Path:
    doc = {
        "rex": 1,
        "hosts": {"h1": {"address": "127.0.0.1"}},
        "users": {"u": {"login": "u"}},
        "authorize": ["*.*.*"],
        "programs": programs,
    }
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def test_restart_with_is_validated_with_positions(tmp_path: Path) -> None:
    m = _write(tmp_path, {"a": {"on": "h1", "run": ["x"], "restart_with": ["nope"]}})
    with pytest.raises(ManifestError) as info:
        manifests.load(str(m))
    assert "unknown program 'nope'" in str(info.value)
    assert any(d.line and d.col for d in info.value.diagnostics)
    cyc = {
        "a": {"on": "h1", "run": ["x"], "requires": ["b"]},
        "b": {"on": "h1", "run": ["x"], "restart_with": ["a"]},
    }
    with pytest.raises(ManifestError) as info:
        manifests.load(str(_write(tmp_path, cyc)))
    text = str(info.value)
    assert "restart_with cycle: b -> a -> b" in text
    (diag,) = info.value.diagnostics
    assert diag.path.endswith("programs.b.restart_with") and diag.line is not None
    bad_tag = {"a": {"on": "h1", "run": ["x"], "tags": ["Bad Tag"]}}
    with pytest.raises(ManifestError, match="invalid tag 'Bad Tag'"):
        manifests.load(str(_write(tmp_path, bad_tag)))


def test_plan_shows_restart_with_and_selection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = _write(
        tmp_path,
        {
            "worker": {"on": "h1", "run": ["x"], "restart_with": "store", "tags": ["t"]},
            "store": {"on": "h1", "run": ["x"]},
        },
    )
    loaded = manifests.load(str(m))
    compiled = planner.compile(loaded)
    # restart_with orders: store first, though it comes second in the file
    assert [s.program for s in compiled.steps] == ["store", "worker"]
    assert main(["plan", str(m)]) == 0
    assert "restart_with=store" in capsys.readouterr().out
    assert main(["plan", str(m), "--json", "--tags", "t"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in doc["steps"]] == ["worker@h1"]
    assert doc["steps"][0]["restart_with"] == ["store"] and doc["steps"][0]["tags"] == ["t"]
    with pytest.raises(UsageError, match="--program db"):
        selection.select(loaded, compiled, programs=["db"])
    with pytest.raises(UsageError, match="--tags nope"):
        selection.select(loaded, compiled, tags=["nope"])
    assert selection.followers(loaded, {"store"}) == {"worker"}
    assert main(["plan", str(m), "--program", "nothing*"]) == 5
