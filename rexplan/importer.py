"""`rex import ansible`: an Ansible INI or YAML inventory as a rex ``hosts:`` section.

Parsing follows Ansible's inventory plugins (ini, yaml): groups, ``children``, group and host
variables, ``host:port``, and ranges ``web[01:20]``, ``db-[a:f]`` and ``[1:9:2]``, expanded
as ansible.inventory.helpers.expand_hostname_range does. Variables combine as Ansible does:
``all`` first, then each group by depth (children after their parents) and name, then the
host's own. Only ``ansible_host``, ``ansible_port``, ``ansible_user`` (their old
``ansible_ssh_*`` spellings too) and ``ansible_connection: local`` become rex fields; every
other variable is named in a comment, never its value (it may be a password).
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import os
import re
import reprlib
import secrets
import shlex
import string
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rexplan import __version__, hostrange, ui
from rexplan.errors import Diagnostic, ManifestError, UsageError
from rexplan.model import HOST_RE, NAME_RE

#: Ansible's implicit groups: every host is in ``all``; ``ungrouped`` holds the groupless
IMPLICIT_GROUPS = ("all", "ungrouped")
#: the variables rex converts (address, port, user, transport), with the older spellings
CONVERTED = frozenset(
    (
        "ansible_host",
        "ansible_ssh_host",
        "ansible_port",
        "ansible_ssh_port",
        "ansible_user",
        "ansible_ssh_user",
        "ansible_connection",
    )
)
_SSH_CONNECTIONS = ("ssh", "paramiko", "smart")
#: host entries (a host in a group) plus their variables an inventory may add up to: a few
#: hundred bytes of ranges listed in many groups must not cost gigabytes
MAX_ENTRIES = 1_000_000
_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")
_ADDRESS = re.compile(r"[A-Za-z0-9_.:%-]+\Z")
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
# plain words a YAML 1.1 reader (PyYAML) takes for booleans or null, in any case
_YAML_WORDS = frozenset("y n yes no on off true false null".split())


class _Opaque:
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


@dataclass(frozen=True)
class ImportedHost:
    """A rex host made from an inventory host; ``notes`` say what was left out and why."""

    name: str
    address: str | None = None
    port: int | None = None
    user: str | None = None
    transport: str | None = None
    groups: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


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
            raise _error(source, number, str(exc)) from None
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


def _vault(loader: yaml.SafeLoader, node: yaml.Node) -> _Opaque:
    return _Opaque()


def _unsafe(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    return _Opaque()


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
        raise _error(source, line, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise _error(source, 1, "invalid YAML: nested too deeply") from None
    except ValueError as exc:  # PyYAML's int() of a number of more than 4300 digits
        raise _error(source, 1, f"invalid YAML: {exc}") from None
    inv = Inventory(source)
    if doc is None:
        return inv
    if not isinstance(doc, dict):
        raise _error(source, 1, "a YAML inventory is a mapping of group names")
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
        raise _error(inv.source, 0, f"group {name!r}: children nested too deeply")
    group = inv.group(name)
    if body is None or (name, id(body)) in walked:
        return
    walked.add((name, id(body)))
    if not isinstance(body, dict):
        raise _error(inv.source, 0, f"group {name!r} must be a mapping (hosts, children, vars)")
    for key in body:
        if key not in ("hosts", "children", "vars"):
            inv.notes.append(
                f"group {_named(name)}: key {key!r} ignored (not hosts, children or vars)"
            )
    variables = body.get("vars") or {}
    if not isinstance(variables, dict):
        raise _error(inv.source, 0, f"group {name!r}: vars must be a mapping")
    group.vars.update({str(k): v for k, v in variables.items()})
    hosts = body.get("hosts") or {}
    if not isinstance(hosts, dict):
        raise _error(inv.source, 0, f"group {name!r}: hosts must be a mapping")
    for pattern, host_vars in hosts.items():
        if host_vars is not None and not isinstance(host_vars, dict):
            raise _error(inv.source, 0, f"host {pattern!r}: its variables must be a mapping")
        try:
            names, port = expand_hostpattern(str(pattern))
        except ValueError as exc:
            raise _error(inv.source, 0, str(exc)) from None
        variables = {str(k): v for k, v in (host_vars or {}).items()}
        if port is not None:
            variables.setdefault("ansible_port", port)
        try:
            for host in names:
                inv.add_host(name, host, variables)
        except ValueError as exc:
            raise _error(inv.source, 0, str(exc)) from None
    children = body.get("children") or {}
    if not isinstance(children, dict):
        raise _error(inv.source, 0, f"group {name!r}: children must be a mapping")
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


def _error(source: str, line: int, message: str) -> ManifestError:
    return ManifestError([Diagnostic(source, line, 1 if line else 0, "", message)])


# --- conversion ---------------------------------------------------------------------------------


def _parents(inv: Inventory) -> dict[str, list[str]]:
    parents: dict[str, list[str]] = {name: [] for name in inv.groups}
    for name, group in inv.groups.items():
        for child in group.children:
            parents[child].append(name)
    return parents


def _depths(inv: Inventory, parents: dict[str, list[str]]) -> dict[str, int]:
    """Ansible's group depth: ``all`` 0, a group without parents 1, else its parents' max + 1."""
    depths: dict[str, int] = {"all": 0}
    visiting: set[str] = set()

    def depth(name: str) -> int:
        if name in depths:
            return depths[name]
        if name in visiting:
            raise _error(inv.source, 0, f"group {name!r} is its own descendant through children")
        visiting.add(name)
        above = [depth(p) for p in parents[name]]
        visiting.discard(name)
        depths[name] = max(above, default=0) + 1
        return depths[name]

    for name in inv.groups:
        depth(name)
    return depths


def _ancestors(name: str, parents: dict[str, list[str]]) -> list[str]:
    found: dict[str, None] = {}  # an ordered set
    todo = collections.deque(parents.get(name, ()))
    while todo:
        group = todo.popleft()
        if group not in found:
            found[group] = None
            todo.extend(parents.get(group, ()))
    return list(found)


def _user_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        return (
            f"ansible_user {_shown(value)} is not a rex user name ([a-z_][a-z0-9_-]{{0,31}}); "
            "declare a user with that login: and set user: by hand"
        )
    return None


def _named(name: str) -> str:
    """A group or variable name for a comment: as is when plain (letters, digits, ``_.-``),
    else as repr(), so quotes and escapes show where it starts, ends and what it holds."""
    return name if _PLAIN.match(name) else repr(name)


class _Repr(reprlib.Repr):
    """repr() with bounded cost: a few items of a few levels, and a long number by its size.

    An inventory's value may be a YAML alias bomb (a list of nine lists of nine lists ...:
    600 bytes stand for 9**9 strings) or a number too long for repr() (a hex literal in an INI
    file): repr() of either takes gigabytes or raises, printable's cap comes too late."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 6
        self.maxstring = self.maxother = 200
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<a number of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _Repr()


