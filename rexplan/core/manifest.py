"""Manifest loading: capped YAML 1.2 with positions -> JSON Schema -> semantic checks -> records."""

from __future__ import annotations

import difflib
import fnmatch
import graphlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import jsonschema

from rexplan.core import hostrange
from rexplan.core.model import (
    HOST_RE,
    MAX_STEPS,
    NAME_RE,
    Authorization,
    Callback,
    FailurePolicy,
    FileSpec,
    Host,
    Manifest,
    Pairs,
    Placement,
    Program,
    Ready,
    Timeouts,
    User,
    When,
    triple,
)
from rexplan.errors import Diagnostic, ManifestError
from rexplan.wire.protocol import safe_relpath

#: largest manifest read, in bytes
MAX_BYTES = 5 * 1024 * 1024
#: deepest nesting of mappings and lists
MAX_DEPTH = 64
#: nodes that aliases may copy in, across the document ("billion laughs" stop here)
MAX_ALIAS_NODES = 100_000
#: nodes written in the document, so memory stays bounded within MAX_BYTES
MAX_NODES = 2_000_000
#: hosts after range expansion, across the manifest
MAX_HOSTS = hostrange.MAX_HOSTS

Path = tuple[str | int, ...]
Pos = tuple[int, int]

# YAML 1.2 core schema for plain scalars: `on`, `yes`, `no`, `off` stay strings, `0644` is
# decimal, and there are no timestamps or merge keys; `.inf` and `.nan` stay strings too, so a
# timeout can never be infinite.
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?[0-9]+\Z")
_OCT = re.compile(r"0o[0-7]+\Z")
_HEX = re.compile(r"0x[0-9a-fA-F]+\Z")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\Z")
_NUMERIC_START = frozenset("0123456789+-.")
# YAML's printable set, less TAB/LF/CR; libyaml reports these as byte offsets, so find them first
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")

_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f]|\s|/|\.\.|\A-")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LOGIN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9_.:%-]+\Z")
_PYTHON_RE = re.compile(r"[A-Za-z0-9_./+-]+\Z")
_SSH_OPTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MODE_RE = re.compile(r"0?[0-7]{3}\Z|0o[0-7]{3}\Z")
_GLOB_CHARS = frozenset("*?[")
_PATTERN_HOST_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+\Z")
_PATTERN_NAME_RE = re.compile(r"[a-z0-9_*?\[\]!-]+\Z")
_PROBES = ("tcp", "http", "command", "file", "notify", "alive")

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NODE_EVENTS = (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)


class _Fatal(Exception):
    """The YAML layer cannot go on; the diagnostic that says why is in the report."""


class _Retry(Exception):
    """A problem turned up in the untracked pass: load again, keeping positions."""


class _Report:
    """Where every key and value was written, and the diagnostics found so far.

    Positions live beside the data: ``tables`` maps ``id(container)`` to the positions of its
    values and keys, so composing builds no per-node path; ``where(path)`` walks the tree.
    Keeping them costs as much as parsing, so a first pass runs with ``track`` off and gives
    up (_Retry) at the first problem; only a manifest with problems is composed twice.
    """

    def __init__(self, filename: str, *, track: bool = True) -> None:
        self.filename = filename
        self.track = track
        self.root: Any = None
        self.root_pos: Pos = (1, 1)
        self.tables: dict[int, tuple[Any, dict[str, Pos]]] = {}
        self.kept: list[Any] = []  # values under duplicate keys: alive, so no id is reused
        self.items: list[Diagnostic] = []

    def where(self, path: Path, *, key: bool = False) -> Pos:
        """The position of the value (or key) at ``path``, else of its nearest ancestor."""
        node, pos = self.root, self.root_pos
        for depth, step in enumerate(path):
            table = self.tables.get(id(node))
            if table is None:
                break
            spots, key_spots = table
            if key and depth == len(path) - 1 and isinstance(step, str) and step in key_spots:
                return key_spots[step]
            try:
                pos, node = spots[step], node[step]
            except (KeyError, IndexError, TypeError):
                break
        return pos

    def add(self, pos: Pos, path: Path, message: str, hint: str | None = None) -> None:
        if not self.track:
            raise _Retry
        dotted = ".".join(str(p) for p in path)
        self.items.append(Diagnostic(self.filename, pos[0], pos[1], dotted, message, hint))

    def value(self, path: Path, message: str, hint: str | None = None) -> None:
        self.add(self.where(path), path, message, hint)

    def key(self, path: Path, message: str, hint: str | None = None) -> None:
        self.add(self.where(path, key=True), path, message, hint)

    def fatal(self, pos: Pos, path: Path, message: str, hint: str | None = None) -> _Fatal:
        self.add(pos, path, message, hint)
        return _Fatal(message)


# --- YAML -------------------------------------------------------------------------------------


def _plain(text: str) -> Any:
    """A plain (unquoted, untagged) scalar under the YAML 1.2 core schema."""
    if text in _NULLS:
        return None
    if text in _BOOLS:
        return _BOOLS[text]
    if text[0] in _NUMERIC_START:
        try:
            if _INT.match(text):
                return int(text)
            if _OCT.match(text):
                return int(text[2:], 8)
            if _HEX.match(text):
                return int(text[2:], 16)
        except ValueError:  # more digits than int() converts: leave it to the schema
            return text
        if _FLOAT.match(text):
            return float(text)
    return text


def _tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


class _Frame:
    """A mapping or list under construction, with the positions of what it holds."""

    __slots__ = ("anchor", "container", "is_map", "key", "keys", "path", "skip", "spots", "weight")

    def __init__(
        self, container: Any, path: Path | None, anchor: str | None, report: _Report
    ) -> None:
        self.container = container
        self.is_map = isinstance(container, dict)
        self.path = path  # None for the list that holds the document
        self.anchor = anchor
        self.key: str | None = None  # a mapping's pending key, until its value arrives
        self.skip = False  # the pending key is a duplicate: drop its value
        self.spots: Any = {} if self.is_map else []
        self.keys: dict[str, Pos] = {}
        self.weight = 1
        if report.track:
            report.tables[id(container)] = (self.spots, self.keys)


