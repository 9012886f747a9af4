"""`rex completion`: the bash and zsh scripts, driven in real shells, and `--names`."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from rexplan.cli import completion
from rexplan.cli import rex as cli
from rexplan.cli import rex_key as keycli

MANIFEST = """\
rex: 1
hosts:
  web1: {address: 127.0.0.11, groups: [web]}
  web2: {address: 127.0.0.12, groups: [web]}
  db1: {address: 127.0.0.10, groups: [db]}
users:
  app: {}
programs:
  db: {on: [db1], run: [db-server]}
  site: {on: ["group:web"], run: [site], requires: [db]}
authorize: ["*.app.*"]
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory with a manifest, a broken one, another file, and `rex` on a bin dir."""
    (tmp_path / "site.yaml").write_text(MANIFEST)
    (tmp_path / "broken.yaml").write_text("rex: 1\nhosts: [\n")
    (tmp_path / "notes.txt").write_text("not a manifest\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rex = bin_dir / "rex"
    code = "import sys; from rexplan.cli.rex import main; sys.exit(main())"
    rex.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n')
    rex.chmod(0o755)
    return tmp_path


def _env(workdir: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    path = f"{workdir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "HOME": str(workdir)}


# --- bash ---------------------------------------------------------------------------------------


def bash_complete(workdir: Path, *lines: Sequence[str]) -> list[list[str]]:
    """COMPREPLY for each command line (its last word is completed), in one bash process."""
    script = workdir / "rex.bash"
    script.write_text(completion.script("bash", cli.parsers()))
    body = [f"source {shlex.quote(str(script))}"]
    for words in lines:
        body += [
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
            f"COMP_CWORD={len(words) - 1}",
            "COMPREPLY=()",
            "_rex",
            "printf '%s\\n' \"${COMPREPLY[@]}\"",
            "echo '--'",
        ]
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", "\n".join(body)],
        cwd=workdir,
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout.split("--\n")
    return [sorted(filter(None, chunk.splitlines())) for chunk in out[: len(lines)]]


def test_bash_script_parses() -> None:
    proc = subprocess.run(
        ["bash", "-n"],
        input=completion.script("bash", cli.parsers()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_bash_completes_commands_options_and_values(workdir: Path) -> None:
    got = bash_complete(
        workdir,
        ["rex", "pl"],
        ["rex", "plan", "--li"],
        ["rex", "plan", "site.yaml", "--limit", ""],
        ["rex", "plan", "site.yaml", "--limit", "web1,gr"],
        ["rex", "hostkeys", ""],
        ["rex", "completion", ""],
        ["rex", "plan", ""],
        ["rex", "import", "ansible", "--f"],
    )
    assert got == [
        ["plan"],
        ["--limit"],
        ["db1", "group:db", "group:web", "web1", "web2"],
        ["web1,group:db", "web1,group:web"],
        ["scan", "verify"],
        ["bash", "zsh"],
        ["bin", "broken.yaml", "site.yaml"],
        ["--force"],
    ]


def test_bash_names_come_from_the_manifest_named_by_option(workdir: Path) -> None:
    got = bash_complete(
        workdir,
        ["rex", "hostkeys", "scan", "-m", "site.yaml", "--replace", "w"],
        ["rex_key", "create", "--manifest=site.yaml", "--program", ""],
        ["rex", "audit", "broken.yaml", "--limit", ""],
        ["rex", "plan", "--limit", ""],
    )
    assert got == [["web1", "web2"], ["db", "site"], [], []]


def test_bash_words_split_at_colon_and_equals(workdir: Path) -> None:
    # bash splits `group:we` and `--limit=we` at COMP_WORDBREAKS; the reply replaces only the
    # last piece
    got = bash_complete(
        workdir,
        ["rex", "plan", "site.yaml", "--limit", "group", ":", "w"],
        ["rex", "plan", "site.yaml", "--limit", "=", "we"],
    )
    assert got == [["web"], ["web1", "web2"]]


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], set[str]]]:
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    yield path, {s for a in shown for s in a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_bash_offers_exactly_the_options_argparse_knows(workdir: Path) -> None:
    everything = [*commands(cli.build_parser(), ("rex",))]
    everything += commands(keycli.build_parser(), ("rex_key",))
    got = bash_complete(workdir, *([*path, "-"] for path, _ in everything))
    for (path, options), offered in zip(everything, got, strict=True):
        assert set(offered) == options, " ".join(path)


# --- --names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("hosts", "web1\nweb2\ndb1\n"),
        ("groups", "web\ndb\n"),
        ("programs", "db\nsite\n"),
        ("limit", "web1\nweb2\ndb1\ngroup:web\ngroup:db\n"),
    ],
)
def test_names(workdir: Path, kind: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", "--names", kind, str(workdir / "site.yaml")]) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("name", ["broken.yaml", "missing.yaml"])
def test_names_of_a_bad_manifest_print_nothing(
    workdir: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["completion", "--names", "hosts", str(workdir / name)]) == 4
    assert capsys.readouterr() == ("", "")


def test_completion_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion"]) == 5
    assert cli.main(["completion", "fish"]) == 5
    assert cli.main(["completion", "--names", "users", "x.yaml"]) == 5
    assert "rex: error:" in capsys.readouterr().err


def test_the_scripts_are_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", "bash"]) == 0
    assert "complete -F _rex rex rex_key" in capsys.readouterr().out
    assert cli.main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("#compdef rex rex_key\n")


# --- zsh ----------------------------------------------------------------------------------------

ZSH = shutil.which("zsh")
needs_zsh = pytest.mark.skipif(ZSH is None, reason="zsh is not installed")

# stand-ins for the completion system's builtins and functions: print what would be offered
_ZSH_STUBS = r"""
compdef() { : }
compset() { [[ $1 == -P && $PREFIX == ${~2} ]] && PREFIX=${PREFIX##${~2}} }
compadd() { shift ${@[(i)--]}; print -rl -- $@ }
_describe() { print -rl -- ${(P)${@[-1]}} }
_files() { print -r -- "_files $*" }
"""


def zsh_complete(workdir: Path, *lines: Sequence[str]) -> list[list[str]]:
    script = workdir / "_rex"
    script.write_text(completion.script("zsh", cli.parsers()))
    body = [_ZSH_STUBS, f"source {shlex.quote(str(script))}"]
    for words in lines:
        body += [
            f"words=({' '.join(shlex.quote(w) for w in words)})",
            f"CURRENT={len(words)}",
            f"PREFIX={shlex.quote(words[-1])}",
            "_rex",
            "print -- --",
        ]
    assert ZSH is not None
    proc = subprocess.run(
        [ZSH, "-f", "-c", "\n".join(body)],
        cwd=workdir,
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout.split("--\n")
    return [sorted(filter(None, chunk.splitlines())) for chunk in out[: len(lines)]]


@needs_zsh
def test_zsh_script_parses() -> None:
    assert ZSH is not None
    proc = subprocess.run(
        [ZSH, "-n"],
        input=completion.script("zsh", cli.parsers()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


@needs_zsh
def test_zsh_completes_commands_options_and_values(workdir: Path) -> None:
    got = zsh_complete(
        workdir,
        ["rex", "hostkeys", ""],
        ["rex", "plan", "--"],
        ["rex", "plan", "site.yaml", "--limit", ""],
        ["rex_key", "create", "-m", "site.yaml", "--program", ""],
        ["rex", "completion", ""],
        ["rex", "validate", "site.yaml", ""],
    )
    assert got[0] == [
        "scan:show each host's key fingerprint; pin new keys with --accept",
        "verify:check that every host's key is pinned and unchanged",
    ]
    assert (
        "--limit:only steps on matching hosts: comma-separated host globs and group:NAME"
        in (got[1])
    )
    assert got[2:] == [
        ["db1", "group:db", "group:web", "web1", "web2"],
        ["db", "site"],
        ["bash", "zsh"],
        ["_files -g *.(yaml|yml)"],
    ]
