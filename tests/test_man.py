"""Man pages: they render without warnings, and document every command, option, manifest key
and JSON key the code has (and no option it lacks), so they cannot drift from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rexplan.cli import blame
from rexplan.cli import rex as cli
from rexplan.cli import rex_key as keycli
from rexplan.core import manifest, spec
from rexplan.core import plan as planner
from rexplan.core.model import Host
from rexplan.engine import events, lifecycle, outcomes
from rexplan.trust import audit, hostkeys
from rexplan.trust.keys import KeyInfo

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = ("rex.1", "rex_key.1", "rex-manifest.5", "rex.7")
SCHEMA = ROOT / "rexplan" / "resources" / "manifest.schema.json"
HELP = {"-h", "--help"}

# --- reading roff -----------------------------------------------------------------------------

_ESCAPES = [
    (r"\-", "-"),
    (r"\(dq", '"'),
    (r"\(aq", "'"),
    (r"\(bu", "*"),
    (r"\&", ""),
    (r"\fB", ""),
    (r"\fI", ""),
    (r"\fR", ""),
    (r"\fP", ""),
    (r"\e", "\\"),
]
_OPTION = re.compile(r"(?:^|[\s,\[|({])(--?[A-Za-z0-9][A-Za-z0-9-]*)")


def plain(text: str) -> str:
    """Roff text without the escapes the pages use."""
    for escape, char in _ESCAPES:
        text = text.replace(escape, char)
    return text


def macro_text(line: str) -> str:
    """The words a macro line shows: ``.BI --limit " pattern"`` is ``--limit pattern``."""
    if line.startswith("."):
        line = line.split(None, 1)[1] if " " in line else ""
    return plain(line).replace('"', "")


@dataclasses.dataclass
class Section:
    """An ``.SH`` (and ``.SS`` within it) with its lines."""

    sh: str
    ss: str
    lines: list[str]

    def items(self) -> list[str]:
        """The tag line of each ``.TP`` item, as shown."""
        return [
            macro_text(self.lines[i + 1])
            for i, line in enumerate(self.lines[:-1])
            if line.startswith(".TP")
        ]

    def text(self) -> str:
        return plain("\n".join(self.lines))


def sections(page: str) -> list[Section]:
    """The sections of a page, in order; ``ss`` is "" for the text before any ``.SS``."""
    found: list[Section] = []
    sh = ""
    for line in (MAN / page).read_text(encoding="utf-8").splitlines():
        if line.startswith(".SH "):
            sh = macro_text(line)
            found.append(Section(sh, "", []))
        elif line.startswith(".SS "):
            found.append(Section(sh, macro_text(line), []))
        elif found:
            found[-1].lines.append(line)
    return found


def section(page: str, sh: str, ss: str = "") -> Section:
    for s in sections(page):
        if s.sh == sh and s.ss == ss:
            return s
    raise AssertionError(f"man/{page} has no section {sh!r} {ss!r}")


def item_options(items: list[str]) -> set[str]:
    return {m for item in items for m in _OPTION.findall(item)}


# --- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_warnings(page: str) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (tests/run installs groff-base)")
    proc = subprocess.run(
        [groff, "-man", "-ww", "-z", str(MAN / page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stderr == ""


@pytest.mark.parametrize("page", PAGES)
def test_page_has_the_usual_sections(page: str) -> None:
    names = [s.sh for s in sections(page) if not s.ss]
    assert names[:2] == ["NAME", "SYNOPSIS"] or names[:2] == ["NAME", "DESCRIPTION"]
    assert "SEE ALSO" in names
    text = (MAN / page).read_text(encoding="utf-8")
    number = page.rsplit(".", 1)[1]
    assert re.search(rf"^\.TH \S+ {number} ", text, re.MULTILINE)


# --- options: argparse against the pages --------------------------------------------------------


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, bool]]:
    """(command path, its parser, whether it has subcommands), parents first."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield path, parser, bool(subs)
    for action in subs:
        for name, sub in action.choices.items():
            yield from walk(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def option_problems(page: str, prog: str, parser: argparse.ArgumentParser) -> list[str]:
    """Every way ``page`` and ``parser`` disagree: a command without its section under
    COMMANDS, an option not in an item of its command's section (or of an ancestor's, for an
    option the ancestor has too; the top level's is OPTIONS), and the reverse."""
    commands = {path: (p, has_subs) for path, p, has_subs in walk(parser, (prog,))}
    documented: dict[tuple[str, ...], set[str]] = {}
    problems = []
    for s in sections(page):
        if s.sh == "OPTIONS" and not s.ss:
            documented[(prog,)] = item_options(s.items())
        elif s.sh == "COMMANDS" and s.ss:
            path = tuple(s.ss.split())
            if path not in commands:
                problems.append(f"man/{page}: section {s.ss!r} documents no command of {prog}")
                continue
            documented[path] = item_options(s.items())
    for path, (p, has_subs) in commands.items():
        name = " ".join(path)
        own = options(p) - HELP
        if path not in documented and (not has_subs or (own and len(path) > 1)):
            problems.append(f"man/{page}: no section {name!r} under COMMANDS")
            continue
        for option in sorted(own):
            holders = [path[:i] for i in range(len(path), 0, -1)]
            holders = [h for h in holders if option in options(commands[h][0])]
            if not any(option in documented.get(h, set()) for h in holders):
                problems.append(f"man/{page}: {name}: option {option} is not documented")
    for path, shown in documented.items():
        if path not in commands:
            continue
        known = set().union(*(options(commands[path[:i]][0]) for i in range(1, len(path) + 1)))
        for option in sorted(shown - known):
            problems.append(f"man/{page}: {' '.join(path)}: {option} is not an option of it")
    if "--help" not in documented.get((prog,), set()):
        problems.append(f"man/{page}: OPTIONS does not document --help")
    return problems


def test_rex_1_documents_every_command_and_option() -> None:
    problems = option_problems("rex.1", "rex", cli.build_parser())
    assert not problems, "\n".join(problems)


def test_rex_key_1_documents_every_command_and_option() -> None:
    problems = option_problems("rex_key.1", "rex_key", keycli.build_parser())
    assert not problems, "\n".join(problems)


def test_the_drift_check_names_what_is_missing_or_made_up() -> None:
    parser = cli.build_parser()
    for path, p, _ in walk(parser, ("rex",)):
        if path == ("rex", "plan"):
            p.add_argument("--frobnicate", action="store_true")
        if path == ("rex", "hostkeys"):
            actions = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
            actions.add_parser("forget")
        if path == ("rex", "audit"):
            p._actions = [a for a in p._actions if "--remote" not in a.option_strings]
    problems = option_problems("rex.1", "rex", parser)
    assert "man/rex.1: rex plan: option --frobnicate is not documented" in problems
    assert "man/rex.1: no section 'rex hostkeys forget' under COMMANDS" in problems
    assert "man/rex.1: rex audit: --remote is not an option of it" in problems


def test_historical_spellings_are_documented() -> None:
    text = section("rex_key.1", "HISTORICAL SPELLINGS").text()
    for spelling in keycli.HISTORICAL:
        assert spelling in text


def test_rex_1_exit_codes_match_the_cli() -> None:
    documented = {item.split()[0] for item in section("rex.1", "EXIT STATUS").items()}
    listed = {line.split()[0] for line in cli.EXIT_CODES.splitlines()[1:] if line.strip()}
    assert documented == listed


# --- manifest keys: the schema against rex-manifest.5 -------------------------------------------

#: the section of rex-manifest.5 that documents each object of the schema ($defs name)
_TITLES = {"#": "Top-level keys", "host": "hosts", "user": "users", "program": "programs"}
_TITLES |= {"file": "files", "tcp": "ready.tcp"}


def schema_objects(node: object, title: str) -> Iterator[tuple[str, set[str]]]:
    """(section title, property names) of every object with properties in the schema."""
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            yield title, set(props)
            for name, sub in props.items():
                yield from schema_objects(sub, f"{title}.{name}")
        for name, sub in node.get("$defs", {}).items():
            yield from schema_objects(sub, _TITLES.get(name, name))
        for word in ("items", "additionalProperties"):
            yield from schema_objects(node.get(word), title)


def test_every_schema_key_is_documented_in_its_section() -> None:
    doc = json.loads(SCHEMA.read_text(encoding="utf-8"))
    keys = {s.ss: {i.split()[0] for i in s.items()} for s in sections("rex-manifest.5")}
    problems = []
    objects = dict(schema_objects(doc, _TITLES["#"]))
    for title, props in objects.items():
        if title not in keys:
            problems.append(f"man/rex-manifest.5: no section {title!r} under KEYS")
            continue
        problems += [f"{title}: {p} is not documented" for p in sorted(props - keys[title])]
        problems += [f"{title}: {p} is not in the schema" for p in sorted(keys[title] - props)]
    assert not problems, "\n".join(problems)


def test_the_manifest_example_validates() -> None:
    lines = section("rex-manifest.5", "EXAMPLE").lines
    start = lines.index(".EX")
    text = plain("\n".join(lines[start + 1 : lines.index(".EE", start)])) + "\n"
    loaded = manifest.loads(text, "web.yaml")
    compiled = planner.compile(loaded)
    assert [[s.id for s in wave] for wave in compiled.waves] == [
        ["db@db1"],
        ["app@app1", "app@app2", "app@app3", "app@app4"],
        ["lb@lb1"],
    ]


# --- JSON outputs: the code's keys against rex.1 and rex_key.1 ----------------------------------


def keys_of(value: object, skip: frozenset[str] = frozenset({"env", "counts"})) -> set[str]:
    """Every key of every mapping in ``value``, not descending into data-keyed ones."""
    if isinstance(value, dict):
        found = set(value)
        for k, v in value.items():
            if k not in skip:
                found |= keys_of(v, skip)
        return found
    if isinstance(value, list):
        return set().union(set(), *(keys_of(v, skip) for v in value))
    return set()


def _example() -> tuple[manifest.Manifest, planner.Plan]:
    loaded = manifest.load(ROOT / "playbooks" / "webstack.yaml")
    return loaded, planner.compile(loaded)


def assert_documented(keys: set[str], page: str, title: str) -> None:
    text = section(page, "JSON OUTPUT", title).text()
    assert sorted(k for k in keys if f'"{k}"' not in text) == []


def test_plan_json_keys_are_documented() -> None:
    loaded, compiled = _example()
    assert_documented(keys_of(planner.plan_to_dict(compiled, loaded)), "rex.1", "rex plan --json")


def test_apply_json_keys_are_documented() -> None:
    loaded, compiled = _example()
    result = outcomes.RunResult("r1", [outcomes.StepResult(compiled.steps[0])])
    doc = outcomes.result_to_dict(result, loaded)
    assert_documented(keys_of(doc), "rex.1", "rex apply --json")


def test_status_json_keys_are_documented() -> None:
    loaded, compiled = _example()
    statuses = [spec.StepStatus(compiled.steps[0], spec.RUNNING)]
    doc = lifecycle.status_to_dict(statuses, loaded, actions=True)
    assert_documented(keys_of(doc), "rex.1", "rex status --json")


def test_blame_json_keys_are_documented() -> None:
    step = {"wave": 0, "step": "db@db1", "host": "db1", "program": "db", "triple": "db1.a.db"}
    timeline = [
        events.Event(events.RUN_STARTED, 0.0, "r", total=1),
        events.Event(events.WAVE_STARTED, 0.0, "r", wave=0, total=1),
        *(
            events.Event(events.STEP, t, "r", state=state, **step)
            for t, state in enumerate(
                (events.CONNECTING, events.STARTING, events.AWAITING, events.READY)
            )
        ),
        events.Event(events.WAVE_DONE, 4.0, "r", wave=0, total=1),
        events.Event(events.RUN_DONE, 4.0, "r", total=1),
    ]
    doc = blame.analyze("r", timeline, top=0)
    assert doc["steps"] and doc["hosts"] and doc["critical_chain"]
    assert_documented(keys_of(doc), "rex.1", "rex blame --json")


def test_every_event_field_is_documented() -> None:
    text = section("rex.1", "JSON OUTPUT", "rex apply --events").text()
    fields = [f.name for f in dataclasses.fields(events.Event)]
    assert [f for f in fields if not re.search(rf"\b{f}\b", text)] == []


def test_audit_json_keys_are_documented() -> None:
    loaded, compiled = _example()
    doc = json.loads(audit.to_json(loaded, compiled, [], remote=False))
    keys = set(doc) | {f.name for f in dataclasses.fields(audit.Row)} | set(audit.STATES)
    assert_documented(keys, "rex.1", "rex audit --json")


def test_hostkeys_json_keys_are_documented() -> None:
    report = hostkeys.HostKeyReport(Host("h", "127.0.0.1"), "", "local")
    keys = set(hostkeys.report_to_dict(report)) | set(hostkeys.counts([report]))
    assert_documented(keys, "rex.1", "rex hostkeys verify --json")


def test_rex_key_list_json_keys_are_documented() -> None:
    info = KeyInfo("h.u", "h", "u", None, "0" * 16, "2025-01-01T00:00:00Z", Path("k/h/u.key"))
    keys = set(json.loads(keycli.format_json([info]))[0])
    text = section("rex_key.1", "COMMANDS", "rex_key list").text()
    assert sorted(k for k in keys if not re.search(rf"\b{k}\b", text)) == []


# --- packaging ----------------------------------------------------------------------------------


def test_pyproject_installs_every_page_in_its_section() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    data = config["tool"]["setuptools"]["data-files"]
    installed = {Path(f).name: where for where, files in data.items() for f in files}
    assert installed == {p: f"share/man/man{p.rsplit('.', 1)[1]}" for p in PAGES}


def test_pip_install_puts_the_pages_under_share_man(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for tree in ("rexplan", "man"):
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__"))
    prefix = tmp_path / "prefix"
    proc = subprocess.run(
        # --ignore-installed: without it pip uninstalls the rexplan this suite runs from
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--ignore-installed",
            "--prefix",
            str(prefix),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0 and "No matching distribution" in proc.stderr + proc.stdout:
        pytest.skip("pip cannot fetch the build backend (setuptools, wheel) here")
    assert proc.returncode == 0, proc.stderr
    for page in PAGES:
        assert (prefix / "share" / "man" / f"man{page.rsplit('.', 1)[1]}" / page).is_file()
    if shutil.which("man"):
        found = subprocess.run(
            ["man", "-M", str(prefix / "share" / "man"), "-w", "rex"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert found.stdout.strip() == str(prefix / "share" / "man" / "man1" / "rex.1")
