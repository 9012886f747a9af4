"""An Ansible INI or YAML inventory read as Ansible's inventory plugins (ini, yaml) read it:
groups, ``children``, group and host variables, ``host:port``, and ranges ``web[01:20]``,
``db-[a:f]`` and ``[1:9:2]``, expanded as ansible.inventory.helpers.expand_hostname_range does.
"""

from __future__ import annotations

import ast
import contextlib
import re
import shlex
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rexplan.core import hostrange
from rexplan.errors import Diagnostic, ManifestError

#: Ansible's implicit groups: every host is in ``all``; ``ungrouped`` holds the groupless
IMPLICIT_GROUPS = ("all", "ungrouped")
#: host entries (a host in a group) plus their variables an inventory may add up to: a few
#: hundred bytes of ranges listed in many groups must not cost gigabytes
MAX_ENTRIES = 1_000_000
#: a name shown as is in a note or a YAML scalar: letters, digits and ``_.-``
PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")


class Opaque:
    """A value rex cannot read (an Ansible ``!vault`` string)."""


@dataclass
class Group:
    """One Ansible group: its hosts and child groups in the order written, and its variables."""

    hosts: dict[str, None] = field(default_factory=dict)  # an ordered set
    children: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)


@dataclass
class Inventory:
    """A parsed inventory: host variables in order of first appearance, and the groups."""

    source: str
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: host entries and variables added so far (see MAX_ENTRIES)
    entries: int = 0

    def group(self, name: str) -> Group:
        return self.groups.setdefault(name, Group())

    def add_host(self, group: str, name: str, variables: Mapping[str, Any]) -> None:
        """Add ``name`` to ``group``; ValueError past MAX_ENTRIES."""
        self.entries += 1 + len(variables)
        if self.entries > MAX_ENTRIES:
            raise ValueError(
                f"the inventory adds up to more than {MAX_ENTRIES:,} host entries and "
                "variables (hosts x groups they are listed in)"
            )
        self.hosts.setdefault(name, {}).update(variables)
        self.group(group).hosts[name] = None

    def add_child(self, parent: str, child: str) -> None:
        self.group(child)
        children = self.group(parent).children
        if child not in children:
            children.append(child)


# --- host patterns ----------------------------------------------------------------------------


def expand_range(pattern: str) -> list[str]:
    """The names an Ansible host range stands for, in order; raises ValueError.

    ``[BEG:END]`` or ``[BEG:END:STEP]``, numeric (a leading zero fixes the width, both ends
    then the same width; an empty BEG is 0) or single letters (``[a:f]``); several ranges
    expand first range outermost.
    """
    start = pattern.find("[")
    if start < 0:
        return [pattern]
    end = pattern.find("]", start)
    if end < 0:
        raise ValueError(f"{pattern!r}: '[' without ']'")
    head, spec, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    bounds = spec.split(":")
    if len(bounds) not in (2, 3):
        raise ValueError(f"{pattern!r}: a host range is [begin:end] or [begin:end:step]")
    beg, last = bounds[0] or "0", bounds[1]
    step_text = bounds[2] if len(bounds) == 3 else "1"
    if not last:
        raise ValueError(f"{pattern!r}: the host range has no end")
    if not step_text.isdigit() or int(step_text) < 1:
        raise ValueError(f"{pattern!r}: the step must be a whole number >= 1")
    step = int(step_text)
    items: list[str]
    letters = string.ascii_letters
    if len(beg) == 1 and len(last) == 1 and beg in letters and last in letters:
        if letters.index(beg) > letters.index(last):
            raise ValueError(f"{pattern!r}: the host range must have begin <= end")
        items = list(letters[letters.index(beg) : letters.index(last) + 1 : step])
    elif beg.isdigit() and last.isdigit():
        if int(beg) > int(last):
            raise ValueError(f"{pattern!r}: the host range must have begin <= end")
        width = len(beg) if beg[0] == "0" and len(beg) > 1 else 0
        if width and len(last) != width:
            raise ValueError(f"{pattern!r}: begin and end of a zero-padded range differ in width")
        if int(last) - int(beg) >= hostrange.MAX_HOSTS * step:
            raise ValueError(f"{pattern!r} expands to more than {hostrange.MAX_HOSTS} hosts")
        items = [str(n).zfill(width) for n in range(int(beg), int(last) + 1, step)]
    else:
        raise ValueError(f"{pattern!r}: a range is of numbers or of single letters")
    names: list[str] = []
    for item in items:
        names.extend(expand_range(f"{head}{item}{tail}"))
        if len(names) > hostrange.MAX_HOSTS:
            raise ValueError(f"{pattern!r} expands to more than {hostrange.MAX_HOSTS} hosts")
    return names


