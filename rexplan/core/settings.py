"""A program's settings as records (ready probe, placement, files, failure policy); tree limits."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from rexplan.core.model import FailurePolicy, FileSpec, Host, Placement, Program, Ready, User
from rexplan.core.values import address_problem, as_int, as_map, as_num, as_str, count_or_percent
from rexplan.core.yamlpos import KeyPath, Report
from rexplan.wire import probes
from rexplan.wire.chars import safe_relpath

_MODE_RE = re.compile(r"0?[0-7]{3}\Z|0o[0-7]{3}\Z")


def policy(spec: dict[str, Any], defaults: dict[str, Any]) -> FailurePolicy:
    """The program's failure policy; each key falls back to ``defaults``."""

    def get(key: str) -> Any:
        return spec[key] if key in spec else defaults.get(key)

    max_fail, max_fail_percent = count_or_percent(get("max_fail"))
    serial, serial_percent = count_or_percent(get("serial"))
    return FailurePolicy(
        max_fail=max_fail,
        max_fail_percent=max_fail_percent,
        any_errors_fatal=get("any_errors_fatal") is True,
        serial=serial,
        serial_percent=serial_percent,
        ignore_unreachable=get("ignore_unreachable") is True,
    )


def _tcp(report: Report, path: KeyPath, probe: Any, base: Ready) -> Ready:
    target = as_map(probe)
    port = as_int(probe, 0) if not target else as_int(target.get("port"), 0)
    host = as_str(target.get("host"), base.host) or base.host
    problem = address_problem(host)
    if problem:
        report.value((*path, "tcp", "host"), f"address {host!r} {problem}")
    return Ready("tcp", base.timeout, base.interval, port=port, host=host)


def _http(report: Report, path: KeyPath, probe: Any, base: Ready) -> Ready:
    url = as_str(probe, "") or ""
    if not url.startswith(("http://", "https://")):
        report.value((*path, "http"), f"{url!r} is not an http:// or https:// URL")
    return Ready("http", base.timeout, base.interval, url=url)


def _command(report: Report, path: KeyPath, probe: Any, base: Ready) -> Ready:
    argv = tuple(a for a in probe if isinstance(a, str)) if isinstance(probe, list) else ()
    return Ready("command", base.timeout, base.interval, argv=argv)


def _file(report: Report, path: KeyPath, probe: Any, base: Ready) -> Ready:
    return Ready("file", base.timeout, base.interval, path=as_str(probe, None))


def _notify(report: Report, path: KeyPath, probe: Any, base: Ready) -> Ready:
    if probe is False:
        report.value((*path, "notify"), "notify: false is not a probe")
    return Ready("notify", base.timeout, base.interval)


def _alive(report: Report, path: KeyPath, probe: Any, base: Ready) -> Ready:
    return Ready("alive", base.timeout, base.interval, settle=as_num(probe, base.settle))


#: how each kind of probe (wire.probes.KINDS) reads from the manifest's ``ready``: its value
#: under the kind's name, and the Ready without the target (its timeout and interval)
_READERS: dict[str, Callable[[Report, KeyPath, Any, Ready], Ready]] = {
    "tcp": _tcp,
    "http": _http,
    "command": _command,
    "file": _file,
    "notify": _notify,
    "alive": _alive,
}


def ready(report: Report, path: KeyPath, value: Any, timeout: float) -> Ready:
    """The readiness probe at ``path``; the ready timeout defaults to ``timeout``."""
    spec = as_map(value)
    named = [p for p in probes.MANIFEST_ORDER if p in spec]
    if len(named) > 1:
        report.key(
            (*path, named[1]),
            f"ready has more than one probe: {', '.join(named)}",
            f"choose one of {', '.join(probes.MANIFEST_ORDER)}",
        )
    base = Ready(
        timeout=as_num(spec.get("timeout"), timeout), interval=as_num(spec.get("interval"), 0.2)
    )
    kind = named[0] if named else probes.DEFAULT
    return _READERS[kind](report, path, spec.get(kind), base)


def placement(report: Report, path: KeyPath, value: Any, hosts: int) -> Placement:
    """The placement at ``path`` of a program on ``hosts`` hosts."""
    if value is None:
        return Placement()
    spec = as_map(value)
    strategy = value if isinstance(value, str) else as_str(spec.get("strategy"), "all")
    count = spec.get("count")
    count_int = as_int(count, 0) if count is not None else None
    if strategy == "least-loaded":
        if count_int is None:
            report.value(
                path,
                "least-loaded placement needs a count >= 1",
                "placement: {strategy: least-loaded, count: 2}",
            )
        elif hosts and count_int > hosts:
            report.value(
                (*path, "count"), f"count {count_int} is more than the {hosts} host(s) of on"
            )
    elif count is not None:
        report.value((*path, "count"), "count applies only to least-loaded placement")
    return Placement(strategy or "all", count_int)


def files(report: Report, path: KeyPath, value: Any, base_dir: str) -> tuple[FileSpec, ...]:
    """The files at ``path`` to upload; ``src`` is relative to ``base_dir``."""
    specs: list[FileSpec] = []
    for i, item in enumerate(value if isinstance(value, list) else []):
        spec = as_map(item)
        src, dest = spec.get("src"), spec.get("dest")
        mode_text = spec.get("mode", "0644")
        mode = 0o644
        if isinstance(mode_text, str):
            if _MODE_RE.match(mode_text):
                mode = int(mode_text.removeprefix("0o"), 8)
            else:
                report.value(
                    (*path, i, "mode"),
                    f"{mode_text!r} is not an octal file mode",
                    'write three octal digits, e.g. mode: "0644"',
                )
        if isinstance(dest, str) and not safe_relpath(dest):
            report.value(
                (*path, i, "dest"),
                f"{dest!r} leaves the program's files directory",
                "give a relative path without '..', e.g. dest: conf/app.ini",
            )
        elif isinstance(src, str) and isinstance(dest, str):
            specs.append(FileSpec(os.path.join(base_dir, src), dest, mode))
    return tuple(specs)


def tree_problems(
    programs: Sequence[Program],
    relay_identity: str | None,
    hosts: Sequence[Host] = (),
    users: Sequence[User] = (),
) -> list[tuple[KeyPath, str, str]]:
    """Why ``programs`` cannot be launched with ``strategy: tree``: (key path, message, hint)
    for each. Relays only pass launch lines on; what the launcher does over its own connection
    to a host (files over SFTP, load probes) it cannot do through them."""
    out: list[tuple[KeyPath, str, str]] = []
    # relays reach their hosts with their own OpenSSH and config: no bastions, no ssh_options
    jumped = next((h for h in hosts if h.jump), None)
    if jumped is not None:
        out.append(
            (
                ("defaults", "strategy"),
                f"strategy: tree cannot reach host {jumped.name!r} through its jump",
                "use strategy: flat for hosts behind bastions",
            )
        )
    optioned = next((u for u in users if u.ssh_options), None)
    if optioned is not None:
        out.append(
            (
                ("defaults", "strategy"),
                f"strategy: tree does not apply users.{optioned.name}.ssh_options (relays log "
                "in to their hosts with their own OpenSSH and its config)",
                "use strategy: flat, or set the options in the relay hosts' ssh_config",
            )
        )
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
