"""The playbooks: each validates and plans; the local ones without a fixed-port clash apply."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import helpers_procs as procs
import pytest

from rexplan.cli.rex import main
from rexplan.core import manifest
from rexplan.core import plan as planner
from rexplan.engine import runs

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = sorted((ROOT / "playbooks").glob("*.yaml"))
DAEMONS_PORT = "8780"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_local(path: Path) -> bool:
    return all(h.transport == "local" for h in manifest.load(str(path)).hosts)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """REX_HOME and the run store in tmp_path; whatever a run started is stopped by pid."""
    home = tmp_path / "home"
    monkeypatch.setenv("REX_HOME", str(home))
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / "state"))
    yield home
    ran = set(runs.list_runs())
    left = procs.find(lambda env: env.get("REX_RUN") in ran)
    described = procs.describe(left)
    procs.kill(left)
    assert not left, f"processes left running: {described}"


def test_the_playbook_set() -> None:
    names = {p.stem for p in PLAYBOOKS}
    assert names >= {"quickstart", "webstack", "cluster", "jobs", "daemons"}
    assert {p.stem for p in PLAYBOOKS if is_local(p)} >= {"quickstart", "jobs", "daemons"}


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.stem)
def test_validates_and_plans(capsys: pytest.CaptureFixture[str], playbook: Path) -> None:
    assert main(["validate", str(playbook)]) == 0
    assert main(["plan", "--json", str(playbook)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    plan = json.loads(out[out.index("{") :])
    assert plan["steps"], "a playbook launches something"


def test_jobs_are_jobs() -> None:
    loaded = manifest.load(str(ROOT / "playbooks" / "jobs.yaml"))
    compiled = planner.compile(loaded)
    assert {s.kind for s in compiled.steps} == {"job"}
    assert [[s.program for s in w] for w in compiled.waves] == [["hostinfo", "migrate"], ["report"]]


def test_daemons_serve_http_after_their_probe(tmp_path: Path, home: Path) -> None:
    if not Path("/usr/share/doc").is_dir():
        pytest.skip("/usr/share/doc, the directory daemons.yaml serves, is missing")
    source = (ROOT / "playbooks" / "daemons.yaml").read_text()
    port = str(free_port())
    copy = tmp_path / "daemons.yaml"
    copy.write_text(source.replace(DAEMONS_PORT, port))
    (step,) = planner.compile(manifest.load(str(copy))).steps
    assert port in step.argv and step.ready.url == f"http://127.0.0.1:{port}/"
    events = tmp_path / "events.jsonl"
    argv = ["apply", "-y", str(copy), "--keys", str(tmp_path / "keys"), "--events", str(events)]
    code = main(argv)
    final = {}
    for line in events.read_text().splitlines():
        e = json.loads(line)
        if e["kind"] == "step":
            final[e["step"]] = e["state"]
    assert (code, final) == (0, {"docs@localhost": "ready"})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        assert response.status == 200
    state = procs.read_state(home, "docs")
    assert state["state"] == "running"
    agent, pid = int(str(state["agent"])), int(str(state["pid"]))
    procs.kill([agent], grace=5.0)
    assert procs.wait_until(lambda: not procs.alive(pid), 5.0), "the server outlived its agent"


def test_jobs_apply_and_report_their_exit_status_and_output(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = str(ROOT / "playbooks" / "jobs.yaml")
    code = main(["apply", "-y", jobs, "--keys", str(tmp_path / "keys"), "--json"])
    result = json.loads(capsys.readouterr().out)
    steps = {s["id"]: s for s in result["steps"]}
    assert code == 0, steps
    assert set(steps) == {"hostinfo@localhost", "migrate@localhost", "report@localhost"}
    assert all(s["status"] == 0 for s in steps.values()), steps
    assert "migrating indexes" in steps["migrate@localhost"]["output"]
    assert result["run"] in steps["report@localhost"]["output"]