def _shown(value: Any) -> str:
    """A value for a note: bounded work whatever it is, one printable line."""
    if isinstance(value, _Opaque):
        return "(vaulted)"
    return ui.printable(_REPR.repr(value))


def _is_address(value: Any) -> bool:
    """Whether rex takes ``value`` as a host's address (rexplan.manifest checks the same)."""
    return (
        isinstance(value, str)
        and _ADDRESS.match(value) is not None
        and ".." not in value
        and not value.startswith("-")
    )


def _port(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 5:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    return None


def _host_problem(name: str) -> str | None:
    if len(name) <= 253 and HOST_RE.match(name):
        return None
    return "not a rex host name (letters, digits, '-' and '_' in dot-separated labels)"


def convert(inv: Inventory) -> tuple[list[ImportedHost], list[str]]:
    """The rex hosts of an inventory, in order of first appearance, and notes on the whole."""
    parents = _parents(inv)
    depths = _depths(inv, parents)
    notes = list(inv.notes)
    rex_groups: dict[str, bool] = {}
    for name in inv.groups:
        if name in IMPLICIT_GROUPS:
            continue
        valid = NAME_RE.match(name) is not None
        rex_groups[name] = valid
        if not valid:
            notes.append(
                f"group {name!r} left out: not a rex group name ([a-z_][a-z0-9_-]{{0,31}})"
            )
    for name in sorted(inv.groups, key=lambda g: (depths[g], g)):
        other = [v for v in inv.groups[name].vars if v not in CONVERTED]
        if other:
            names = ", ".join(_named(v) for v in other)
            notes.append(f"group {_named(name)}: variables not converted: {names}")
    memberships: dict[str, list[str]] = {name: [] for name in inv.hosts}
    for group_name, group in inv.groups.items():
        for host in group.hosts:
            memberships[host].append(group_name)
    # a range puts many hosts in the same groups: their groups and the variables those give
    # are worked out once per distinct set of groups, not once per host
    ancestors: dict[str, list[str]] = {}
    members: dict[tuple[str, ...], tuple[list[str], dict[str, Any]]] = {}
    hosts = []
    for name, direct in memberships.items():
        known = members.get(tuple(direct))
        if known is None:
            member = dict.fromkeys(direct)
            for g in direct:
                if g not in ancestors:
                    ancestors[g] = _ancestors(g, parents)
                member.update(dict.fromkeys(a for a in ancestors[g] if a not in member))
            known = members[tuple(direct)] = (list(member), _inherited(inv, member, depths))
        hosts.append(_convert_host(inv, name, known[0], known[1], rex_groups))
    return hosts, notes


def _inherited(inv: Inventory, member: Iterable[str], depths: dict[str, int]) -> dict[str, Any]:
    """The converted variables groups give their hosts: ``all`` first, then each group by
    depth and name (the later wins)."""
    combined: dict[str, Any] = {}
    for group in sorted({"all", *member}, key=lambda g: (depths.get(g, 0), g)):
        if group in inv.groups:
            variables = inv.groups[group].vars
            combined.update((k, variables[k]) for k in CONVERTED if k in variables)
    return combined


def _convert_host(
    inv: Inventory,
    name: str,
    member: list[str],
    inherited: dict[str, Any],
    rex_groups: dict[str, bool],
) -> ImportedHost:
    combined = dict(inherited)
    combined.update(inv.hosts[name])
    notes: list[str] = []
    problem = _host_problem(name)
    if problem:
        return ImportedHost(name, notes=(f"host {name!r} left out: {problem}",))

    def pick(*names: str) -> tuple[str, Any] | None:
        for var in names:
            if var in combined:
                return var, combined[var]
        return None

    address = port = user = transport = None
    found = pick("ansible_host", "ansible_ssh_host")
    if found is not None:
        var, value = found
        if _is_address(value):
            address = None if value == name else value
        else:
            notes.append(f"{var} {_shown(value)} is not an address rex reads; not converted")
    found = pick("ansible_port", "ansible_ssh_port")
    if found is not None:
        port = _port(found[1])
        if port is None:
            notes.append(f"{found[0]} {_shown(found[1])} is not a TCP port; not converted")
    found = pick("ansible_user", "ansible_ssh_user")
    if found is not None:
        problem = _user_problem(found[1])
        if problem:
            notes.append(problem)
        else:
            user = found[1]
    connection = combined.get("ansible_connection")
    if connection == "local":
        transport = "local"
    elif connection is not None and connection not in _SSH_CONNECTIONS:
        notes.append(f"ansible_connection {_shown(connection)} is not supported; left as ssh")
    other = [v for v in inv.hosts[name] if v not in CONVERTED]
    if other:
        notes.append(f"variables not converted: {', '.join(_named(v) for v in other)}")
    groups = tuple(g for g in member if rex_groups.get(g))
    return ImportedHost(name, address, port, user, transport, groups, tuple(notes))


# --- output -------------------------------------------------------------------------------------


def _scalar(text: str) -> str:
    """``text`` as a YAML scalar: plain when that reads back as the same string."""
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str, indent: str) -> list[str]:
    # YAML ends a comment at \x85, U+2028 and U+2029 too: printable escapes them (and every
    # other character str.isprintable() rejects), so the comment cannot end early
    return textwrap.wrap(
        ui.printable(text, None),
        width=96,
        initial_indent=f"{indent}# ",
        subsequent_indent=f"{indent}#   ",
        break_on_hyphens=False,
    )


