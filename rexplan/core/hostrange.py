"""Host ranges in ClusterShell NodeSet style (``node[001-147]``) and the address templates
they feed (``10.1.0.{n}``); the grammar is in rex-manifest(5), HOST RANGES."""

from __future__ import annotations

import itertools
import re
from functools import lru_cache
from typing import NamedTuple

#: most names one pattern may expand to
MAX_HOSTS = 100_000

_GROUP = re.compile(r"\[([^\[\]]*)\]")
_ITEM = re.compile(r"(\d+)(?:-(\d+))?\Z")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class RangeHost(NamedTuple):
    """One expanded name and the integer value it took from each range, in order."""

    name: str
    values: tuple[int, ...]


def is_range(pattern: str) -> bool:
    """Whether ``pattern`` is written as a range (it contains a bracket)."""
    return "[" in pattern or "]" in pattern


def _padded(text: str) -> bool:
    return len(text) > 1 and text.startswith("0")


def _parse_range(pattern: str, spec: str) -> list[tuple[str, int]]:
    """The (text, value) pairs of one bracketed range, checked and in the order written."""
    spans: list[tuple[int, int, int]] = []  # (lo, hi, width); width 0 means unpadded
    total = 0
    for item in spec.split(","):
        match = _ITEM.match(item.strip())
        if match is None:
            raise ValueError(f"{pattern!r}: bad range item {item!r}; expected N or N-M")
        lo_text, hi_text = match.group(1), match.group(2)
        hi_text = lo_text if hi_text is None else hi_text
        lo, hi = int(lo_text), int(hi_text)
        if lo > hi:
            raise ValueError(f"{pattern!r}: range {lo_text}-{hi_text} is reversed")
        width = len(lo_text) if _padded(lo_text) or _padded(hi_text) else 0
        if width and len(hi_text) != width:
            raise ValueError(
                f"{pattern!r}: {lo_text}-{hi_text} mixes zero-padded widths; "
                f"write both ends with {max(len(lo_text), len(hi_text))} digits"
            )
        total += hi - lo + 1
        if total > MAX_HOSTS:
            raise ValueError(f"{pattern!r} expands to more than {MAX_HOSTS} hosts")
        spans.append((lo, hi, width))
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    for lo, hi, width in spans:
        for value in range(lo, hi + 1):
            text = str(value).zfill(width)
            if text in seen:
                raise ValueError(f"{pattern!r}: {text} is listed twice")
            seen.add(text)
            out.append((text, value))
    return out


def expand(pattern: str) -> list[RangeHost]:
    """All names ``pattern`` stands for, in order; a plain name expands to itself."""
    if not is_range(pattern):
        return [RangeHost(pattern, ())]
    parts = _GROUP.split(pattern)
    literals, specs = parts[0::2], parts[1::2]
    for literal in literals:
        if "[" in literal or "]" in literal:
            raise ValueError(f"{pattern!r}: unbalanced '[' or ']'")
    ranges = [_parse_range(pattern, spec) for spec in specs]
    count = 1
    for r in ranges:
        count *= len(r)
    if count > MAX_HOSTS:
        raise ValueError(f"{pattern!r} expands to {count} hosts, more than {MAX_HOSTS}")
    if len(ranges) == 1:
        head, tail = literals
        return [RangeHost(f"{head}{text}{tail}", (value,)) for text, value in ranges[0]]
    hosts: list[RangeHost] = []
    for combo in itertools.product(*ranges):
        pieces = [literals[0]]
        for (text, _), literal in zip(combo, literals[1:], strict=True):
            pieces.append(text)
            pieces.append(literal)
        hosts.append(RangeHost("".join(pieces), tuple(value for _, value in combo)))
    return hosts


@lru_cache(maxsize=256)
def _template(template: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a template into literals and placeholder names, rejecting malformed braces."""
    parts = _PLACEHOLDER.split(template)
    literals, names = tuple(parts[0::2]), tuple(parts[1::2])
    for literal in literals:
        if "{" in literal or "}" in literal:
            raise ValueError(f"{template!r}: unbalanced '{{' or '}}'")
    for name in names:
        if name not in ("n", "name") and not re.fullmatch(r"n[1-9][0-9]?", name):
            raise ValueError(
                f"{template!r}: unknown placeholder {{{name}}}; use {{n}}, {{n1}}, {{n2}}, "
                "... or {name}"
            )
    return literals, names


def check_template(template: str, ranges: int) -> None:
    """Raise ValueError unless ``template`` is well formed for names with ``ranges`` ranges."""
    for name in _template(template)[1]:
        if name == "name":
            continue
        if ranges == 0:
            raise ValueError(f"{template!r} uses {{{name}}} but the host name has no range")
        if name != "n" and int(name[1:]) > ranges:
            raise ValueError(
                f"{template!r} uses {{{name}}} but the host name has only {ranges} range(s)"
            )


def render(template: str, host: RangeHost) -> str:
    """``template`` with its placeholders filled from ``host``; see the module docstring."""
    check_template(template, len(host.values))
    literals, names = _template(template)
    pieces = [literals[0]]
    for name, literal in zip(names, literals[1:], strict=True):
        if name == "name":
            pieces.append(host.name)
        elif name == "n":
            pieces.append(str(host.values[-1]))
        else:
            pieces.append(str(host.values[int(name[1:]) - 1]))
        pieces.append(literal)
    return "".join(pieces)
