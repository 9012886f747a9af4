"""The manifest's JSON Schema: a fast yes/no check, then jsonschema's errors as diagnostics."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from functools import lru_cache, partial
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema

from rexplan.core.yamlpos import KeyPath, Report


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    text = resources.files("rexplan.resources").joinpath("manifest.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema  # itself checked against the metaschema by the tests, not on every run


@lru_cache(maxsize=1)
def validator() -> jsonschema.Draft202012Validator:
    # imported here: only a manifest the fast check refuses needs it, and importing it costs
    # more than loading and planning most manifests
    import jsonschema

    return jsonschema.Draft202012Validator(document())


_Check = Callable[[Any], bool]
#: x-what: what a string failing the key's pattern should be, for its diagnostic
_ANNOTATIONS = frozenset(("$schema", "$id", "$defs", "title", "description", "then", "x-what"))


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
def accepts() -> _Check:
    schema = document()
    return _compile(schema, schema.get("$defs", {}), {})


def show(value: Any) -> str:
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


def close(word: str, choices: Any) -> str | None:
    if len(choices) > 2000:  # difflib costs ~20 us a candidate: no hint beats a slow one
        return None
    match = difflib.get_close_matches(word, sorted(choices), n=1)
    return f"did you mean {match[0]!r}?" if match else None


def _type_hint(path: KeyPath, value: Any, expected: list[str]) -> str | None:
    if path and path[-1] == "mode":
        return 'write the mode as a quoted octal string, e.g. mode: "0644"'
    if path and path[-1] == "run" and isinstance(value, str):
        return "run takes an argv list, e.g. [python3, app.py]; use shell: for a command line"
    if "string" in expected and isinstance(value, (bool, int, float)):
        return f'quote it: "{show(value)}"'
    return None


def check(doc: Any, report: Report) -> None:
    if accepts()(doc):
        return
    required_seen: set[tuple[KeyPath, str]] = set()
    for err in validator().iter_errors(doc):
        path: KeyPath = tuple(err.absolute_path)
        kind, want, value = err.validator, err.validator_value, err.instance
        if kind == "additionalProperties":
            known = err.schema.get("properties", {})
            for extra in value:
                if extra not in known:
                    fields = "known fields: " + ", ".join(sorted(known))
                    report.key(
                        (*path, extra), f"unknown field {extra!r}", close(extra, known) or fields
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
                path, f"{show(value)} is not of type {types}", _type_hint(path, value, expected)
            )
        elif kind == "enum":
            choices = ", ".join(repr(c) for c in want)
            near = close(value, want) if isinstance(value, str) else None
            report.value(path, f"{show(value)} is not one of {choices}", near)
        elif kind == "minimum":
            report.value(path, f"{show(value)} is less than the minimum of {want}")
        elif kind == "maximum":
            report.value(path, f"{show(value)} is more than the maximum of {want}")
        elif kind == "exclusiveMinimum":
            report.value(path, f"{show(value)} must be greater than {want}")
        elif kind in ("minLength", "minItems"):
            report.value(path, "must not be empty")
        elif kind == "pattern":
            # the schema's patterns: the count-or-percentage keys (max_fail, serial), else
            # what the schema's x-what names
            what = err.schema.get("x-what", "a count or a percentage")
            report.value(path, f"{show(value)} is not {what}", err.schema.get("description"))
        else:
            report.value(path, err.message)
