"""Checks of the manifest's SSH settings: users.*.ssh_options and hosts.*.jump chains."""

from __future__ import annotations

import dataclasses
from typing import Any

from rexplan.core import sshopts
from rexplan.core.model import Host, Pairs
from rexplan.core.values import as_str
from rexplan.core.yamlpos import KeyPath, Report


class _JumpLoop(Exception):
    """A hosts.*.jump chain that comes back to a host already in it (reported)."""


def ssh_options(report: Report, path: KeyPath, options: Pairs) -> Pairs:
    """The options rex applies (sshopts.OPTIONS, any case); any other is an error."""
    seen: dict[str, str] = {}
    for option, setting in options:
        opt_path = (*path, "ssh_options", option)
        key = option.lower()
        if key not in sshopts.OPTIONS:
            allowed = ", ".join(sshopts.OPTIONS.values())
            report.key(opt_path, f"ssh option {option!r} is not one rex applies", f"use {allowed}")
            continue
        if key in seen:
            report.key(opt_path, f"ssh option {option!r} repeats {seen[key]!r}")
            continue
        seen[key] = option
        problem = sshopts.option_problem(option, setting)
        if problem:
            report.value(opt_path, problem)
    return options


def jump(report: Report, path: KeyPath, value: Any) -> str | None:
    """``hosts.*.jump`` if it is OpenSSH's ProxyJump syntax, else None after reporting why."""
    text = as_str(value, None)
    if text is None:
        return None
    try:
        sshopts.parse_jumps(text)
    except ValueError as e:
        report.value(
            (*path, "jump"),
            f"invalid jump {text!r}: {e}",
            "give [user@]host[:port], a comma list first hop first, or a host's name",
        )
        return None
    return text


def resolve_jumps(
    report: Report, hosts: list[Host], index: dict[str, int], where: dict[str, str]
) -> None:
    """In place: a jump hop naming a manifest host (no user@, no :port) becomes how that host
    is reached: its own bastions, then its address (and its port where set)."""
    chains: dict[str, str | None] = {}

    def chain(name: str, seen: tuple[str, ...]) -> str | None:
        if name in chains:
            return chains[name]
        host = hosts[index[name]]
        if host.jump is None:
            return None
        hops: list[str] = []
        for hop in sshopts.parse_jumps(host.jump):
            ref = hop.host if hop.login is None and hop.port is None else None
            if ref is None or ref not in index:
                hops.append(str(hop))
                continue
            if ref in seen:
                loop = " -> ".join((*seen, ref))
                report.value(("hosts", where[name], "jump"), f"jump loop: {loop}")
                raise _JumpLoop
            other = hosts[index[ref]]
            before = chain(ref, (*seen, ref))
            if before:
                hops.append(before)
            target = other.address if other.address_set else other.name
            target = f"[{target}]" if ":" in target else target
            hops.append(f"{target}:{other.port}" if other.port_set else target)
        text = ",".join(hops)
        if len(text.split(",")) > sshopts.MAX_HOPS:
            report.value(("hosts", where[name], "jump"), f"more than {sshopts.MAX_HOPS} bastions")
            raise _JumpLoop
        chains[name] = text
        return text

    for i, host in enumerate(hosts):
        if host.jump is None:
            continue
        try:
            resolved = chain(host.name, (host.name,))
        except _JumpLoop:
            resolved = None
            chains[host.name] = None
        hosts[i] = dataclasses.replace(host, jump=resolved)
