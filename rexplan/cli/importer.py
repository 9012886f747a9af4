"""`rex import ansible`: an Ansible inventory (rexplan.cli.inventory) as a rex ``hosts:`` section.

Variables combine as Ansible does: ``all`` first, then each group by depth (children after
their parents) and name, then the host's own. Only ``ansible_host``, ``ansible_port``,
``ansible_user`` (their old ``ansible_ssh_*`` spellings too) and ``ansible_connection: local``
become rex fields; every other variable is named in a comment, never its value (it may be a
password).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import reprlib
import secrets
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rexplan import __version__
from rexplan.cli.inventory import (
    IMPLICIT_GROUPS,
    PLAIN,
    Inventory,
    Opaque,
    inventory_error,
    named,
    parse_inventory,
)
from rexplan.core.model import HOST_RE, NAME_RE
from rexplan.core.text import printable
from rexplan.errors import UsageError

if TYPE_CHECKING:
    from rexplan.cli import ui

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
_ADDRESS = re.compile(r"[A-Za-z0-9_.:%-]+\Z")
# plain words a YAML 1.1 reader (PyYAML) takes for booleans or null, in any case
_YAML_WORDS = frozenset("y n yes no on off true false null".split())


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
            raise inventory_error(
                inv.source, 0, f"group {name!r} is its own descendant through children"
            )
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
    if isinstance(value, Opaque):
        return "(vaulted)"
    return printable(_REPR.repr(value))


def _is_address(value: Any) -> bool:
    """Whether rex takes ``value`` as a host's address (rexplan.core.manifest checks the same)."""
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
            names = ", ".join(named(v) for v in other)
            notes.append(f"group {named(name)}: variables not converted: {names}")
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
        notes.append(f"variables not converted: {', '.join(named(v) for v in other)}")
    groups = tuple(g for g in member if rex_groups.get(g))
    return ImportedHost(name, address, port, user, transport, groups, tuple(notes))


# --- output -------------------------------------------------------------------------------------


def _scalar(text: str) -> str:
    """``text`` as a YAML scalar: plain when that reads back as the same string."""
    if PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str, indent: str) -> list[str]:
    # YAML ends a comment at \x85, U+2028 and U+2029 too: printable escapes them (and every
    # other character str.isprintable() rejects), so the comment cannot end early
    return textwrap.wrap(
        printable(text, None),
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
        f"# rex hosts imported from {printable(source)} by 'rex import ansible' (rex "
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


def cmd_import(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex import ansible INVENTORY [-o FILE] [--force]``: YAML to stdout or to FILE."""
    try:
        with open(args.inventory, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise inventory_error(args.inventory, 0, f"cannot read the inventory: {reason}") from None
    result = import_ansible(text, args.inventory)
    if args.output is None or args.output == "-":
        screen.text(result)
    else:
        write_new(args.output, result, force=args.force)
    return 0
