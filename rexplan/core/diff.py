"""``rex apply --dry-run --diff``: which fields of a changed step differ between what its host
recorded at launch and what the manifest declares now; pure, no I/O.

The agent keeps, in each program's record (0600), ``launched``: the launch message minus its
nonce (wire.launch.recorded_launch); the fields its spec digest covers are compared (argv,
env, cwd, the probe's kind, port, url, path and argv, kind, restart policy, files by name,
hash and mode), and the status report adds the hashes of the files the host
holds now. Both are host bytes, hence hostile: only the known fields are read, at most
MAX_CHANGES changes per step are kept, and every value is shown as JSON cut to VALUE_LIMIT
characters and escaped (core.text.printable) before it reaches a terminal or a JSON document.

A change's ``field`` is ``run`` (the argv), ``cwd``, ``kind``, ``restart``, ``ready.KEY``,
``env.NAME`` or ``files.DEST``; ``host`` and ``manifest`` are the two values as JSON (None:
absent on that side). A file whose content changed on the host since the launch shows the
host's current hash with ``(changed on the host)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rexplan.core.spec import StepStatus, expected_launch
from rexplan.core.text import printable
from rexplan.wire.launch import SPEC_PROBE_KEYS, recorded_launch

#: changes kept per step; more are counted in one last line
MAX_CHANGES = 64
#: characters of one shown value
VALUE_LIMIT = 160
#: names (env variables, file dests) read from one host mapping
MAX_NAMES = 4096
#: the whole fields compared as one value; ready, env and files go key by key
_WHOLE = (("run", "argv"), ("cwd", "cwd"), ("kind", "kind"), ("restart", "restart"))
#: compared only when one side has it (absent means false)
_FLAGS = ("autostart",)


@dataclass(frozen=True)
class Change:
    """One field that differs: its name and both values, shown (JSON, escaped, cut)."""

    field: str
    host: str | None
    manifest: str | None

    def to_dict(self) -> dict[str, str | None]:
        return {"field": self.field, "host": self.host, "manifest": self.manifest}


def show(value: Any) -> str:
    """A value as compact JSON, escaped and cut to VALUE_LIMIT characters."""
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = "<unreadable>"
    return printable(text[: VALUE_LIMIT * 2], VALUE_LIMIT)


def _name(name: str) -> str:
    return printable(name, VALUE_LIMIT)


def _keys(mapping: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """The sorted union of both mappings' string keys, the host's bounded to MAX_NAMES."""
    names = {k for k in mapping if isinstance(k, str)}
    for i, k in enumerate(theirs):
        if i >= MAX_NAMES:
            break
        if isinstance(k, str):
            names.add(k)
    return sorted(names)


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def changes(status: StepStatus, files: Sequence[tuple[str, str, int]] = ()) -> list[Change] | None:
    """The fields in which ``status``'s host record differs from the manifest's step (with its
    program's ``files`` as (dest, sha256, mode)); None when the host recorded no launched
    specification (a record from an older agent, or none)."""
    recorded = status.launched
    if recorded is None:
        return None
    want = recorded_launch(expected_launch(status.step, files))
    out: list[Change] = []

    def differ(name: str, theirs: Any, ours: Any, present: bool = True) -> None:
        if not present or theirs != ours:
            out.append(
                Change(
                    name, show(theirs) if present else None, None if ours is None else show(ours)
                )
            )

    for shown, field in _WHOLE:
        differ(shown, recorded.get(field), want[field], field in recorded)
    for field in _FLAGS:
        if bool(want.get(field)) != (recorded.get(field) is True):
            out.append(Change(field, show(recorded.get(field, False)), show(bool(want.get(field)))))
    ready, their_ready = want["ready"], _map(recorded.get("ready"))
    for field in SPEC_PROBE_KEYS:
        ours, theirs = ready.get(field), their_ready.get(field)
        if ours != theirs and not (field == "argv" and not ours and not theirs):
            out.append(Change(f"ready.{field}", show(theirs), show(ours)))
    env, their_env = want["env"], _map(recorded.get("env"))
    for name in _keys(env, their_env):
        if env.get(name) != their_env.get(name):
            out.append(
                Change(
                    f"env.{_name(name)}",
                    show(their_env[name]) if name in their_env else None,
                    show(env[name]) if name in env else None,
                )
            )
    out.extend(_files(_by_dest(want["files"]), _by_dest(recorded.get("files")), status.held))
    if len(out) > MAX_CHANGES:
        left = len(out) - MAX_CHANGES
        out = [*out[:MAX_CHANGES], Change(f"... {left} more", None, None)]
    return out


def _by_dest(files: Any) -> dict[str, Any]:
    """A launch message's files, [[dest, sha256, mode], ...], as {dest: [sha256, mode]}."""
    out: dict[str, Any] = {}
    for entry in files[:MAX_NAMES] if isinstance(files, list) else ():
        if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str):
            out[entry[0]] = [entry[1], entry[2]]
    return out


def _file(entry: Any) -> str:
    """A file entry [sha256, mode] as ``sha256:0123456789ab mode 0644``."""
    if isinstance(entry, list) and len(entry) == 2:
        sha, mode = entry
        if isinstance(sha, str) and isinstance(mode, int):
            return printable(f"sha256:{sha[:12]} mode {mode:04o}", VALUE_LIMIT)
    return show(entry)


def _files(
    want: Mapping[str, list[Any]], recorded: Mapping[str, Any], held: Mapping[str, Any] | None
) -> list[Change]:
    out: list[Change] = []
    now = held or {}
    for dest in _keys(want, recorded):
        ours, theirs = want.get(dest), recorded.get(dest)
        if ours != theirs:
            out.append(
                Change(
                    f"files.{_name(dest)}",
                    None if theirs is None else _file(theirs),
                    None if ours is None else _file(ours),
                )
            )
        elif ours is not None and dest in now and now[dest] != ours[0]:
            there = now[dest]
            shown = f"sha256:{there[:12]}" if isinstance(there, str) else show(there)
            out.append(
                Change(
                    f"files.{_name(dest)}",
                    printable(f"{shown} (changed on the host)", VALUE_LIMIT),
                    _file(ours),
                )
            )
    return out


def format_changes(status: StepStatus, found: list[Change] | None) -> str:
    """The text ``--diff`` prints for one changed step: a heading, then a line per field."""
    head = f"diff {status.step.id} ({status.step.triple}):"
    if found is None:
        why = "the host's record keeps no launched specification (an older agent launched it)"
        return f"{head}\n  ({why})"
    if not found:
        return f"{head}\n  (the same specification: {status.detail or status.status})"
    lines = [head]
    for c in found:
        if c.host is None and c.manifest is None:
            lines.append(f"  {c.field}")
        else:
            host = "(none)" if c.host is None else c.host
            manifest = "(none)" if c.manifest is None else c.manifest
            lines.append(f"  {c.field}: {host} -> {manifest}")
    return "\n".join(lines)
