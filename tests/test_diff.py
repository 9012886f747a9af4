"""rex apply --dry-run --diff: the host records the launched specification, and the dry run
names the fields that changed (issue 20, part 4)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_world import SLEEPER, Hosts, World, nothing_left

from rexplan.core import diff
from rexplan.core import plan as planner
from rexplan.core.manifest import loads
from rexplan.core.spec import DRIFTED, StepStatus


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


def _app(env: dict[str, str], argv: list[str]) -> dict[str, Any]:
    return {
        **SLEEPER,
        "run": argv,
        "env": env,
        "files": [{"src": "conf.txt", "dest": "conf.txt"}],
    }


def test_dry_run_diff_names_the_changed_fields(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    (world.tmp / "conf.txt").write_text("one\n")
    m = world.manifest(
        [host], {"app": {**_app({"A": "1", "GONE": "x"}, ["sleep", "300"]), "on": [h]}}
    )
    world.distribute(m)
    try:
        first = world.apply(m)
        assert first.code == 0, first.out + first.err
        record_path = Path(world.home(h), "run", f"{h}.{world.user}.app.json")
        assert record_path.stat().st_mode & 0o777 == 0o600
        record = json.loads(record_path.read_text())
        launched = record["launched"]
        assert launched["argv"] == ["sleep", "300"] and launched["env"]["A"] == "1"
        assert [f[0] for f in launched["files"]] == ["conf.txt"]
        assert "nl" not in launched  # the launch's secret nonce is not kept

        # nothing changed: no diff lines
        code, out, err = world.rex("apply", str(m), "--dry-run", "--diff")
        assert code == 0, out + err
        assert "diff app@" not in out

        (world.tmp / "conf.txt").write_text("two\n")
        m = world.manifest(
            [host], {"app": {**_app({"A": "2", "NEW": "y"}, ["sleep", "301"]), "on": [h]}}
        )
        code, out, err = world.rex("apply", str(m), "--dry-run", "--diff")
        assert code == 0, out + err
        assert f"diff app@{h} ({h}.{world.user}.app):" in out
        assert '  run: ["sleep", "300"] -> ["sleep", "301"]' in out
        assert '  env.A: "1" -> "2"' in out
        assert '  env.GONE: "x" -> (none)' in out
        assert '  env.NEW: (none) -> "y"' in out
        assert "  files.conf.txt: sha256:" in out
        assert "env.REXTEST" not in out  # unchanged fields are not listed

        code, out, err = world.rex("apply", str(m), "--dry-run", "--diff", "--json")
        assert code == 0, out + err
        (row,) = json.loads(out)["steps"]
        assert row["action"] == "restarted"
        fields = {c["field"]: c for c in row["diff"]}
        assert set(fields) == {"run", "env.A", "env.GONE", "env.NEW", "files.conf.txt"}
        assert fields["env.A"] == {"field": "env.A", "host": '"1"', "manifest": '"2"'}

        # the record is the host's: hostile bytes are bounded and escaped
        record = json.loads(record_path.read_text())
        record["launched"]["env"] = {"A": "\x1b[2J" + "z" * 100_000, "\x1b]0;x\x07": "1"}
        with open(record_path, "r+", encoding="utf-8") as f:
            f.truncate(0)
            f.write(json.dumps(record))
        code, out, err = world.rex("apply", str(m), "--dry-run", "--diff")
        assert code == 0, out + err
        assert "\x1b" not in out and "\x07" not in out
        assert max(len(line) for line in out.splitlines()) < 400
        assert '  env.A: "\\u001b[2Jzzz' in out  # JSON's escape, then cut
        assert "  env.\\x1b]0;x\\x07: " in out  # a name: escaped by printable
        code, out, err = world.rex("apply", str(m), "--dry-run", "--diff", "--json")
        assert code == 0 and len(out) < 20_000
        (row,) = json.loads(out)["steps"]
        assert all(len(c["host"] or "") <= diff.VALUE_LIMIT for c in row["diff"])

        code, out, err = world.rex("apply", str(m), "--diff")
        assert code == 5 and "--diff needs --dry-run" in err
        assert world.rex("stop", str(m))[0] == 0
    finally:
        shutil.rmtree(Path(world.home(h), "files", "app"), ignore_errors=True)


def test_a_record_without_launched_fields_says_so(tmp_path: Path) -> None:
    doc = {
        "rex": 1,
        "hosts": {"h1": {"address": "127.0.0.1"}},
        "users": {"u": {"login": "u"}},
        "authorize": ["*.*.*"],
        "programs": {"p": {"on": "h1", "run": ["x"]}},
    }
    loaded = loads(json.dumps(doc).encode(), os.fspath(tmp_path / "m.yaml"))
    (step,) = planner.compile(loaded).steps
    old = StepStatus(step, DRIFTED)
    assert diff.changes(old) is None
    assert "keeps no launched specification" in diff.format_changes(old, None)
    many = {f"V{i}": "1" for i in range(200)}
    hostile = StepStatus(step, DRIFTED, launched={"argv": ["x"], "env": many})
    found = diff.changes(hostile)
    assert found is not None and len(found) == diff.MAX_CHANGES + 1
    assert found[-1].field.startswith("... ")