def _compose(text: str, report: _Report) -> Any:
    """Plain Python data from one YAML document, recording positions; raises _Fatal."""
    loader = _LOADER(text)
    try:
        return _build(loader, report)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        lines = text.splitlines()
        source = lines[line - 1] if line <= len(lines) else ""
        indent = source[: len(source) - len(source.lstrip(" \t"))]
        tabbed = "tab" in problem or "\t" in indent or source[col - 1 : col] == "\t"
        hint = "YAML indents with spaces, not tabs" if tabbed else None
        message = f"YAML syntax error: {problem}"
        context = exc.context_mark
        where = (context.line + 1, context.column + 1) if context else None
        if exc.context and exc.problem and where is not None and where != (line, col):
            message += f" ({exc.context} at {where[0]}:{where[1]})"
        raise report.fatal((line, col), (), message, hint) from None
    except yaml.YAMLError as exc:
        raise report.fatal((1, 1), (), f"YAML error: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()


def _here(event: Any) -> Pos:
    mark = event.start_mark
    return mark.line + 1, mark.column + 1


def _build(loader: Any, report: _Report) -> Any:
    track = report.track
    scalar, alias, map_start, _ = _NODE_EVENTS
    ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    anchors: dict[str, tuple[Any, int]] = {}
    stack: list[_Frame] = []
    # the document sits in a one-item list, so every node has a parent frame
    top = _Frame([], None, None, report)
    nodes = copied = documents = 0
    check_event, get_event = loader.check_event, loader.get_event
    while check_event():
        event = get_event()
        kind = event.__class__
        if kind in ends:
            frame, top = top, stack.pop()
            value, weight = frame.container, frame.weight
            if frame.anchor is not None:
                anchors[frame.anchor] = (value, weight)
        elif kind in _NODE_EVENTS:
            nodes += 1
            if nodes > MAX_NODES:
                message = f"the manifest has more than {MAX_NODES} YAML nodes"
                raise report.fatal(_here(event), (), message)
            tag = None if kind is alias else event.tag
            if top.key is None and top.is_map:
                if kind is scalar and tag is None and event.value not in top.container:
                    top.key = event.value
                    if track:
                        top.keys[event.value] = _here(event)
                    if event.anchor is not None:
                        anchors[event.anchor] = (event.value, 1)
                else:
                    _odd_key(top, event, tag, report)
                continue
            if tag is not None:
                report.add(_here(event), _path(top), f"YAML tag {_tag(tag)!r} is not allowed")
            if kind is scalar:
                weight = 1
                if event.implicit[0]:
                    value = _plain(event.value)
                else:
                    value = event.value
                    if "\x00" in value:
                        report.add(_here(event), _path(top), "a NUL character is not allowed")
                if event.anchor is not None:
                    anchors[event.anchor] = (value, 1)
            elif kind is alias:
                if event.anchor not in anchors:
                    message = f"unknown alias '*{event.anchor}'"
                    hint = "define '&name' before '*name'"
                    raise report.fatal(_here(event), _path(top), message, hint)
                value, weight = anchors[event.anchor]
                copied += weight
                if copied > MAX_ALIAS_NODES:
                    raise report.fatal(
                        _here(event),
                        _path(top),
                        f"aliases expand to more than {MAX_ALIAS_NODES} nodes",
                        "the document looks like a 'billion laughs' bomb; write the data out",
                    )
            else:
                if len(stack) >= MAX_DEPTH:
                    message = f"nesting is deeper than {MAX_DEPTH} levels"
                    raise report.fatal(_here(event), _path(top), message)
                if track:
                    _spot(top, _here(event))
                stack.append(top)
                container: Any = {} if kind is map_start else []
                top = _Frame(container, _path(top), event.anchor, report)
                continue
            if track:
                _spot(top, _here(event))
        else:
            if kind is yaml.DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise report.fatal(
                        _here(event),
                        (),
                        "a manifest is one YAML document; found a second one",
                        "remove the second '---' document",
                    )
            continue
        # a value is complete: hand it to its parent
        top.weight += weight
        if not top.is_map:
            top.container.append(value)
        elif top.skip:
            report.kept.append(value)
            top.skip = False
        else:
            top.container[top.key] = value
        top.key = None
    report.root = top.container[0] if top.container else None
    report.root_pos = top.spots[0] if top.spots else (1, 1)
    report.tables.pop(id(top.container), None)  # the holder list dies here; its id may return
    return report.root


def _path(frame: _Frame) -> Path:
    """The path of the value ``frame`` is about to receive."""
    if frame.path is None:
        return ()
    if frame.is_map:
        return (*frame.path, frame.key or "")
    return (*frame.path, len(frame.container))


def _spot(frame: _Frame, here: Pos) -> None:
    if not frame.is_map:
        frame.spots.append(here)
    elif not frame.skip:
        frame.spots[frame.key] = here


def _odd_key(frame: _Frame, event: Any, tag: str | None, report: _Report) -> None:
    """A mapping key that is tagged, repeated or not a scalar; keys stay the text written."""
    here = _here(event)
    if not isinstance(event, yaml.ScalarEvent):
        raise report.fatal(here, _path(frame), "mapping keys must be plain strings")
    key = event.value
    frame.key = key
    path = _path(frame)
    if tag is not None:
        report.add(here, path, f"YAML tag {_tag(tag)!r} is not allowed")
    if key in frame.container:
        first = frame.keys.get(key)  # kept only while tracking, and add() needs tracking
        at = f" (first defined at {first[0]}:{first[1]})" if first else ""
        report.add(
            here,
            path,
            f"duplicate key {key!r}{at}",
            "each key may appear once in a mapping; merge the two entries",
        )
        frame.skip = True
    elif report.track:
        frame.keys[key] = here


# --- JSON Schema -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _schema_document() -> dict[str, Any]:
    text = resources.files("rexplan.resources").joinpath("manifest.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema  # itself checked against the metaschema by the tests, not on every run


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    # imported here: only a manifest the fast check refuses needs it, and importing it costs
    # more than loading and planning most manifests
    import jsonschema

    return jsonschema.Draft202012Validator(_schema_document())


_Check = Callable[[Any], bool]
_ANNOTATIONS = frozenset(("$schema", "$id", "$defs", "title", "description", "then"))


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


_TYPES: dict[str, _Check] = {
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "string": lambda v: type(v) is str,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": lambda v: type(v) is int or (type(v) is float and v.is_integer()),
}


def _any_type(kinds: list[_Check], v: Any) -> bool:
    for kind in kinds:
        if kind(v):
            return True
    return False


def _in_enum(choices: frozenset[str], v: Any) -> bool:
    return type(v) is str and v in choices


def _has(names: tuple[str, ...], v: Any) -> bool:
    return type(v) is not dict or all(k in v for k in names)


def _each(item: _Check, v: Any) -> bool:
    if type(v) is list:
        for x in v:
            if not item(x):
                return False
    return True


def _min_length(n: int, v: Any) -> bool:
    return type(v) is not str or len(v) >= n


def _min_items(n: int, v: Any) -> bool:
    return type(v) is not list or len(v) >= n


def _at_least(n: float, v: Any) -> bool:
    return not _is_number(v) or v >= n


def _matches(pattern: re.Pattern[str], v: Any) -> bool:
    return not isinstance(v, str) or pattern.search(v) is not None


def _at_most(n: float, v: Any) -> bool:
    return not _is_number(v) or v <= n


def _above(n: float, v: Any) -> bool:
    return not _is_number(v) or v > n


def _if_then(test: _Check, then: _Check, v: Any) -> bool:
    return not test(v) or then(v)


def _every(checks: list[_Check], v: Any) -> bool:
    for check in checks:
        if not check(v):
            return False
    return True


def _fields(props: dict[str, _Check], other: _Check | None, v: Any) -> bool:
    """properties + additionalProperties; ``other`` None means no other field is allowed."""
    if type(v) is not dict:
        return True
    for key, item in v.items():
        check = props.get(key, other)
        if check is None or not check(item):
            return False
    return True


def _compile(schema: dict[str, Any], defs: dict[str, Any], memo: dict[str, _Check]) -> _Check:
    """A yes/no check for the JSON Schema keywords the manifest schema uses.

    jsonschema stays the authority: this only lets a valid manifest skip it (jsonschema takes
    about a second on 10,000 hosts), and a keyword it does not know is refused outright.
    """
    checks: list[_Check] = []
    for word, want in schema.items():
        if word in _ANNOTATIONS:
            continue
        if word == "$ref":
            name = want.removeprefix("#/$defs/")
            if name not in memo:
                memo[name] = _compile(defs[name], defs, memo)
            checks.append(memo[name])
        elif word == "type":
            if isinstance(want, str):
                checks.append(_TYPES[want])
            else:
                checks.append(partial(_any_type, [_TYPES[t] for t in want]))
        elif word == "enum":
            if not all(isinstance(c, str) for c in want):
                raise ValueError("the fast schema check knows only enums of strings")
            checks.append(partial(_in_enum, frozenset(want)))
        elif word == "required":
            checks.append(partial(_has, tuple(want)))
        elif word in ("properties", "additionalProperties"):
            if word == "additionalProperties" and "properties" in schema:
                continue
            props = {k: _compile(v, defs, memo) for k, v in schema.get("properties", {}).items()}
            extra = schema.get("additionalProperties", True)
            other = None if extra is False else _compile({} if extra is True else extra, defs, memo)
            checks.append(partial(_fields, props, other))
        elif word == "items":
            checks.append(partial(_each, _compile(want, defs, memo)))
        elif word == "minLength":
            checks.append(partial(_min_length, want))
        elif word == "minItems":
            checks.append(partial(_min_items, want))
        elif word == "minimum":
            checks.append(partial(_at_least, want))
        elif word == "maximum":
            checks.append(partial(_at_most, want))
        elif word == "exclusiveMinimum":
            checks.append(partial(_above, want))
        elif word == "pattern":
            checks.append(partial(_matches, re.compile(want)))
        elif word == "if":
            then = _compile(schema.get("then", {}), defs, memo)
            checks.append(partial(_if_then, _compile(want, defs, memo), then))
        else:
            raise ValueError(f"the fast schema check does not know {word!r}")
    if not checks:
        return partial(_every, [])
    return checks[0] if len(checks) == 1 else partial(_every, checks)


@lru_cache(maxsize=1)
def _accepts() -> _Check:
    schema = _schema_document()
    return _compile(schema, schema.get("$defs", {}), {})


def _show(value: Any) -> str:
    """A value as YAML users read it, short enough for one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        return "[...]"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:37] + "...")
    return repr(value)


def _close(word: str, choices: Any) -> str | None:
    if len(choices) > 2000:  # difflib costs ~20 us a candidate: no hint beats a slow one
        return None
    match = difflib.get_close_matches(word, sorted(choices), n=1)
    return f"did you mean {match[0]!r}?" if match else None


def _type_hint(path: Path, value: Any, expected: list[str]) -> str | None:
    if path and path[-1] == "mode":
        return 'write the mode as a quoted octal string, e.g. mode: "0644"'
    if path and path[-1] == "run" and isinstance(value, str):
        return "run takes an argv list, e.g. [python3, app.py]; use shell: for a command line"
    if "string" in expected and isinstance(value, (bool, int, float)):
        return f'quote it: "{_show(value)}"'
    return None


def _schema(doc: Any, report: _Report) -> None:
    if _accepts()(doc):
        return
    required_seen: set[tuple[Path, str]] = set()
    for err in _validator().iter_errors(doc):
        path: Path = tuple(err.absolute_path)
        kind, want, value = err.validator, err.validator_value, err.instance
        if kind == "additionalProperties":
            known = err.schema.get("properties", {})
            for extra in value:
                if extra not in known:
                    fields = "known fields: " + ", ".join(sorted(known))
                    report.key(
                        (*path, extra), f"unknown field {extra!r}", _close(extra, known) or fields
                    )
        elif kind == "required":
            for field in want:
                if field not in value and (path, field) not in required_seen:
                    required_seen.add((path, field))
                    start = "start the manifest with 'rex: 1'" if field == "rex" else None
                    report.key(path, f"missing required field {field!r}", start)
        elif kind == "type":
            expected = [want] if isinstance(want, str) else list(want)
            types = " or ".join(repr(t) for t in expected)
            report.value(
                path, f"{_show(value)} is not of type {types}", _type_hint(path, value, expected)
            )
        elif kind == "enum":
            choices = ", ".join(repr(c) for c in want)
            close = _close(value, want) if isinstance(value, str) else None
            report.value(path, f"{_show(value)} is not one of {choices}", close)
        elif kind == "minimum":
            report.value(path, f"{_show(value)} is less than the minimum of {want}")
        elif kind == "maximum":
            report.value(path, f"{_show(value)} is more than the maximum of {want}")
        elif kind == "exclusiveMinimum":
            report.value(path, f"{_show(value)} must be greater than {want}")
        elif kind in ("minLength", "minItems"):
            report.value(path, "must not be empty")
        elif kind == "pattern":
            # the schema's patterns are the count-or-percentage keys (max_fail, serial)
            report.value(
                path,
                f"{_show(value)} is not a count or a percentage",
                err.schema.get("description"),
            )
        else:
            report.value(path, err.message)


# --- semantic checks and records ---------------------------------------------------------------


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any, default: str | None) -> str | None:
    return value if isinstance(value, str) else default


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return int(value) if float(value).is_integer() else default


def _num(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)


def _count_or_percent(value: Any) -> tuple[int | None, float | None]:
    """``3`` -> (3, None), ``'25%'`` -> (None, 25.0); the schema checked the forms."""
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        return None, float(value[:-1])
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    return None, None


def _policy(spec: dict[str, Any], defaults: dict[str, Any]) -> FailurePolicy:
    """The program's failure policy; each key falls back to ``defaults``."""

    def get(key: str) -> Any:
        return spec[key] if key in spec else defaults.get(key)

    max_fail, max_fail_percent = _count_or_percent(get("max_fail"))
    serial, serial_percent = _count_or_percent(get("serial"))
    return FailurePolicy(
        max_fail=max_fail,
        max_fail_percent=max_fail_percent,
        any_errors_fatal=get("any_errors_fatal") is True,
        serial=serial,
        serial_percent=serial_percent,
        ignore_unreachable=get("ignore_unreachable") is True,
    )


def _names(value: Any) -> list[tuple[int | None, str]]:
    """`on`/`requires` items with their list index (None for a single string)."""
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, list):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, str)]
    return []