def expand_hostpattern(pattern: str) -> tuple[list[str], int | None]:
    """(host names, port) of an inventory host entry such as ``web[01:20].example.com:2222``."""
    port: int | None = None
    head, sep, tail = pattern.rpartition(":")
    # a colon inside brackets belongs to a range; one left outside means an IPv6 address
    if sep and tail.isdigit() and ":" not in re.sub(r"\[[^\]]*\]", "", head):
        pattern, port = head, int(tail)
    return expand_range(pattern), port


# --- INI ----------------------------------------------------------------------------------------


def _literal(text: str) -> Any:
    """An INI value as Ansible reads it: a Python literal when it is one, else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_ini(text: str, source: str = "<inventory>") -> Inventory:
    """An Ansible INI inventory; raises ManifestError naming the line of the first problem."""
    inv = Inventory(source)
    group, kind = "ungrouped", "hosts"
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        try:
            if line.startswith("["):
                match = _SECTION.match(line)
                if match is None:
                    raise ValueError(f"invalid section header {line!r}")
                group, kind = match.group(1), match.group(2) or "hosts"
                if kind not in ("hosts", "children", "vars"):
                    raise ValueError(f"section [{group}:{kind}]: use :children or :vars")
                inv.group(group)
            elif kind == "hosts":
                _ini_hosts(inv, group, line)
            elif kind == "children":
                inv.add_child(group, _ini_word(line))
            else:
                name, sep, value = line.partition("=")
                if not sep or not name.strip():
                    raise ValueError(f"expected name=value, got {line!r}")
                inv.group(group).vars[name.strip()] = _literal(value.strip())
        except ValueError as exc:
            raise inventory_error(source, number, str(exc)) from None
    return inv


def _ini_word(line: str) -> str:
    words = shlex.split(line, comments=True)
    if len(words) != 1:
        raise ValueError(f"expected one group name, got {line!r}")
    return words[0]


def _ini_hosts(inv: Inventory, group: str, line: str) -> None:
    words = shlex.split(line, comments=True)
    if not words:
        return
    names, port = expand_hostpattern(words[0])
    variables: dict[str, Any] = {}
    for word in words[1:]:
        name, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"expected name=value after the host name, got {word!r}")
        variables[name] = _literal(value)
    if port is not None:
        variables["ansible_port"] = port
    for name in names:
        inv.add_host(group, name, variables)


# --- YAML ---------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus Ansible's ``!vault`` and ``!unsafe`` tags."""


def _vault(loader: yaml.SafeLoader, node: yaml.Node) -> Opaque:
    return Opaque()


