"""A program's templated fields rendered for each of its hosts, at manifest load (so ``rex
plan`` shows the rendered argv and the spec digest of each step is of its rendered values).

The variables of one step: ``host`` (its name), ``address``, ``login`` (the Unix account it
runs as), ``index`` (its position among its program's steps, in plan order: the program's
hosts in manifest order) and ``count`` (the program's step count), ``vars`` (the host's
``vars`` over ``defaults.vars``, key by key) and ``programs`` (``programs.NAME.hosts`` and
``programs.NAME.addresses``, in plan order). Templated fields: ``run`` items, ``shell``,
``env`` values, ``cwd``, the ready probe's strings (``tcp.host``, ``http``, ``command`` items,
``file``) and a ``tcp.port`` written as a template, ``files`` ``dest``, and the content of a
file with ``template: true``.

An error is reported at the field (file:line:column), naming the first host it happens on; a
field that fails is not rendered for the other hosts (one diagnostic per field, not 10,000).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rexplan.core.model import FrozenDict, Host, Program, Rendered
from rexplan.core.templates import MAX_RENDERED, TemplateProblem, is_template, render
from rexplan.core.values import address_problem
from rexplan.core.yamlpos import KeyPath, Report
from rexplan.wire.chars import safe_relpath

#: rules a rendered value must keep, by field kind: None, or why the value is refused
_Rule = Callable[[str], "str | None"]


def freeze(value: Any) -> Any:
    """A ``vars`` value as an immutable, hashable one: lists become tuples, mappings
    FrozenDict (Jinja reads both as it reads lists and dicts)."""
    if isinstance(value, dict):
        return FrozenDict((str(k), freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def freeze_vars(value: Any) -> tuple[tuple[str, object], ...]:
    """A host's ``vars`` mapping as sorted frozen pairs (Host.vars)."""
    if not isinstance(value, dict):
        return ()
    return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))


def _text_rule(value: str) -> str | None:
    return "contains a NUL character" if "\0" in value else None


def _nonempty(value: str) -> str | None:
    return "is empty" if not value else _text_rule(value)


def _address(value: str) -> str | None:
    problem = address_problem(value)
    return f"{value!r} {problem}" if problem else None


def _port(value: str) -> str | None:
    text = value.strip()
    ok = text.isascii() and text.isdigit() and 1 <= int(text) <= 65535
    return None if ok else f"{value!r} is not a port (1 to 65535)"


def _url(value: str) -> str | None:
    ok = value.startswith(("http://", "https://"))
    return None if ok else f"{value!r} is not an http:// or https:// URL"


def _dest(value: str) -> str | None:
    return None if safe_relpath(value) else f"{value!r} leaves the program's files directory"


class _Slot:
    """One templated field of a program: where it is written, its source and its rule."""

    __slots__ = ("failed", "file", "path", "rule", "source")

    def __init__(self, path: KeyPath, source: str, rule: _Rule, file: str | None = None) -> None:
        self.path = path
        self.source = source
        self.rule = rule
        self.failed = False
        self.file = file  # a template file: its path, for the diagnostic


def _slots(spec: Mapping[str, Any], path: KeyPath, program: Program) -> list[_Slot]:
    """The templated fields of one program's spec."""
    out: list[_Slot] = []

    def add(where: KeyPath, value: Any, rule: _Rule) -> None:
        if isinstance(value, str) and is_template(value):
            out.append(_Slot((*path, *where), value, rule))

    run = spec.get("run")
    for i, item in enumerate(run if isinstance(run, list) else []):
        add(("run", i), item, _nonempty)
    add(("shell",), spec.get("shell"), _nonempty)
    env = spec.get("env")
    for key, value in (env if isinstance(env, dict) else {}).items():
        add(("env", key), value, _text_rule)
    add(("cwd",), spec.get("cwd"), _nonempty)
    found = spec.get("ready")
    ready: Mapping[str, Any] = found if isinstance(found, dict) else {}
    tcp = ready.get("tcp")
    if isinstance(tcp, dict):
        add(("ready", "tcp", "host"), tcp.get("host"), _address)
        add(("ready", "tcp", "port"), tcp.get("port"), _port)
    add(("ready", "http"), ready.get("http"), _url)
    command = ready.get("command")
    for i, item in enumerate(command if isinstance(command, list) else []):
        add(("ready", "command", i), item, _nonempty if i == 0 else _text_rule)
    add(("ready", "file"), ready.get("file"), _nonempty)
    files = spec.get("files")
    for i, item in enumerate(files if isinstance(files, list) else []):
        if isinstance(item, dict):
            add(("files", i, "dest"), item.get("dest"), _dest)
    return out


def _template_files(report: Report, path: KeyPath, program: Program) -> list[_Slot]:
    """A slot per ``template: true`` file, its source read (UTF-8, at most MAX_RENDERED)."""
    out: list[_Slot] = []
    for i, f in enumerate(program.files):
        if not f.template:
            continue
        where = (*path, "files", i, "src")
        try:
            with open(f.src, "rb") as src:
                raw = src.read(MAX_RENDERED + 1)
        except OSError as exc:
            report.value(where, f"cannot read the template {f.src}: {exc.strerror or exc}")
            continue
        if len(raw) > MAX_RENDERED:
            report.value(where, f"the template {f.src} is larger than {MAX_RENDERED} bytes")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            report.value(where, f"the template {f.src} is not UTF-8 text")
            continue
        if "\0" in text:
            report.value(where, f"the template {f.src} contains a NUL character")
            continue
        out.append(_Slot(where, text, _text_rule, file=f.src))
    return out