def _pairs(value: Any) -> Pairs:
    if not value:
        return ()
    return tuple(sorted((k, v) for k, v in _map(value).items() if isinstance(v, str)))


def _unsafe(text: str) -> str | None:
    """Why ``text`` cannot name anything: the rules hosts, users and programs share."""
    if not text:
        return "is empty"
    found = _UNSAFE_RE.search(text)
    if found is None:
        return None
    bad = found.group()
    if bad in ("/", ".."):
        return f"contains {bad!r}"
    if bad == "-":
        return "starts with '-'"
    return "contains whitespace" if bad.isspace() else "contains a control character"


def _name_problem(name: str) -> str | None:
    if NAME_RE.match(name):
        return None
    problem = _unsafe(name)
    if problem is None and "." in name:
        problem = "contains '.' (triples are host.user.program, so only host names have dots)"
    if problem is None and len(name) > 32:
        problem = "is longer than 32 characters"
    return problem or "must be lowercase letters, digits, '_' and '-', not starting with a digit"


def _host_problem(name: str) -> str | None:
    if len(name) <= 253 and HOST_RE.match(name):
        return None
    problem = _unsafe(name)
    if problem is None and len(name) > 253:
        problem = "is longer than 253 characters"
    return problem or "is not hostname-like (letters, digits, '-' and '_' in dot-separated labels)"


