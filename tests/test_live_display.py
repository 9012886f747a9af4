"""The live `rex apply` display as a person sees it: driven in an 80x30 tmux, read back."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import helpers_procs as procs
import pytest
from rich.cells import cell_len

from rexplan.engine import runs

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 80, 30

#: three waves on this machine; `broken` exits at once, so one failure line shows too
MANIFEST = """\
rex: 1
defaults: {user: me, transport: local, stop_timeout: 1, timeouts: {start: 5, callback: 5}}
hosts:
  localhost: {transport: local}
users:
  me: {}
programs:
  db: {on: [localhost], run: [sleep, "60"], ready: {alive: 0.1}, env: {REXTEST: "%(tag)s"}}
  app:
    {on: [localhost], requires: [db], run: [sleep, "60"], ready: {alive: 0.1},
     env: {REXTEST: "%(tag)s"}}
  broken:
    {on: [localhost], requires: [db], run: [sh, -c, "exit 3"], ready: {alive: 1},
     env: {REXTEST: "%(tag)s"}}
  lb:
    {on: [localhost], requires: [app], run: [sleep, "60"], ready: {alive: 0.1},
     env: {REXTEST: "%(tag)s"}}
authorize: ["*.*.*"]
"""

#: SGR sequences that set a colour (foreground or background, 16, 256 or true colour)
COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-7]|4[0-7]|9[0-7]|10[0-7]|[34]8;[0-9;]+)m")


@dataclass
class Tmux:
    """A private tmux server (its own socket directory and name), stopped by its pid."""

    base: list[str]
    env: dict[str, str]
    pid: int = 0

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [*self.base, *args], env=self.env, capture_output=True, text=True, timeout=10
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self, *, escapes: bool = False) -> str:
        """The whole pane, history included, wrapped lines joined back (-J)."""
        return self("capture-pane", "-p", "-J", "-S", "-", *(["-e"] if escapes else []))


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    sockets = tmp_path / "t"
    sockets.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
    env.update(TMUX_TMPDIR=str(sockets), PS1="$ ")
    server = Tmux(["tmux", "-L", f"rex{secrets.token_hex(4)}", "-f", "/dev/null"], env)
    server("new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), "-s", "main", "sh")
    server.pid = int(server("display-message", "-p", "#{pid}").strip())
    try:
        yield server
    finally:
        procs.kill([server.pid])


def stop_everything(home: Path, tag: str) -> None:
    """Stop each supervised program through its agent's pid, then anything else tagged."""
    agents = []
    for record in (home / "run").glob("*.json"):
        agent = procs.read_state(home, record.stem).get("agent")
        if isinstance(agent, int) and procs.alive(agent):
            agents.append(agent)
    procs.kill(agents)
    ran = set(runs.list_runs())
    left = procs.find(lambda env: env.get("REXTEST") == tag or env.get("REX_RUN") in ran)
    described = procs.describe(left)
    procs.kill(left)
    assert not left, f"processes left running: {described}"


def run_in_tmux(tmux: Tmux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    """Type a `rex apply` into the pane, as a person would in the manifest's directory, and
    wait for it to end; the pane's text with escapes."""
    tag = secrets.token_hex(8)
    (tmp_path / "m.yaml").write_text(MANIFEST % {"tag": tag})
    home = tmp_path / "home"
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / ".rex"))  # for stop_everything
    exports = {"REX_HOME": str(home), "PYTHONPATH": str(ROOT), **env}
    rex = [sys.executable, "-c", "import sys; from rexplan.cli.rex import main; sys.exit(main())"]
    script = tmp_path / "go"
    script.write_text(
        f"cd {shlex.quote(str(tmp_path))}\n"
        + "unset REX_STATE_DIR\n"
        + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
        + shlex.join([*rex, "apply", "-y", "m.yaml", "--keys", "keys"])
        + '\necho "REX-EXIT $?"\n'
    )
    try:
        tmux("send-keys", "-t", "main", "-l", f"sh {shlex.quote(str(script))}")
        tmux("send-keys", "-t", "main", "Enter")
        end = time.monotonic() + 60
        while "REX-EXIT" not in tmux.screen() and time.monotonic() < end:
            time.sleep(0.2)
        return tmux.screen(escapes=True)
    finally:
        stop_everything(home, tag)


def plain(screen: str) -> str:
    return re.sub(r"\x1b\[[0-9;:]*m", "", screen)


def test_apply_reads_well_at_80_columns(
    tmux: Tmux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = run_in_tmux(tmux, tmp_path, monkeypatch)
    text = plain(screen)
    lines = [line.rstrip() for line in text.splitlines()]
    assert "REX-EXIT 2" in lines, text  # `broken` failed
    assert "\x1b" not in text and not re.search(r"\[[0-9;]+m", text), text
    long = [line for line in lines if cell_len(line) > WIDTH]
    assert not long, "lines wider than the terminal:\n" + "\n".join(long)
    # each wave's bar, finished, with its known total and counts
    assert re.search(r"^wave 0 .*\b1/1\b.*ready:1", text, re.M), text
    assert re.search(r"^wave 1 .*\b2/2\b.*ready:1 failed:1", text, re.M), text
    assert re.search(r"^wave 2 .*\b1/1\b.*ready:1", text, re.M), text
    # the failure is spelled out once, and the summary has the host's row and the totals
    failures = [line for line in lines if "FAILED" in line]
    assert len(failures) == 1 and "broken@localhost" in failures[0], text
    assert any(line.split()[:1] == ["localhost"] for line in lines), text
    assert re.search(r"^1 host\(s\), 4 step\(s\):.* 1 failed", text, re.M), text
    # a terminal gets colour: the failure line is red
    assert COLOUR.search(screen), screen


def test_no_color_is_honoured(tmux: Tmux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = run_in_tmux(tmux, tmp_path, monkeypatch, NO_COLOR="1")
    assert "REX-EXIT 2" in plain(screen), screen
    assert not COLOUR.search(screen), screen