def format_hosts(hosts: list[ImportedHost], notes: list[str], source: str) -> str:
    """The ``hosts:`` section as YAML text, with a header comment and a comment per note."""
    kept = [h for h in hosts if not _host_problem(h.name)]
    users = sorted({h.user for h in kept if h.user})
    lines = [
        f"# rex hosts imported from {ui.printable(source)} by 'rex import ansible' (rex "
        f"{__version__}).",
        "# Ranges are expanded; Ansible groups (and their parents through children) are",
        "# groups:; ansible_host, ansible_port, ansible_user and ansible_connection=local are",
        "# converted; other variables are named in comments and left out.",
    ]
    if users:
        lines.append("# The hosts name these users; declare each under users: (with login:):")
        lines += _comment(", ".join(users), "")
    for note in notes:
        lines += _comment(note, "")
    lines.append("hosts:" if kept else "hosts: {}")
    for h in hosts:
        for note in h.notes:
            lines += _comment(note, "  ")
        if _host_problem(h.name):
            continue
        fields = []
        if h.address is not None:
            fields.append(f"address: {_scalar(h.address)}")
        if h.port is not None:
            fields.append(f"port: {h.port}")
        if h.user is not None:
            fields.append(f"user: {_scalar(h.user)}")
        if h.transport is not None:
            fields.append(f"transport: {h.transport}")
        if h.groups:
            fields.append(f"groups: [{', '.join(_scalar(g) for g in h.groups)}]")
        lines.append(f"  {_scalar(h.name)}: {{{', '.join(fields)}}}")
    return "\n".join(lines) + "\n"