def _address_problem(address: str) -> str | None:
    if _ADDRESS_RE.match(address) and ".." not in address and not address.startswith("-"):
        return None
    return _unsafe(address) or "is not a host name or IP address"


class _Checker:
    """Semantic checks over the schema-shaped tree; builds the records as it goes."""

    def __init__(self, doc: dict[str, Any], report: _Report, base_dir: str) -> None:
        self.doc = doc
        self.report = report
        self.base_dir = base_dir
        defaults = _map(doc.get("defaults"))
        self.defaults = defaults
        self.timeouts = self._timeouts(defaults.get("timeouts"), Timeouts())
        self.users: dict[str, User] = {}
        self.hosts: list[Host] = []
        self.index: dict[str, int] = {}  # host name -> position in manifest order
        self.entries: dict[str, list[str]] = {}  # hosts key as written -> its names
        self.groups: dict[str, list[str]] = {}
        self.programs: list[Program] = []
        self.steps = 0  # programs x their hosts so far (MAX_STEPS)
        self.authorize: list[tuple[Authorization, re.Pattern[str], re.Pattern[str], str]] = []
        self._on_cache: dict[str, list[str]] = {}
        self._pythons: set[str] = set()  # interpreters already found valid
        self.strategy = "flat"
        self.fanout = 4
        self.relay_identity: str | None = None

    def run(self) -> tuple[Callback, int]:
        rex = self.doc.get("rex")
        if isinstance(rex, int) and not isinstance(rex, bool) and rex != 1:
            self.report.value(
                ("rex",), f"unsupported manifest version {rex}", "this rex reads 'rex: 1'"
            )
        self._users()
        user = self.defaults.get("user")
        if isinstance(user, str) and user not in self.users:
            self._unknown(("defaults", "user"), "user", user, self.users)
        self._hosts()
        self._authorize()
        self._programs()
        self._strategy()
        return self._callback(), _int(self.defaults.get("forks"), 64)

    def persist(self) -> float:
        return _num(self.defaults.get("persist"), 0.0)

    def _unknown(self, path: Path, what: str, name: str, known: Any) -> None:
        hint = _close(name, known) or (
            f"add 'groups: [{name}]' to a host" if what == "group" else f"declare it under {what}s:"
        )
        self.report.value(path, f"unknown {what} {name!r}", hint)

    def _timeouts(self, value: Any, base: Timeouts) -> Timeouts:
        spec = _map(value)
        return Timeouts(
            connect=_num(spec.get("connect"), base.connect),
            start=_num(spec.get("start"), base.start),
            callback=_num(spec.get("callback"), base.callback),
            ready=_num(spec.get("ready"), base.ready),
        )

    def _callback(self) -> Callback:
        spec = _map(self.doc.get("callback"))
        for field in ("bind", "advertise"):
            address = spec.get(field)
            problem = _address_problem(address) if isinstance(address, str) else None
            if problem:
                self.report.value(("callback", field), f"address {address!r} {problem}")
        return Callback(
            bind=_str(spec.get("bind"), None),
            port=_int(spec.get("port"), 0),
            advertise=_str(spec.get("advertise"), None),
        )

    def _strategy(self) -> None:
        d = self.defaults
        self.strategy = _str(d.get("strategy"), "flat") or "flat"
        self.fanout = _int(d.get("fanout"), 4)
        self.relay_identity = _str(d.get("relay_identity"), None)
        identity = self.relay_identity
        if identity is not None and (
            _CONTROL_RE.search(identity) or not identity.startswith(("/", "~/"))
        ):
            self.report.value(
                ("defaults", "relay_identity"),
                f"{identity!r} is not an absolute path on the relay hosts",
                "give /path/to/key or ~/path/to/key (tilde: the relay login's home)",
            )
            self.relay_identity = None
            identity = ""  # reported once: tree_problems need not add that it is missing
        if self.strategy == "tree":
            for path, message, hint in tree_problems(self.programs, identity):
                self.report.value(path, message, hint)

    def _users(self) -> None:
        for name, value in _map(self.doc.get("users")).items():
            path: Path = ("users", name)
            spec = _map(value)
            problem = _name_problem(name)
            if problem:
                self.report.key(path, f"invalid user name {name!r}: {problem}")
            login = _str(spec.get("login"), name) or name
            if "login" in spec and isinstance(spec["login"], str) and not _LOGIN_RE.match(login):
                self.report.value((*path, "login"), f"invalid login {login!r}")
            identity = _str(spec.get("identity"), None)
            if identity is not None and (
                identity.startswith("-") or any(ord(c) < 32 for c in identity)
            ):
                self.report.value((*path, "identity"), f"invalid identity file {identity!r}")
            options = _pairs(spec.get("ssh_options"))
            for option, setting in options:
                opt_path = (*path, "ssh_options", option)
                if not _SSH_OPTION_RE.match(option):
                    self.report.key(opt_path, f"invalid ssh option name {option!r}")
                if any(ord(c) < 32 for c in setting):
                    self.report.value(opt_path, "ssh option values are one line of text")
            self.users[name] = User(name, login, identity, options)

    def _hosts(self) -> None:
        d = self.defaults
        base = Host(
            "",
            "",
            port=_int(d.get("port"), 22),
            transport=_str(d.get("transport"), "ssh") or "ssh",
            python=_str(d.get("python"), "python3") or "python3",
            max_startups=_int(d.get("max_startups"), Host.max_startups),
            load=_str(d.get("load"), Host.load) or Host.load,
        )
        where: dict[str, str] = {}  # host name -> the hosts key that defined it
        for key, value in _map(self.doc.get("hosts")).items():
            if not self._host_entry(key, _map(value), base, where):
                return

    def _host_entry(
        self, key: str, spec: dict[str, Any], base: Host, where: dict[str, str]
    ) -> bool:
        """Add the hosts of one ``hosts`` entry; False once the manifest has too many."""
        path: Path = ("hosts", key)
        try:
            expanded = hostrange.expand(key)
        except ValueError as exc:
            self.report.key(path, f"invalid host range: {exc}")
            return True
        if len(self.hosts) + len(expanded) > MAX_HOSTS:
            self.report.key(path, f"the manifest has more than {MAX_HOSTS} hosts")
            return False
        for h in expanded:
            problem = _host_problem(h.name)
            if problem:
                self.report.key(path, f"invalid host name {h.name!r}: {problem}")
                return True
        user = _str(spec.get("user"), None)
        if user is not None and user not in self.users:
            self._unknown((*path, "user"), "user", user, self.users)
        python = _str(spec.get("python"), base.python) or base.python
        if python not in self._pythons:
            if _PYTHON_RE.match(python) and python[0] != "-":
                self._pythons.add(python)
            else:
                self.report.value((*path, "python"), f"invalid interpreter {python!r}")
        groups: list[str] = []
        listed = spec.get("groups")
        for i, group in enumerate(listed if isinstance(listed, list) else []):
            if not isinstance(group, str) or group in groups:
                continue
            problem = None if group in self.groups else _name_problem(group)
            if problem:
                message = f"invalid group name {group!r}: {problem}"
                self.report.value((*path, "groups", i), message)
            else:
                groups.append(group)
        address = _str(spec.get("address"), None)
        templated = address is not None and ("{" in address or "}" in address)
        if address is not None and templated:
            try:
                hostrange.check_template(address, len(expanded[0].values))
            except ValueError as exc:
                self.report.value((*path, "address"), f"bad address template: {exc}")
                address = None
        port = _int(spec.get("port"), base.port)
        max_startups = _int(spec.get("max_startups"), base.max_startups)
        load = _str(spec.get("load"), base.load) or base.load
        transport = _str(spec.get("transport"), base.transport) or base.transport
        groups_, vars_ = tuple(groups), _pairs(spec.get("vars"))
        names: list[str] = []
        bad_address = False
        for h in expanded:
            if h.name in where:
                other = where[h.name]
                line, col = self.report.where(("hosts", other), key=True)
                message = f"host {h.name!r} is already defined by {other!r} at {line}:{col}"
                self.report.key(path, message)
                break
            where[h.name] = key
            if address is None:
                addr = h.name
            else:
                addr = hostrange.render(address, h) if templated else address
            problem = None if bad_address else _address_problem(addr)
            if problem:
                bad_address = True
                self.report.value((*path, "address"), f"address {addr!r} {problem}")
            self.index[h.name] = len(self.hosts)
            self.hosts.append(
                Host(
                    h.name,
                    addr,
                    port,
                    user,
                    transport,
                    python,
                    groups_,
                    vars_,
                    max_startups=max_startups,
                    load=load,
                )
            )
            names.append(h.name)
            for group in groups:
                self.groups.setdefault(group, []).append(h.name)
        self.entries[key] = names
        return True

    def _authorize(self) -> None:
        value = self.doc.get("authorize")
        for i, pattern in enumerate(value if isinstance(value, list) else []):
            if not isinstance(pattern, str):
                continue
            parts = pattern.rsplit(".", 2)
            ok = (
                len(parts) == 3
                and all(parts)
                and _PATTERN_HOST_RE.match(parts[0]) is not None
                and all(_PATTERN_NAME_RE.match(p) for p in parts[1:])
            )
            if not ok:
                self.report.value(
                    ("authorize", i),
                    f"{pattern!r} is not a host.user.program pattern",
                    "use shell globs per component, e.g. 'web*.app.*' or '*.*.db'",
                )
                continue
            host, user, program = parts
            auth = Authorization(pattern, host, user, program)
            user_rx = re.compile(fnmatch.translate(user))
            program_rx = re.compile(fnmatch.translate(program))
            self.authorize.append((auth, user_rx, program_rx, fnmatch.translate(host)))

    def _unauthorized(self, hosts: tuple[str, ...], user: str, program: str) -> list[str]:
        host_res = [
            host_re
            for _, user_rx, program_rx, host_re in self.authorize
            if user_rx.match(user) and program_rx.match(program)
        ]
        if not host_res:
            return list(hosts)
        combined = re.compile("|".join(f"(?:{h})" for h in host_res))
        return [h for h in hosts if not combined.match(h)]

    def _on(self, path: Path, item: str) -> list[str] | None:
        """Host names one `on` item selects, or None after reporting why it selects none."""
        if item in self._on_cache:
            return self._on_cache[item]
        names: list[str] | None = None
        if item.startswith("group:"):
            group = item[len("group:") :]
            names = self.groups.get(group)
            if names is None:
                self._unknown(path, "group", group, self.groups)
        elif item in self.entries:
            names = self.entries[item]
        elif item in self.index:
            names = [item]
        else:
            expanded = None
            if hostrange.is_range(item):
                try:
                    expanded = [h.name for h in hostrange.expand(item)]
                except ValueError:
                    expanded = None  # not a range: read it as a glob below
            if expanded is not None:
                missing = [n for n in expanded if n not in self.index]
                if missing:
                    self._unknown(path, "host", missing[0], self.index)
                else:
                    names = expanded
            elif _GLOB_CHARS.intersection(item):
                rx = re.compile(fnmatch.translate(item))
                names = [h.name for h in self.hosts if rx.match(h.name)]
                if not names:
                    self.report.value(path, f"{item!r} matches no host")
                    names = None
            else:
                self._unknown(path, "host", item, self.index)
        if names is not None:  # failures are not cached: each use gets its own diagnostic
            self._on_cache[item] = names
        return names

    def _programs(self) -> None:
        programs = _map(self.doc.get("programs"))
        graph: dict[str, list[str]] = {}
        for name, value in programs.items():
            spec = _map(value)
            path: Path = ("programs", name)
            problem = _name_problem(name)
            if problem:
                self.report.key(path, f"invalid program name {name!r}: {problem}")
            requires = []
            for i, req in _names(spec.get("requires")):
                req_path = (*path, "requires") if i is None else (*path, "requires", i)
                if req not in programs:
                    self._unknown(req_path, "program", req, programs)
                elif req not in requires:
                    requires.append(req)
            graph[name] = requires
            program = self._program(name, path, spec, tuple(requires))
            if program is not None:
                self.programs.append(program)
        self._cycles(graph, list(programs))

    def _cycles(self, graph: dict[str, list[str]], order: list[str]) -> None:
        remaining = dict(graph)
        while True:
            try:
                graphlib.TopologicalSorter(remaining).prepare()
                return
            except graphlib.CycleError as exc:
                # graphlib walks predecessors, so its cycle runs against `requires` edges
                cycle = list(reversed(exc.args[1]))[:-1]
                start = min(range(len(cycle)), key=lambda i: order.index(cycle[i]))
                cycle = cycle[start:] + cycle[:start]
                self.report.value(
                    ("programs", cycle[0], "requires"),
                    "requires cycle: " + " -> ".join([*cycle, cycle[0]]),
                    "a program cannot wait for itself; remove one of these requires",
                )
                for name in cycle:
                    remaining.pop(name, None)

    def _program(
        self, name: str, path: Path, spec: dict[str, Any], requires: tuple[str, ...]
    ) -> Program | None:
        report, d = self.report, self.defaults
        run, shell = spec.get("run"), spec.get("shell")
        if "run" in spec and "shell" in spec:
            report.key((*path, "shell"), "give either run or shell, not both")
        elif "run" not in spec and "shell" not in spec:
            report.key(
                path,
                f"program {name!r} has neither run nor shell",
                "add run: [argv...] or shell: 'command line'",
            )
        on = _names(spec.get("on"))
        selected: set[str] = set()
        # past MAX_STEPS (reported once) a program's hosts are not gathered: the manifest
        # is refused, and 200 programs on 100,000 hosts must not cost their 20 million steps
        over = self.steps > MAX_STEPS
        for i, item in on:
            on_path = (*path, "on") if i is None else (*path, "on", i)
            names = self._on(on_path, item)
            if names and not over:
                selected.update(names)
        hosts = tuple(sorted(selected, key=self.index.__getitem__))
        self.steps += len(hosts)
        if self.steps > MAX_STEPS and not over:
            where = (*path, "on") if "on" in spec else path
            report.add(
                report.where(where, key="on" not in spec),
                where,
                f"the manifest makes more than {MAX_STEPS:,} steps (programs x their hosts): "
                f"{self.steps:,} with this program's {len(hosts):,}",
                "split the manifest, or narrow on: (rex --limit narrows a run, not the manifest)",
            )
        if spec.get("on") == []:
            report.value((*path, "on"), "'on' selects no host")
        user = _str(spec.get("user"), None)
        if user is not None:
            if user not in self.users:
                self._unknown((*path, "user"), "user", user, self.users)
                user = None
        elif isinstance(d.get("user"), str):
            user = d["user"] if d["user"] in self.users else None
        elif len(self.users) == 1:
            user = next(iter(self.users))
        else:
            report.key(
                path,
                f"program {name!r} has no user",
                "set user: on the program, or defaults.user",
            )
        timeouts = self._timeouts(spec.get("timeouts"), self.timeouts)
        ready = self._ready((*path, "ready"), spec.get("ready"), timeouts.ready)
        placement = self._placement((*path, "placement"), spec.get("placement"), len(hosts))
        files = self._files((*path, "files"), spec.get("files"))
        env = _pairs(spec.get("env"))
        for key, _ in env:
            if not _ENV_RE.match(key):
                report.key((*path, "env", key), f"invalid environment variable name {key!r}")
        when = _map(spec.get("when"))
        if user is None:
            return None
        if hosts and NAME_RE.match(name) and NAME_RE.match(user):
            denied = self._unauthorized(hosts, user, name)
            if denied:
                shown = ", ".join(triple(h, user, name) for h in denied[:3])
                more = f" and {len(denied) - 3} more" if len(denied) > 3 else ""
                where = (*path, "on") if "on" in spec else path
                report.add(
                    report.where(where, key="on" not in spec),
                    where,
                    f"{len(denied)} step(s) not authorized: {shown}{more}",
                    f"add a pattern to authorize, e.g. '{triple(denied[0], user, name)}' "
                    f"or '*.{user}.{name}'",
                )
        return Program(
            name=name,
            hosts=hosts,
            user=user,
            run=tuple(run) if isinstance(run, list) else None,
            shell=shell if isinstance(shell, str) else None,
            on=tuple(item for _, item in on),
            requires=requires,
            ready=ready,
            env=env,
            cwd=_str(spec.get("cwd"), None),
            kind=_str(spec.get("kind"), _str(d.get("kind"), "service")) or "service",
            restart=_str(spec.get("restart"), _str(d.get("restart"), "no")) or "no",
            placement=placement,
            when=When(
                max_load=_num(when["max_load"], 0.0) if "max_load" in when else None,
                min_free_mb=_int(when["min_free_mb"], 0) if "min_free_mb" in when else None,
            ),
            files=files,
            stop_timeout=_num(spec.get("stop_timeout"), _num(d.get("stop_timeout"), 10.0)),
            timeouts=timeouts,
            policy=_policy(spec, d),
        )

    def _ready(self, path: Path, value: Any, timeout: float) -> Ready:
        spec = _map(value)
        probes = [p for p in _PROBES if p in spec]
        if len(probes) > 1:
            self.report.key(
                (*path, probes[1]),
                f"ready has more than one probe: {', '.join(probes)}",
                "choose one of tcp, http, command, file, notify, alive",
            )
        base = Ready(
            timeout=_num(spec.get("timeout"), timeout), interval=_num(spec.get("interval"), 0.2)
        )
        kind = probes[0] if probes else "alive"
        probe = spec.get(kind)
        if kind == "tcp":
            target = _map(probe)
            port = _int(probe, 0) if not target else _int(target.get("port"), 0)
            host = _str(target.get("host"), base.host) or base.host
            problem = _address_problem(host)
            if problem:
                self.report.value((*path, "tcp", "host"), f"address {host!r} {problem}")
            return Ready("tcp", base.timeout, base.interval, port=port, host=host)
        if kind == "http":
            url = _str(probe, "") or ""
            if not url.startswith(("http://", "https://")):
                self.report.value((*path, "http"), f"{url!r} is not an http:// or https:// URL")
            return Ready("http", base.timeout, base.interval, url=url)
        if kind == "command":
            argv = tuple(a for a in probe if isinstance(a, str)) if isinstance(probe, list) else ()
            return Ready("command", base.timeout, base.interval, argv=argv)
        if kind == "file":
            return Ready("file", base.timeout, base.interval, path=_str(probe, None))
        if kind == "notify":
            if probe is False:
                self.report.value((*path, "notify"), "notify: false is not a probe")
            return Ready("notify", base.timeout, base.interval)
        return Ready(
            "alive", base.timeout, base.interval, settle=_num(spec.get("alive"), base.settle)
        )

    def _placement(self, path: Path, value: Any, hosts: int) -> Placement:
        if value is None:
            return Placement()
        spec = _map(value)
        strategy = value if isinstance(value, str) else _str(spec.get("strategy"), "all")
        count = spec.get("count")
        count_int = _int(count, 0) if count is not None else None
        if strategy == "least-loaded":
            if count_int is None:
                self.report.value(
                    path,
                    "least-loaded placement needs a count >= 1",
                    "placement: {strategy: least-loaded, count: 2}",
                )
            elif hosts and count_int > hosts:
                self.report.value(
                    (*path, "count"), f"count {count_int} is more than the {hosts} host(s) of on"
                )
        elif count is not None:
            self.report.value((*path, "count"), "count applies only to least-loaded placement")
        return Placement(strategy or "all", count_int)

    def _files(self, path: Path, value: Any) -> tuple[FileSpec, ...]:
        files: list[FileSpec] = []
        for i, item in enumerate(value if isinstance(value, list) else []):
            spec = _map(item)
            src, dest = spec.get("src"), spec.get("dest")
            mode_text = spec.get("mode", "0644")
            mode = 0o644
            if isinstance(mode_text, str):
                if _MODE_RE.match(mode_text):
                    mode = int(mode_text.removeprefix("0o"), 8)
                else:
                    self.report.value(
                        (*path, i, "mode"),
                        f"{mode_text!r} is not an octal file mode",
                        'write three octal digits, e.g. mode: "0644"',
                    )
            if isinstance(dest, str) and not safe_relpath(dest):
                self.report.value(
                    (*path, i, "dest"),
                    f"{dest!r} leaves the program's files directory",
                    "give a relative path without '..', e.g. dest: conf/app.ini",
                )
            elif isinstance(src, str) and isinstance(dest, str):
                files.append(FileSpec(os.path.join(self.base_dir, src), dest, mode))
        return tuple(files)