def programs_context(
    programs: Sequence[Program], hosts: Mapping[str, Host]
) -> dict[str, dict[str, tuple[str, ...]]]:
    """``programs.NAME.hosts`` and ``.addresses``, in plan order."""
    return {
        p.name: {
            "hosts": p.hosts,
            "addresses": tuple(hosts[h].address for h in p.hosts if h in hosts),
        }
        for p in programs
    }


def render_programs(
    report: Report,
    programs: list[Program],
    specs: Mapping[str, Mapping[str, Any]],
    *,
    hosts: Sequence[Host],
    logins: Mapping[str, str],
    defaults: Mapping[str, Any],
) -> None:
    """Fill in ``rendered`` of each program of ``programs`` (in place) that has a templated
    field; a manifest without templates costs one look at each program's strings."""
    slots = {
        p.name: _slots(specs[p.name], ("programs", p.name), p)
        + _template_files(report, ("programs", p.name), p)
        for p in programs
    }
    if not any(slots.values()):
        return
    by_name = {h.name: h for h in hosts}
    context = programs_context(programs, by_name)
    frozen = FrozenDict(defaults)
    for i, program in enumerate(programs):
        if slots[program.name] and program.hosts:
            programs[i] = _render_program(
                report,
                ("programs", program.name),
                slots[program.name],
                program,
                hosts=by_name,
                login=logins[program.user],
                defaults=frozen,
                programs=context,
            )


def _render_program(
    report: Report,
    path: KeyPath,
    slots: list[_Slot],
    program: Program,
    *,
    hosts: Mapping[str, Host],
    login: str,
    defaults: Mapping[str, Any],
    programs: Mapping[str, Any],
) -> Program:
    """``program`` with ``rendered`` filled in for each of its hosts."""
    count = len(program.hosts)
    rendered: list[Rendered] = []
    for index, name in enumerate(program.hosts):
        host = hosts.get(name)
        if host is None:
            return program  # an unknown host: reported by the checks already
        context = {
            "host": name,
            "address": host.address,
            "login": login,
            "index": index,
            "count": count,
            "vars": FrozenDict({**defaults, **dict(host.vars)}) if host.vars else defaults,
            "programs": programs,
        }
        values: dict[KeyPath, str] = {}
        for slot in slots:
            if slot.failed:
                continue
            try:
                value = render(slot.source, context)
            except TemplateProblem as exc:
                _fail(report, slot, name, str(exc), exc.line)
                continue
            problem = slot.rule(value) if slot.file is None else _text_rule(value)
            if problem:
                _fail(report, slot, name, f"the rendered value {problem}", None)
                continue
            values[slot.path[len(path) :]] = value
        if any(slot.failed for slot in slots):
            continue
        rendered.append(_assemble(program, values))
    if len(rendered) != count:
        return program
    return dataclasses.replace(program, rendered=tuple(rendered))


def _fail(report: Report, slot: _Slot, host: str, message: str, line: int | None) -> None:
    slot.failed = True
    where = slot.file if slot.file is not None else "template"
    shown = line is not None and (slot.file is not None or "\n" in slot.source)
    at = f" ({where} line {line})" if shown else ""
    report.value(slot.path, f"{message}{at}, for host {host!r}")


def _assemble(program: Program, values: Mapping[KeyPath, str]) -> Rendered:
    """One host's Rendered: the program's fields with the rendered ones put in."""
    run = list(program.run) if program.run is not None else None
    shell = values.get(("shell",), program.shell)
    env = dict(program.env)
    ready = program.ready
    ready_argv = list(ready.argv)
    files = list(program.files)
    changes: dict[str, Any] = {}
    cwd = program.cwd
    for where, value in values.items():
        head = where[0]
        if head == "run" and run is not None:
            run[int(where[1])] = value
        elif head == "env":
            env[str(where[1])] = value
        elif head == "cwd":
            cwd = value
        elif where == ("ready", "tcp", "host"):
            changes["host"] = value
        elif where == ("ready", "tcp", "port"):
            changes["port"] = int(value.strip())
        elif where == ("ready", "http"):
            changes["url"] = value
        elif where == ("ready", "file"):
            changes["path"] = value
        elif head == "ready":  # ("ready", "command", i)
            ready_argv[int(where[2])] = value
        elif head == "files":
            i = int(where[1])
            if where[2] == "dest":
                files[i] = dataclasses.replace(files[i], dest=value)
            else:
                files[i] = dataclasses.replace(files[i], content=value.encode("utf-8"))
    if ready_argv != list(ready.argv):
        changes["argv"] = tuple(ready_argv)
    if changes:
        ready = dataclasses.replace(ready, **changes)
    argv = tuple(run) if run is not None else ("/bin/sh", "-c", shell or "")
    return Rendered(
        argv=argv,
        shell=shell,
        env=tuple(sorted(env.items())),
        cwd=cwd,
        ready=ready,
        files=tuple(files),
    )
