"""YAML composed with file:line:column positions, and the report that turns key paths into them."""

from __future__ import annotations

import re
from typing import Any

import yaml

from rexplan.errors import Diagnostic

#: deepest nesting of mappings and lists
MAX_DEPTH = 64
#: nodes that aliases may copy in, across the document ("billion laughs" stop here)
MAX_ALIAS_NODES = 100_000
#: nodes written in the document, so memory stays bounded within MAX_BYTES
MAX_NODES = 2_000_000

KeyPath = tuple[str | int, ...]
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

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NODE_EVENTS = (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)


class Fatal(Exception):
    """The YAML layer cannot go on; the diagnostic that says why is in the report."""


class Retry(Exception):
    """A problem turned up in the untracked pass: load again, keeping positions."""


class Report:
    """Where every key and value was written, and the diagnostics found so far.

    Positions live beside the data: ``tables`` maps ``id(container)`` to the positions of its
    values and keys, so composing builds no per-node path; ``where(path)`` walks the tree.
    Keeping them costs as much as parsing, so a first pass runs with ``track`` off and gives
    up (Retry) at the first problem; only a manifest with problems is composed twice.
    """

    def __init__(self, filename: str, *, track: bool = True) -> None:
        self.filename = filename
        self.track = track
        self.root: Any = None
        self.root_pos: Pos = (1, 1)
        self.tables: dict[int, tuple[Any, dict[str, Pos]]] = {}
        self.kept: list[Any] = []  # values under duplicate keys: alive, so no id is reused
        self.items: list[Diagnostic] = []

    def where(self, path: KeyPath, *, key: bool = False) -> Pos:
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

    def add(self, pos: Pos, path: KeyPath, message: str, hint: str | None = None) -> None:
        if not self.track:
            raise Retry
        dotted = ".".join(str(p) for p in path)
        self.items.append(Diagnostic(self.filename, pos[0], pos[1], dotted, message, hint))

    def value(self, path: KeyPath, message: str, hint: str | None = None) -> None:
        self.add(self.where(path), path, message, hint)

    def key(self, path: KeyPath, message: str, hint: str | None = None) -> None:
        self.add(self.where(path, key=True), path, message, hint)

    def fatal(self, pos: Pos, path: KeyPath, message: str, hint: str | None = None) -> Fatal:
        self.add(pos, path, message, hint)
        return Fatal(message)


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
        self, container: Any, path: KeyPath | None, anchor: str | None, report: Report
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


def compose(text: str, report: Report) -> Any:
    """Plain Python data from one YAML document, recording positions; raises Fatal."""
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


def _build(loader: Any, report: Report) -> Any:
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


def _path(frame: _Frame) -> KeyPath:
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


def _odd_key(frame: _Frame, event: Any, tag: str | None, report: Report) -> None:
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
