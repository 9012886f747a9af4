"""`rex -v` / `-q`: what a local `rex apply` prints at each level, and the logging on stderr."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import helpers_procs as procs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexplan.cli import boundary
from rexplan.cli import rex as cli
from rexplan.engine import runs

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
    assert all(
        line.startswith("rex: rexplan.engine.callback: callback OK ref=") for line in handshakes
    )


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

    from rexplan.cli import ui

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


# --- host text on the terminal (security issue, hole 6) ----------------------------------------

#: what a hostile host may put in its words: C0 (a title set, the screen cleared), C1 (CSI as
#: U+009B, NEL U+0085), line and paragraph separators, bidi overrides and isolates
HOSTILE = (
    "\x1b]0;owned\x07\x1b[2J\x00\x7f"
    "\x9b31m\x85\x90\x9f"
    "\u2028\u2029"
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
BAD = {c for c in HOSTILE if not c.isprintable()}
assert len(BAD) == 19  # the 19 distinct controls above


def test_printable_escapes_every_control_and_bidi_character() -> None:
    from rexplan.core.text import LIMIT, printable

    shown = printable(HOSTILE, None)
    assert shown.isprintable() and not BAD & set(shown)
    assert shown.startswith("\\x1b]0;owned\\x07") and "\\x9b" in shown and "\\u202e" in shown
    assert "\\u2028" in shown and "\\x85" in shown
    # several lines: the newlines (and a command output's tabs) stay, nothing else does
    lines = printable(f"a\tb\n{HOSTILE}\n", None, keep="\n\t")
    assert lines.split("\n")[0] == "a\tb" and lines.count("\n") == 2
    assert not BAD & set(lines)
    # a huge text: bounded, says how much was cut, and costs one bounded pass
    huge = printable(HOSTILE * 100_000)
    assert len(huge) <= LIMIT and huge.isprintable()
    cut = re.search(r"\.\.\. \[(\d+) more characters\]\Z", huge)
    assert cut is not None and len(HOSTILE) * 99_000 < int(cut.group(1)) < len(HOSTILE) * 100_000
    assert printable(huge) == huge  # idempotent: a stored run shown again is unchanged
    assert printable("plain words", 20) == "plain words"


@settings(max_examples=300, deadline=None)
@given(text=st.text(), limit=st.integers(min_value=40, max_value=2000))
def test_printable_is_one_bounded_printable_line_for_any_text(text: str, limit: int) -> None:
    from rexplan.core.text import printable

    shown = printable(text, limit)
    assert shown.isprintable() and len(shown) <= limit
    assert printable(shown, limit) == shown
    several = printable(text, None, keep="\n")
    assert all(line.isprintable() for line in several.split("\n"))


#: a "python" on a hostile host: it answers the launch with a report whose reason is HOSTILE
HOSTILE_AGENT = """\
#!/usr/bin/python3 -I
import json, sys
if "--kill" in sys.argv or "--stop" in sys.argv:
    sys.exit(0)
print("rex-launch-ready", flush=True)
sys.stdin.readline()
reason = %(reason)s
print(json.dumps({"ok": False, "exit": 11, "reason": reason}), flush=True)
sys.exit(11)
"""


def test_a_hosts_reason_reaches_the_terminal_and_the_run_log_escaped_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "python3"
    fake.write_text(HOSTILE_AGENT % {"reason": repr(HOSTILE + "A" * 200_000)})
    fake.chmod(0o755)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "rex: 1\n"
        "defaults: {user: me, transport: local, timeouts: {start: 5, callback: 5}}\n"
        f"hosts:\n  localhost: {{transport: local, python: {fake}}}\n"
        "users:\n  me: {}\n"
        "programs:\n  app: {on: [localhost], run: [sleep, '60']}\n"
        "authorize: ['*.*.*']\n"
    )
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("REX_HOME", str(tmp_path / "home"))
    events = tmp_path / "events.jsonl"
    argv = ["apply", "-y", str(manifest), "--keys", str(tmp_path / "keys")]
    code = cli.main([*argv, "--events", str(events)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "reason=start_failed" in out and "\\x1b]0;owned\\x07" in out and "\\u202e" in out
    for text in (out, err):
        assert not BAD & set(text)
        assert len(text) < 5_000
    # JSON escapes every control; the event files need only be bounded
    assert all(len(line) < 5_000 for line in events.read_text().splitlines())
    stored = [e for e in runs.load_run()[1] if e.state == "failed"]
    assert stored and all(not BAD & set(e.detail or "") for e in stored)
    assert all(len(e.detail or "") <= 2_000 for e in stored)


def test_every_path_of_host_text_to_the_terminal_escapes_and_bounds_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from rexplan.cli import rex_key as keycli
    from rexplan.engine import adhoc
    from rexplan.errors import TransportError
    from rexplan.trust.distribute import HostReport, KeyAction

    words = HOSTILE + "B" * 100_000
    shown: list[str] = []
    # rex run: a host's output keeps its lines and tabs, loses its controls
    output = f"line 1\tx\n{HOSTILE}\nline 3\n"
    results = [adhoc.Outcome("h1", 0, output), adhoc.Outcome("h2", None, "", words, 2)]
    folded = adhoc.format_folded(results)
    assert "line 1\tx\n" in folded and "\nline 3\n" in folded
    shown.append(folded)
    # an error quoting a host, at the error boundary
    shown.append(boundary.format_error(TransportError(words, host="h1", phase="exec", hint=words)))
    # rex_key distribute's per-host lines
    action = KeyAction("h1.app", "abc", words, "replaced", words)
    shown.append(keycli.format_host_report(HostReport("h1", "app", (action,)), dry_run=False))
    shown.append(keycli.format_host_report(HostReport("h1", "app", error=words), dry_run=False))
    # a log record (the callback listener's lines name peers) on stderr
    with cli._logging_to_stderr(0, False):
        logging.getLogger("rexplan.test").warning("peer said %s", words)
    shown.append(capsys.readouterr().err)
    for text in shown:
        assert not BAD & set(text), text[:200]
        assert len(text) < 12_000