def _unsafe(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    return Opaque()


_Loader.add_constructor("!vault", _vault)
_Loader.add_constructor("!unsafe", _unsafe)


def _safe_load(text: str) -> Any:
    """One YAML document through the safe loader (plus Ansible's two tags)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str = "<inventory>") -> Inventory:
    """An Ansible YAML inventory (the yaml inventory plugin's format); raises ManifestError."""
    try:
        doc = _safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise inventory_error(
            source, line, f"invalid YAML: {getattr(exc, 'problem', exc)}"
        ) from None
    except RecursionError:
        raise inventory_error(source, 1, "invalid YAML: nested too deeply") from None
    except ValueError as exc:  # PyYAML's int() of a number of more than 4300 digits
        raise inventory_error(source, 1, f"invalid YAML: {exc}") from None
    inv = Inventory(source)
    if doc is None:
        return inv
    if not isinstance(doc, dict):
        raise inventory_error(source, 1, "a YAML inventory is a mapping of group names")
    walked: set[tuple[str, int]] = set()
    for name, body in doc.items():
        _yaml_group(inv, str(name), body, walked)
    return inv


def _yaml_group(
    inv: Inventory, name: str, body: Any, walked: set[tuple[str, int]], depth: int = 0
) -> None:
    """Add group ``name`` as ``body`` describes it, children first walked here.

    A YAML alias makes one body appear in many places: each (name, body) is walked once, so
    aliases nested n deep cost n walks, not 2**n. ``walked`` holds id()s of nodes that live
    as long as the document.
    """
    if depth > 64:
        raise inventory_error(inv.source, 0, f"group {name!r}: children nested too deeply")
    group = inv.group(name)
    if body is None or (name, id(body)) in walked:
        return
    walked.add((name, id(body)))
    if not isinstance(body, dict):
        raise inventory_error(
            inv.source, 0, f"group {name!r} must be a mapping (hosts, children, vars)"
        )
    for key in body:
        if key not in ("hosts", "children", "vars"):
            inv.notes.append(
                f"group {named(name)}: key {key!r} ignored (not hosts, children or vars)"
            )
    variables = body.get("vars") or {}
    if not isinstance(variables, dict):
        raise inventory_error(inv.source, 0, f"group {name!r}: vars must be a mapping")
    group.vars.update({str(k): v for k, v in variables.items()})
    hosts = body.get("hosts") or {}
    if not isinstance(hosts, dict):
        raise inventory_error(inv.source, 0, f"group {name!r}: hosts must be a mapping")
    for pattern, host_vars in hosts.items():
        if host_vars is not None and not isinstance(host_vars, dict):
            raise inventory_error(
                inv.source, 0, f"host {pattern!r}: its variables must be a mapping"
            )
        try:
            names, port = expand_hostpattern(str(pattern))
        except ValueError as exc:
            raise inventory_error(inv.source, 0, str(exc)) from None
        variables = {str(k): v for k, v in (host_vars or {}).items()}
        if port is not None:
            variables.setdefault("ansible_port", port)
        try:
            for host in names:
                inv.add_host(name, host, variables)
        except ValueError as exc:
            raise inventory_error(inv.source, 0, str(exc)) from None
    children = body.get("children") or {}
    if not isinstance(children, dict):
        raise inventory_error(inv.source, 0, f"group {name!r}: children must be a mapping")
    for child, child_body in children.items():
        inv.add_child(name, str(child))
        _yaml_group(inv, str(child), child_body, walked, depth + 1)


def parse_inventory(text: str, source: str = "<inventory>") -> Inventory:
    """INI or YAML, as Ansible would pick: by extension, else whichever the text is."""
    suffix = Path(source).suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        return parse_yaml(text, source)
    if suffix not in (".ini", ".cfg", ".hosts"):
        with contextlib.suppress(yaml.YAMLError, ValueError, RecursionError):
            doc = _safe_load(text)
            if isinstance(doc, dict) and all(
                v is None or isinstance(v, dict) for v in doc.values()
            ):
                return parse_yaml(text, source)
    return parse_ini(text, source)


def inventory_error(source: str, line: int, message: str) -> ManifestError:
    return ManifestError([Diagnostic(source, line, 1 if line else 0, "", message)])


def named(name: str) -> str:
    """A group or variable name for a comment: as is when plain (letters, digits, ``_.-``),
    else as repr(), so quotes and escapes show where it starts, ends and what it holds."""
    return name if PLAIN.match(name) else repr(name)