def import_ansible(text: str, source: str = "<inventory>") -> str:
    """An inventory's text as rex ``hosts:`` YAML; raises ManifestError if it cannot be read."""
    hosts, notes = convert(parse_inventory(text, source))
    return format_hosts(hosts, notes, source)


def write_new(path: str | os.PathLike[str], text: str, *, force: bool = False) -> None:
    """Write ``text`` to ``path`` atomically; an existing file is replaced only with ``force``."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.rex-{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        try:
            data = memoryview(text.encode("utf-8"))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, target)
        else:
            # link() fails when the target exists, so a file made meanwhile is never clobbered
            os.link(tmp, target)
    except FileExistsError:
        raise UsageError(f"{path} exists", hint="add --force to replace it") from None
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def cmd_import(args: argparse.Namespace, console: ui.Console) -> int:
    """``rex import ansible INVENTORY [-o FILE] [--force]``: YAML to stdout or to FILE."""
    try:
        with open(args.inventory, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise _error(args.inventory, 0, f"cannot read the inventory: {reason}") from None
    result = import_ansible(text, args.inventory)
    if args.output is None or args.output == "-":
        ui.print_text(console, result)
    else:
        write_new(args.output, result, force=args.force)
    return 0


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``rex import ansible`` on ``rex``'s subcommands."""
    parser = subparsers.add_parser(
        "import",
        help="convert another tool's host list into a rex hosts: section",
        description="Convert another tool's host list into a rex hosts: section.",
    )
    kinds = parser.add_subparsers(dest="import_kind", metavar="FORMAT", required=True)
    ansible = kinds.add_parser(
        "ansible",
        help="an Ansible inventory, INI or YAML",
        description=textwrap.fill(
            "Read an Ansible inventory (INI or YAML) and print a rex hosts: section: ranges "
            "expanded, groups and their parents as groups:, ansible_host, ansible_port, "
            "ansible_user and ansible_connection=local converted, everything else named in "
            "comments. No host is contacted.",
            79,
        ),
    )
    ansible.add_argument("inventory", metavar="INVENTORY", help="the inventory file")
    ansible.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE atomically instead of stdout ('-': stdout)",
    )
    ansible.add_argument(
        "--force", action="store_true", help="replace FILE if it exists (default: refuse)"
    )
    parser.set_defaults(func=cmd_import)