# --- entry points ------------------------------------------------------------------------------


def tree_problems(
    programs: Sequence[Program], relay_identity: str | None
) -> list[tuple[Path, str, str]]:
    """Why ``programs`` cannot be launched with ``strategy: tree``: (key path, message, hint)
    for each. Relays only pass launch lines on; what the launcher does over its own connection
    to a host (files over SFTP, load probes) it cannot do through them."""
    out: list[tuple[Path, str, str]] = []
    if relay_identity is None:
        out.append(
            (
                ("defaults", "strategy"),
                "strategy: tree needs defaults.relay_identity",
                "relay_identity: ~/.ssh/rex_relay (a private key file on the relay hosts that "
                "the hosts below them accept)",
            )
        )
    for p in programs:
        if p.files:
            out.append(
                (
                    ("programs", p.name, "files"),
                    "files cannot be uploaded through relays (strategy: tree)",
                    "launch this manifest with strategy: flat (rex apply --strategy flat)",
                )
            )
        if p.placement.strategy == "least-loaded":
            out.append(
                (
                    ("programs", p.name, "placement"),
                    "least-loaded placement probes every host from the launcher, "
                    "not with strategy: tree",
                    "launch this manifest with strategy: flat (rex apply --strategy flat)",
                )
            )
    return out


