"""`rex -v` / `-q`: what a local `rex apply` prints at each level, and the logging on stderr."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import helpers_procs as procs
import pytest

from rexplan import cli, runs

#: two waves of sleepers on this machine; the tag finds what a test started
MANIFEST = """\
rex: 1
defaults: {user: me, transport: local, stop_timeout: 1, timeouts: {start: 5, callback: 5}}
hosts:
  localhost: {transport: local}
users:
  me: {}
programs:
  first: {on: [localhost], run: [sleep, "60"], ready: {alive: 0.1}, env: {REXTEST: "%(tag)s"}}
  second:
    on: [localhost]
    requires: [first]
    run: [sleep, "60"]
    ready: {alive: 0.1}
    env: {REXTEST: "%(tag)s"}
authorize: ["*.*.*"]
"""

#: ANSI escape sequences (CSI and others); the plain output has none
ESCAPE = re.compile(r"\x1b[\[\]()#;?]*[0-9;]*[A-Za-z]?")

Apply = Callable[..., tuple[int, str, str]]


@pytest.fixture
def apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Apply]:
    """``apply(*global_options, *apply_options)``: one `rex apply` of MANIFEST, each in a fresh
    REX_HOME; (exit code, stdout, stderr). Everything started is stopped by pid afterwards."""
    tag = secrets.token_hex(8)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST % {"tag": tag})
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / "state"))
    homes: list[Path] = []

    def run(*options: str) -> tuple[int, str, str]:
        home = tmp_path / f"home{len(homes)}"
        homes.append(home)
        monkeypatch.setenv("REX_HOME", str(home))
        split = options.index("apply") if "apply" in options else len(options)
        argv = [*options[:split], "apply", "-y", str(manifest), *options[split + 1 :]]
        code = cli.main([*argv, "--keys", str(tmp_path / "keys")])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    yield run
    agents = []
    for home in homes:
        for record in (home / "run").glob("*.json"):
            state = procs.read_state(home, record.stem)
            if isinstance(state.get("agent"), int):
                agents.append(int(str(state["agent"])))
    procs.kill(a for a in agents if procs.alive(a))
    ran = set(runs.list_runs())
    left = procs.find(lambda env: env.get("REXTEST") == tag or env.get("REX_RUN") in ran)
    described = procs.describe(left)
    procs.kill(left)
    assert not left, f"processes left running: {described}"


def states(out: str) -> list[str]:
    """The word of each timed line but notices (keys created on first use): ``WAVE``, or the
    state of a step line ``[   0.12s] READY       first@localhost ...``."""
    words = [m.group(1) for m in re.finditer(r"^\[ *[0-9.]+s\] (\S+) ", out, re.M)]
    return [w for w in words if w != "NOTICE"]


def test_default_output_is_plain_lines(apply: Apply) -> None:
    code, out, err = apply("apply")
    assert code == 0, err
    assert states(out) == ["WAVE", "READY", "WAVE", "READY"]
    assert "localhost  started=2" in out.splitlines()
    assert not ESCAPE.search(out) and "\r" not in out
    assert "callback OK" not in err


def test_verbose_shows_every_state_change(apply: Apply) -> None:
    code, out, _ = apply("-v", "apply")
    assert code == 0
    steps = [s for s in states(out) if s != "WAVE"]
    assert steps == ["CONNECTING", "STARTING", "AWAITING-CALLBACK", "READY"] * 2


def test_vv_logs_the_callback_handshakes(apply: Apply) -> None:
    code, _, err = apply("-vv", "apply")
    assert code == 0
    handshakes = [line for line in err.splitlines() if "callback OK" in line]
    assert len(handshakes) == 2
    assert all(line.startswith("rex: rexplan.callback: callback OK ref=") for line in handshakes)


@pytest.mark.parametrize("where", ["global", "apply"])
def test_quiet_prints_only_the_summary(apply: Apply, where: str) -> None:
    code, out, _ = apply(*(["-q", "apply"] if where == "global" else ["apply", "-q"]))
    assert code == 0
    assert states(out) == []
    assert out.splitlines()[-1].startswith("1 host(s), 2 step(s):")


def test_quiet_still_shows_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MANIFEST % {"tag": "x"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("rex: 2\n")
    assert cli.main(["-q", "validate", str(good), str(bad)]) == 4
    out, err = capsys.readouterr()
    assert out == "" and str(bad) in err
    assert cli.main(["validate", str(good)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_verbose_and_quiet_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-v", "-q", "blame"]) == 5
    assert "not allowed with argument" in capsys.readouterr().err


def test_host_progress_shows_a_bar_on_a_terminal_and_lines_everywhere() -> None:
    import io

    from rexplan import ui

    tty = io.StringIO()
    console = ui.Console(file=tty, force_terminal=True, width=80, color_system=None)
    with ui.HostProgress(console, 2, "distributing keys") as progress:
        progress.host_done("h1 as app: 1 changed, 0 unchanged")
        progress.host_done("h2 as app: 0 changed, 1 unchanged")
    text = tty.getvalue()
    assert "distributing keys" in text and "2/2" in text
    assert "h1 as app: 1 changed" in text and "h2 as app: 0 changed" in text

    plain = io.StringIO()
    console = ui.Console(file=plain, force_terminal=False, width=80)
    with ui.HostProgress(console, 2, "distributing keys") as progress:
        progress.host_done("h1 as app: 1 changed, 0 unchanged")
    assert plain.getvalue() == "h1 as app: 1 changed, 0 unchanged\n"
