"""`rex` command-line tests through main([...]): exit codes, output and the error boundary."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from rexplan import __version__
from rexplan.cli import rex as cli
from rexplan.cli import ui
from rexplan.core import manifest
from rexplan.core import plan as planner
from rexplan.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = sorted((ROOT / "playbooks").glob("*.yaml"))
QUICKSTART = str(ROOT / "playbooks" / "quickstart.yaml")

BAD = """\
rex: 1
hosts:
  h1: {address: 127.0.0.1}
users:
  app: {}
programs:
  a:
    on: [h2]
    user: app
    run: [x]
    requires: [b]
  b:
    on: [h1]
    user: app
    run: [x]
    requires: [a]
authorize: ["*.*.*"]
"""

GOOD = """\
rex: 1
hosts:
  db1: {address: 127.0.0.10, groups: [db]}
  web1: {address: 127.0.0.11, groups: [web]}
  web2: {address: 127.0.0.12, groups: [web]}
users:
  app: {}
programs:
  db:
    on: [db1]
    user: app
    run: [db-server, --port, "5432"]
    ready: {tcp: 5432}
  web:
    on: [group:web]
    user: app
    requires: [db]
    run: [web-server]
authorize: ["*.app.*"]
"""


@pytest.fixture(autouse=True)
def _state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # internal-error logs must land in the test's directory, never in the real ~/.local/state
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.name)
def test_playbooks_validate(capsys: pytest.CaptureFixture[str], playbook: Path) -> None:
    code, out, err = run(capsys, "validate", str(playbook))
    assert (code, err) == (0, "")
    assert out.startswith(f"ok: {playbook} (")


def test_playbooks_exist() -> None:
    assert {p.name for p in PLAYBOOKS} >= {"quickstart.yaml", "webstack.yaml", "cluster.yaml"}


def test_validate_counts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "good.yaml", GOOD)
    code, out, _ = run(capsys, "validate", path)
    assert code == 0
    assert out == f"ok: {path} (3 hosts, 2 programs, 3 steps)\n"


def test_validate_bad_prints_every_diagnostic(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, "bad.yaml", BAD)
    code, out, err = run(capsys, "validate", path)
    assert code == 4
    assert out == ""
    lines = err.splitlines()
    assert f"{path}:8:10: programs.a.on.0: unknown host 'h2'" in lines
    assert f"{path}:11:15: programs.a.requires: requires cycle: a -> b -> a" in lines
    assert lines[-1] == f"rex: error: 2 errors in {path}"


def test_validate_many_files_reports_each(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = write(tmp_path, "bad.yaml", BAD)
    good = write(tmp_path, "good.yaml", GOOD)
    code, out, err = run(capsys, "validate", bad, good)
    assert code == 4
    assert out == f"ok: {good} (3 hosts, 2 programs, 3 steps)\n"
    assert f"rex: error: 2 errors in {bad}" in err


def test_missing_file_is_a_manifest_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = str(tmp_path / "nope.yaml")
    for command in ("validate", "plan"):
        code, out, err = run(capsys, command, path)
        assert code == 4
        assert out == ""
        assert f"{path}:1:1: cannot read the manifest: No such file or directory" in err
        assert err.endswith(f"rex: error: 1 error in {path}\n")


# --------------------------------------------------------------------------- plan


def test_plan_plain_lines(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "plan", write(tmp_path, "m.yaml", GOOD))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "wave 0  db@db1    db1.app.db    ready=tcp:5432  argv=db-server --port 5432",
        "wave 1  web@web1  web1.app.web  ready=alive:0.5s  argv=web-server",
        "wave 1  web@web2  web2.app.web  ready=alive:0.5s  argv=web-server",
        "3 steps in 2 waves on 3 hosts",
    ]


#: GOOD with web placed on the least loaded 2 of its 3 hosts
LEAST_LOADED = GOOD.replace(
    "  web2: {address: 127.0.0.12, groups: [web]}\n",
    "  web2: {address: 127.0.0.12, groups: [web]}\n  web3: {address: 127.0.0.13, groups: [web]}\n",
).replace(
    "    run: [web-server]\n",
    "    run: [web-server]\n    placement: {strategy: least-loaded, count: 2}\n",
)


def test_plan_plain_lines_mark_least_loaded_candidates(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, "m.yaml", LEAST_LOADED)
    code, out, err = run(capsys, "plan", path)
    assert (code, err) == (0, "")
    mark = "placement=least-loaded 2 of 3 (chosen at apply)"
    assert out.splitlines() == [
        "wave 0  db@db1    db1.app.db    ready=tcp:5432  argv=db-server --port 5432",
        f"wave 1  web@web1  web1.app.web  ready=alive:0.5s  {mark}  argv=web-server",
        f"wave 1  web@web2  web2.app.web  ready=alive:0.5s  {mark}  argv=web-server",
        f"wave 1  web@web3  web3.app.web  ready=alive:0.5s  {mark}  argv=web-server",
        "4 steps in 2 waves on 4 hosts",
    ]
    # a limit leaves fewer candidates than the count: apply starts them all
    code, out, _ = run(capsys, "plan", "--limit", "web3", path)
    assert out.splitlines()[0].endswith(
        "placement=least-loaded 1 of 1 (chosen at apply)  argv=web-server"
    )


def test_plan_table_has_a_placement_column_only_for_least_loaded_plans() -> None:
    def table(text: str) -> str:
        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=True, width=120, color_system=None)
        loaded = manifest.loads(text, "m.yaml")
        ui.print_plan(planner.compile(loaded), loaded, console)
        return buffer.getvalue()

    plain = table(GOOD)
    assert "placement" not in plain and "least-loaded" not in plain
    marked = table(LEAST_LOADED)
    header = next(line for line in marked.splitlines() if "triple" in line)
    assert header.split("┃")[-2].strip() == "placement"
    rows = [line for line in marked.splitlines() if "web@" in line or ".app." in line]
    assert [r.count("least-loaded 2 of 3") for r in rows] == [0, 1, 1, 1]
    assert "4 steps in 2 waves on 4 hosts; least-loaded hosts are chosen at apply" in marked
    assert all(len(line) <= 120 for line in marked.splitlines())


def test_plan_json_lists_least_loaded_candidates(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "plan", "--json", write(tmp_path, "m.yaml", LEAST_LOADED))
    assert code == 0
    data = json.loads(out)
    assert data["placements"] == [
        {
            "program": "web",
            "strategy": "least-loaded",
            "count": 2,
            "steps": ["web@web1", "web@web2", "web@web3"],
        }
    ]
    # every candidate is a step of the plan; apply picks among them
    assert [s["id"] for s in data["steps"]][1:] == data["placements"][0]["steps"]


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.name)
def test_playbooks_plan(capsys: pytest.CaptureFixture[str], playbook: Path) -> None:
    code, out, _ = run(capsys, "plan", str(playbook))
    assert code == 0
    assert out.startswith("wave 0  ")


def test_plan_table_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(ui, "make_console", lambda: console)
    code, out, _ = run(capsys, "plan", QUICKSTART)
    assert (code, out) == (0, "")
    table = buffer.getvalue()
    for text in ("wave", "triple", "localhost.me.store", "localhost.me.worker", "alive:1s"):
        assert text in table
    assert "2 steps in 2 waves on 1 host" in table
    assert all(len(line) <= 120 for line in table.splitlines())


def test_plan_table_keeps_manifest_text_literal() -> None:
    # manifest strings are data: rich markup stays as typed, control characters are escaped
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, color_system=None)
    text = GOOD.replace("[web-server]", '["[bold]x[/bold]", "a\\nb\\x1b[31m"]')
    loaded = manifest.loads(text, "m.yaml")
    ui.print_plan(planner.compile(loaded), loaded, console)
    table = buffer.getvalue()
    assert "'[bold]x[/bold]'" in table
    assert "'a\\nb\\x1b[31m'" in table
    assert "\x1b" not in table


def test_plan_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", GOOD)
    code, out, _ = run(capsys, "plan", "--json", path)
    assert code == 0
    data = json.loads(out)
    assert list(data) == list(planner.PLAN_KEYS)
    assert data["placements"] == []
    assert data["rex"] == __version__
    assert data["format"] == 1
    assert data["manifest"] == path
    assert len(data["manifest_digest"]) == 64
    assert [w["steps"] for w in data["waves"]] == [["db@db1"], ["web@web1", "web@web2"]]
    step = data["steps"][0]
    assert {"id", "wave", "host", "address", "login", "user", "program", "triple", "argv"} <= set(
        step
    )
    assert step["triple"] == "db1.app.db"
    assert step["ready"]["kind"] == "tcp"
    assert step["ready"]["port"] == 5432


def test_plan_json_with_limit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "plan", "--json", "--limit", "web2", write(tmp_path, "m.yaml", GOOD))
    assert code == 0
    data = json.loads(out)
    assert data["limit"] == "web2"
    assert data["waves"] == [{"wave": 1, "programs": ["web"], "steps": ["web@web2"]}]


def test_plan_dot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "plan", "--dot", write(tmp_path, "m.yaml", GOOD))
    assert code == 0
    assert out.startswith("digraph rex {")
    assert '"db" -> "web";' in out


def test_limit_matching_nothing_exits_4(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", GOOD)
    code, out, err = run(capsys, "plan", "--limit", "mail*", path)
    assert code == 4
    assert out == ""
    assert f"{path}: --limit 'mail*' matches no host in the manifest" in err
    assert "  hint: use host names, globs like 'web*' or group:NAME" in err


def test_plan_of_bad_manifest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", BAD)
    code, out, err = run(capsys, "plan", path)
    assert (code, out) == (4, "")
    assert f"{path}:11:15: programs.a.requires: requires cycle: a -> b -> a" in err


# --------------------------------------------------------------------------- usage


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"rex {__version__}\n", "")


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"], ["validate", "-h"]])
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert out.startswith("usage: rex")
    assert "130  interrupted" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["launch"], "invalid choice"),
        (["plan"], "the following arguments are required: MANIFEST"),
        (["validate"], "the following arguments are required: MANIFEST"),
        (["plan", "--json", "--dot", "m.yaml"], "not allowed with argument"),
        (["plan", "m.yaml", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_usage_errors_exit_5(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (5, "")
    assert err.startswith("rex: error: ")
    assert message in err
    assert "  hint: run 'rex" in err


# --------------------------------------------------------------------------- error boundary


def test_internal_error_logs_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(planner, "compile", boom)
    code, out, err = run(capsys, "plan", QUICKSTART)
    assert (code, out) == (1, "")
    assert err.startswith("rex: internal error: RuntimeError: boom (traceback in ")
    logs = list((tmp_path / "state" / "rex").glob("rex-internal-error-*.log"))
    assert len(logs) == 1
    assert str(logs[0]) in err
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: boom" in text


def test_rex_error_prints_message_and_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise UsageError("nope", hint="try again")

    monkeypatch.setattr(planner, "compile", refuse)
    assert run(capsys, "plan", QUICKSTART) == (5, "", "rex: error: nope\n  hint: try again\n")


def test_keyboard_interrupt_exits_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(planner, "compile", interrupt)
    assert run(capsys, "plan", QUICKSTART) == (130, "", "rex: interrupted\n")


def test_closed_pipe_is_quiet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def closed(*args: object, **kwargs: object) -> None:
        raise BrokenPipeError

    monkeypatch.setattr(ui, "print_plan", closed)
    assert run(capsys, "plan", QUICKSTART) == (141, "", "")
