"""Fetching the host keys on a host's route: each bastion, then the host through them.

A key is fetched by key exchange alone (no login, nothing run). To reach what lies behind a
bastion rex must log in to it, so it goes on only past a bastion whose key known_hosts pins
or the caller accepts (``rex hostkeys scan --accept``); that login is as strict as any other.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paramiko

from rexplan.core.model import Host, Timeouts, User
from rexplan.errors import TransportError, UnreachableError
from rexplan.transport.bastion import Link, connect_hop
from rexplan.transport.dialing import connect_error, tcp_connect
from rexplan.transport.pinning import HostKeyInfo, host_key_name, host_key_status
from rexplan.transport.route import Hop, route


@dataclass(frozen=True)
class Scanned:
    """One server on a host's route: a bastion (``bastion`` True) or the host itself."""

    hop: Hop
    bastion: bool
    key: HostKeyInfo | None
    error: TransportError | None


class _Chain:
    """Links opened for one scan; closed together."""

    def __init__(self) -> None:
        self.links: list[Link] = []

    def close(self) -> None:
        for link in reversed(self.links):
            link.close_alone()


def scan_host_key(host: Host, *, timeout: float = 10.0) -> HostKeyInfo:
    """The key ``host`` offers at its address and port, dialled directly (key exchange only:
    no authentication, nothing run)."""
    hop = Hop(host.name, host.address, host.port, "scan", (), True, None)
    return fetch_key(host, hop, None, timeout)


def fetch_key(host: Host, hop: Hop, via: Link | None, timeout: float) -> HostKeyInfo:
    """The key ``hop`` offers, over TCP or through ``via``; TransportError by phase."""
    sock: Any
    if via is None:
        sock = tcp_connect(host, hop.address, hop.port, timeout)
    else:
        sock = via.channel(host, hop.address, hop.port, timeout)
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    started = time.monotonic()
    try:
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
    except Exception as e:
        elapsed = time.monotonic() - started
        nobody = User(name="scan", login="scan")
        raise connect_error(
            e, host, nobody, hop.address, hop.port, "", transport, timeout, elapsed
        ) from e
    finally:
        transport.close()
        with contextlib.suppress(Exception):
            sock.close()
    return HostKeyInfo(
        name=host_key_name(hop.address, hop.port),
        key_type=key.get_name(),
        key_base64=key.get_base64(),
        fingerprint=key.fingerprint,
    )


def scan_route(
    host: Host,
    user: User,
    known_hosts: str,
    *,
    timeout: float,
    trust: Callable[[Hop, HostKeyInfo, str], bool],
) -> list[Scanned]:
    """The keys of ``host``'s bastions, first hop first, then of ``host``.

    Past a bastion rex logs in as the route says; it does so only when known_hosts pins the
    key the bastion offered, or ``trust(hop, key, status)`` says the caller is about to pin it
    (status ``unknown`` or ``changed``; that key,
    exactly, is then what the login checks). A hop not reached is reported with the reason.
    """
    try:
        path = route(host, user)
    except TransportError as e:
        return [
            Scanned(Hop(host.name, host.address, host.port, "", (), False, None), False, None, e)
        ]
    hops = [*((h, True) for h in path.jumps), (path.target, False)]
    found: list[Scanned] = []
    chain = _Chain()
    timeouts = Timeouts(connect=timeout)
    try:
        via: Link | None = None
        for i, (hop, bastion) in enumerate(hops):
            try:
                info = fetch_key(host, hop, via, timeout)
            except TransportError as e:
                found.append(Scanned(hop, bastion, None, e))
                _skip(found, hops[i + 1 :], host, f"bastion {hop.label} not reached")
                break
            found.append(Scanned(hop, bastion, info, None))
            if not bastion:
                break
            status = host_key_status(known_hosts, info)
            if status != "ok" and not trust(hop, info, status):
                why = "bastion {} key {}: pin it first (--accept)".format(
                    hop.label, "CHANGED" if status == "changed" else "not pinned"
                )
                _skip(found, hops[i + 1 :], host, why)
                break
            deadline = time.monotonic() + timeout
            try:
                link = connect_hop(
                    host,
                    hop,
                    via,
                    known_hosts,
                    timeouts,
                    timeout,
                    timeout,
                    deadline,
                    extra=() if status == "ok" else (info,),
                )
            except TransportError as e:
                _skip(found, hops[i + 1 :], host, str(e))
                break
            chain.links.append(link)
            via = link
    finally:
        chain.close()
    return found


def _skip(found: list[Scanned], rest: Sequence[tuple[Hop, bool]], host: Host, why: str) -> None:
    for hop, bastion in rest:
        error = UnreachableError(f"not scanned: {why}", host=host.name, phase="connect")
        found.append(Scanned(hop, bastion, None, error))
