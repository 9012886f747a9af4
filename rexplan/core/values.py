"""Typed reads of schema-checked manifest values, and the rules names and addresses follow."""

from __future__ import annotations

import re
from typing import Any

from rexplan.core.model import HOST_RE, NAME_RE, Pairs

_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f]|\s|/|\.\.|\A-")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9_.:%-]+\Z")


def as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_str(value: Any, default: str | None) -> str | None:
    return value if isinstance(value, str) else default


def as_int(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return int(value) if float(value).is_integer() else default


def as_num(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)


def count_or_percent(value: Any) -> tuple[int | None, float | None]:
    """``3`` -> (3, None), ``'25%'`` -> (None, 25.0); the schema checked the forms."""
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        return None, float(value[:-1])
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    return None, None


def name_items(value: Any) -> list[tuple[int | None, str]]:
    """`on`/`requires` items with their list index (None for a single string)."""
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, list):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, str)]
    return []


def as_pairs(value: Any) -> Pairs:
    if not value:
        return ()
    return tuple(sorted((k, v) for k, v in as_map(value).items() if isinstance(v, str)))


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


def name_problem(name: str) -> str | None:
    if NAME_RE.match(name):
        return None
    problem = _unsafe(name)
    if problem is None and "." in name:
        problem = "contains '.' (triples are host.user.program, so only host names have dots)"
    if problem is None and len(name) > 32:
        problem = "is longer than 32 characters"
    return problem or "must be lowercase letters, digits, '_' and '-', not starting with a digit"


def host_problem(name: str) -> str | None:
    if len(name) <= 253 and HOST_RE.match(name):
        return None
    problem = _unsafe(name)
    if problem is None and len(name) > 253:
        problem = "is longer than 253 characters"
    return problem or "is not hostname-like (letters, digits, '-' and '_' in dot-separated labels)"


def address_problem(address: str) -> str | None:
    if _ADDRESS_RE.match(address) and ".." not in address and not address.startswith("-"):
        return None
    return _unsafe(address) or "is not a host name or IP address"
