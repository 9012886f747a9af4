"""Every command in README.md's code blocks parses, and those that need no remote host run."""

from __future__ import annotations

import glob
import os
import re
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import helpers_procs as procs
import pytest

from rexplan.cli import rex as cli
from rexplan.cli import rex_key as keycli
from rexplan.core import manifest
from rexplan.engine import runs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: stands for any manifest the README names but the repository does not hold (site.yaml)
PLACEHOLDER = ROOT / "playbooks" / "webstack.yaml"
#: subcommands that touch no host; LOCAL ones too when all their manifest's hosts are local
OFFLINE = {"validate", "plan", "blame"}
LOCAL = {"apply", "stop"}
#: shell operators that separate commands on one line
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Command:
    """One command of a README code block: its words, and the line it was on."""

    line: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"README.md:{self.line}: {shlex.join(self.argv)}"


def readme_commands() -> list[Command]:
    """Commands that start with rex, rex_key, pip install or ./tests/run, in README order.

    Shell code blocks only (```sh, ```console, ```bash, or none); a ``$ `` prompt is dropped,
    ``# comments`` and the output lines of transcripts are ignored."""
    out: list[Command] = []
    fence: str | None = None
    for number, raw in enumerate(README.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence not in ("", "sh", "console", "bash", "shell"):
            continue
        text = stripped.removeprefix("$ ")
        if not re.match(r"(rex|rex_key|pip|\./tests/run)(\s|$)", text):
            continue
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word in SEPARATORS:
                if words and (words[0] != "pip" or words[1:2] == ["install"]):
                    out.append(Command(number, tuple(words)))
                words = []
            else:
                words.append(word)
    return out


COMMANDS = readme_commands()


def expand(argv: tuple[str, ...]) -> list[str]:
    """Globs expanded from the repository root; manifests the repository lacks replaced by
    PLACEHOLDER; relative paths made absolute."""
    out: list[str] = []
    for word in argv:
        if any(c in word for c in "*?[") and not word.startswith("-"):
            matches = sorted(glob.glob(str(ROOT / word)))
            out += matches or [word]
        elif re.fullmatch(r"[\w./-]+\.ya?ml", word):
            path = ROOT / word
            out.append(str(path if path.exists() else PLACEHOLDER))
        else:
            out.append(word)
    return out


def manifests(argv: list[str]) -> list[Path]:
    return [Path(w) for w in argv if w.endswith((".yaml", ".yml")) and Path(w).is_file()]


def is_local(path: Path) -> bool:
    return all(h.transport == "local" for h in manifest.load(str(path)).hosts)


def runs_offline(argv: list[str]) -> bool:
    """True for rex commands that contact no remote host."""
    if argv[0] != "rex":
        return False
    sub = next((w for w in argv[1:] if not w.startswith("-")), "")
    if sub in OFFLINE:
        return True
    found = manifests(argv)
    return sub in LOCAL and bool(found) and all(is_local(m) for m in found)


def test_the_readme_shows_commands() -> None:
    heads = {c.argv[0] for c in COMMANDS}
    assert heads >= {"rex", "rex_key", "pip", "./tests/run"}
    assert any(c.argv[:2] == ("rex", "blame") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_command_is_valid(command: Command) -> None:
    """Each command names a real subcommand and real options (argparse accepts it)."""
    argv = expand(command.argv)
    if argv[0] == "pip":
        target = argv[-1]
        assert (ROOT / target / "pyproject.toml").is_file(), f"{command}: nothing to install"
        return
    if argv[0] == "./tests/run":
        assert os.access(ROOT / "tests" / "run", os.X_OK), f"{command}: not executable"
        return
    parser = cli.build_parser() if argv[0] == "rex" else keycli.build_parser()
    if argv[0] == "rex_key":
        argv = [argv[0], *keycli.modernize(argv[1:])]
    try:
        parser.parse_args(argv[1:])
    except SystemExit as e:  # --help, --version
        assert e.code == 0, command


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The repository as the working directory, REX_HOME and the run store in tmp_path;
    whatever the commands started is stopped by pid afterwards."""
    home = tmp_path / "home"
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("REX_HOME", str(home))
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / "state"))
    yield tmp_path
    agents = []
    for record in (home / "run").glob("*.json"):
        agent = procs.read_state(home, record.stem).get("agent")
        if isinstance(agent, int) and procs.alive(agent):
            agents.append(agent)
    procs.kill(agents)
    ran = set(runs.list_runs())
    left = procs.find(lambda env: env.get("REX_RUN") in ran)
    described = procs.describe(left)
    procs.kill(left)
    assert not left, f"processes left running: {described}"


def test_offline_commands_run(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In README order, so `rex blame` reads the run the README's `rex apply` made."""
    offline = [(c, expand(c.argv)) for c in COMMANDS if runs_offline(expand(c.argv))]
    assert any(argv[1] == "apply" for _, argv in offline), "the README applies nothing locally"
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8765)) == 0:
            pytest.skip("127.0.0.1:8765, the quickstart store's port, is in use")
    for command, argv in offline:
        if "apply" in argv and "--keys" not in argv:
            argv = [*argv, "--keys", str(sandbox / "keys")]
        code = cli.main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, f"{command}: exit {code}\n{out}{err}"
        assert "Traceback" not in err
