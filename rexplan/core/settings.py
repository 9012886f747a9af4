"""A program's settings as records (ready probe, placement, files, failure policy); tree limits."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from rexplan.core.model import FailurePolicy, FileSpec, Host, Placement, Program, Ready, User
from rexplan.core.templates import is_template
from rexplan.core.values import address_problem, as_int, as_map, as_num, as_str, count_or_percent
from rexplan.core.yamlpos import KeyPath, Report
from rexplan.wire import jobs, probes
from rexplan.wire.chars import safe_relpath

_MODE_RE = re.compile(r"0?[0-7]{3}\Z|0o[0-7]{3}\Z")
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([KMG]i?B?|B)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size_of(value: Any) -> int | None:
    """Bytes of a size: an integer, or a string like ``10MiB``, ``512 KiB``, ``1G``, ``4096``
    (K, M and G are powers of 1024, with or without ``iB``/``B``); None if it is neither."""
    if type(value) is int:
        return value
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[(match.group(2) or "")[:1].lower()]


def logs(report: Report, path: KeyPath, value: Any, base: tuple[int, int]) -> tuple[int, int]:
    """The log rotation at ``path`` (``{max_size: 10MiB, keep: 3}``): (max_size bytes, keep);
    each key falls back to ``base`` (defaults.logs, else 10 MiB and 3)."""
    spec = as_map(value)
    max_size, keep = base
    if "max_size" in spec:
        size = size_of(spec["max_size"])
        low, high = jobs.LOG_MAX_SIZE_RANGE
        if size is None or not low <= size <= high:
            report.value(
                (*path, "max_size"),
                f"{spec['max_size']!r} is not a log size from 4KiB to 1TiB",
                "give bytes or a size with a unit, e.g. max_size: 10MiB",
            )
        else:
            max_size = size
    if "keep" in spec:
        count = spec["keep"]
        if type(count) is not int or not 0 <= count <= jobs.LOG_KEEP_MAX:
            report.value(
                (*path, "keep"),
                f"{count!r} is not a count of old log files from 0 to {jobs.LOG_KEEP_MAX}",
                "keep: 3 keeps NAME.log.1 ... NAME.log.3",
            )
        else:
            keep = count
    return max_size, keep


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
    # a templated port is rendered per step (core.perhost)
    port = as_int(probe, 0) if not target else as_int(target.get("port"), 0)
    host = as_str(target.get("host"), base.host) or base.host
    problem = None if is_template(host) else address_problem(host)  # checked once rendered
    if problem:
        report.value((*path, "tcp", "host"), f"address {host!r} {problem}")
    return Ready("tcp", base.timeout, base.interval, port=port, host=host)


def _http(report: Report, path: KeyPath, probe: Any, base: Ready) -> Ready:
    url = as_str(probe, "") or ""
    if not url.startswith(("http://", "https://")) and not is_template(url):
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
        if isinstance(dest, str) and not is_template(dest) and not safe_relpath(dest):
            report.value(
                (*path, i, "dest"),
                f"{dest!r} leaves the program's files directory",
                "give a relative path without '..', e.g. dest: conf/app.ini",
            )
        elif isinstance(src, str) and isinstance(dest, str):
            template = spec.get("template") is True
            specs.append(FileSpec(os.path.join(base_dir, src), dest, mode, template))
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


#: why ``callback: {via: ssh}`` and ``strategy: tree`` do not go together: (message, hint)
TREE_VIA_SSH = (
    "callback via ssh cannot be used with strategy: tree",
    "a relay launches the hosts below it over its own OpenSSH connections, which hold no "
    "forward to the launcher's listener: use strategy: flat with via: ssh, or via: direct "
    "(every host must then reach the launcher)",
)


def via_ssh_hosts(hosts: Sequence[Host]) -> list[str]:
    """The hosts reached over SSH whose agents call back through a forward (``via: ssh``)."""
    return [h.name for h in hosts if h.callback == "ssh" and h.transport != "local"]