def _locate(text: str, index: int) -> Pos:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _decode(raw: bytes, report: _Report) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = raw[: exc.start].decode("utf-8")
        raise report.fatal(
            _locate(good, len(good)),
            (),
            f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8",
            "save the manifest as UTF-8",
        ) from None


def _text(data: bytes | str, raw: bytes, filename: str) -> str:
    """The manifest as text, once its size, encoding and characters are acceptable."""
    report = _Report(filename)
    try:
        if len(raw) > MAX_BYTES:
            raise report.fatal(
                (1, 1),
                (),
                f"the manifest is larger than {MAX_BYTES // (1024 * 1024)} MiB",
                "split it, or describe hosts with ranges such as node[001-999]",
            )
        text = data if isinstance(data, str) else _decode(raw, report)
        bad = _UNPRINTABLE.search(text)
        if bad:
            raise report.fatal(
                _locate(text, bad.start()),
                (),
                f"character U+{ord(bad.group()):04X} is not allowed in YAML",
                "remove the control character (write it with an escape in a quoted string)",
            )
    except _Fatal:
        raise ManifestError(report.items) from None
    return text


def _validate(text: str, raw: bytes, filename: str, track: bool) -> Manifest:
    report = _Report(filename, track=track)
    try:
        doc = _compose(text, report)
    except _Fatal:
        raise ManifestError(_ordered(report.items)) from None
    if not isinstance(doc, dict):
        report.value(
            (),
            f"the manifest must be a mapping, not {_show(doc)}",
            "start the manifest with 'rex: 1', then hosts:, users:, programs:, authorize:",
        )
        raise ManifestError(_ordered(report.items))
    _schema(doc, report)
    checker = _Checker(doc, report, os.path.dirname(os.path.abspath(filename)))
    callback, forks = checker.run()
    if report.items:
        raise ManifestError(_ordered(report.items))
    return Manifest(
        path=filename,
        digest=hashlib.sha256(raw).hexdigest(),
        hosts=tuple(checker.hosts),
        users=tuple(checker.users.values()),
        programs=tuple(checker.programs),
        authorize=tuple(a for a, _, _, _ in checker.authorize),
        callback=callback,
        forks=forks,
        default_user=_str(checker.defaults.get("user"), None),
        strategy=checker.strategy,
        fanout=checker.fanout,
        relay_identity=checker.relay_identity,
        persist=checker.persist(),
    )


def loads(data: bytes | str, filename: str = "<string>") -> Manifest:
    """Validate a manifest given as bytes or text; ``filename`` names it in diagnostics.

    Raises ManifestError carrying every problem found (YAML, schema and semantic) at once.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    text = _text(data, raw, filename)
    try:
        return _validate(text, raw, filename, track=False)
    except _Retry:
        return _validate(text, raw, filename, track=True)


def load(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate the manifest file at ``path``; raises ManifestError."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ManifestError(
            [Diagnostic(filename, 1, 1, "", f"cannot read the manifest: {exc.strerror or exc}")]
        ) from None
    return loads(raw, filename)


def _ordered(items: list[Diagnostic]) -> list[Diagnostic]:
    unique = list(dict.fromkeys(items))
    return sorted(unique, key=lambda d: (d.line, d.col, d.path))
