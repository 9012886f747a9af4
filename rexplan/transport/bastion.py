"""Bastions: one pinned, authenticated connection per hop chain, shared by the hosts behind it.

Each hop is a paramiko SSHClient of its own, reached over the previous hop's ``direct-tcpip``
channel, with rex's StrictPolicy and the same known_hosts as the targets: paramiko checks the
server key before it authenticates, so an unknown or changed bastion key stops the chain before
any login to it, and nothing reaches the hosts behind it. Errors name the bastion.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import paramiko

from rexplan.core.model import Host, Timeouts, User
from rexplan.errors import (
    AuthenticationError,
    HostKeyError,
    TransportError,
    UnreachableError,
)
from rexplan.transport.dialing import IDENTITIES, aead_first, connect_error, tcp_connect
from rexplan.transport.pinning import HostKeyInfo, StrictPolicy, load_known_hosts
from rexplan.transport.route import Hop

#: chain of hops (each: address, port, login, keys) and the known_hosts file
_Key = tuple[tuple[tuple[str, int, str, tuple[str, ...], bool], ...], str]


def _hop_key(hop: Hop) -> tuple[str, int, str, tuple[str, ...], bool]:
    return (hop.address, hop.port, hop.login, hop.identities, hop.identities_only)


def auth_kwargs(hop: Hop) -> dict[str, Any]:
    """paramiko connect() arguments offering ``hop``'s keys (cached, parsed once per file)."""
    # as OpenSSH: the ~/.ssh default keys only when no IdentityFile is named; the agent's
    # unless IdentitiesOnly (an explicit users.*.identity: only that key, no agent surprises)
    kwargs: dict[str, Any] = {
        "look_for_keys": not hop.identities,
        "allow_agent": not hop.identities_only,
    }
    files: list[str] = []
    for path in hop.identities:
        pkey = IDENTITIES.get(path) if "pkey" not in kwargs else None
        if pkey is not None:
            kwargs["pkey"] = pkey
        else:
            files.append(path)
    if files:
        kwargs["key_filename"] = files
    return kwargs


class Link:
    """An authenticated connection to the last hop of a chain; counted leases close it."""

    def __init__(
        self,
        pool: BastionPool | None,
        key: _Key,
        label: str,
        client: paramiko.SSHClient,
        parent: Link | None,
    ) -> None:
        self._pool = pool
        self._key = key
        self.label = label
        self.client = client
        self.parent = parent
        self.refs = 0

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def channel(self, host: Host, address: str, port: int, timeout: float) -> Any:
        """A ``direct-tcpip`` channel from this hop to ``address:port``: the next hop's socket."""
        transport = self.client.get_transport()
        where = f"{address}:{port}" if ":" not in address else f"[{address}]:{port}"
        try:
            if transport is None or not transport.is_active():
                raise paramiko.SSHException("connection to the bastion lost")
            return transport.open_channel(
                "direct-tcpip", (address, port), ("127.0.0.1", 0), timeout=timeout
            )
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise UnreachableError(
                f"bastion {self.label} could not open a connection to {where}: {e}",
                host=host.name,
                phase="connect",
                hint="check the address and port as the bastion sees them, and that the "
                "bastion's sshd allows TCP forwarding (AllowTcpForwarding)",
            ) from e

    def release(self) -> None:
        if self._pool is None:
            self.close()
        else:
            self._pool.release(self)

    def close_alone(self) -> None:
        """Close this hop's connection only (a scan closes its chain itself)."""
        with contextlib.suppress(Exception):
            self.client.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.parent is not None:
            self.parent.release()


class BastionPool:
    """Links by chain, shared by every thread and every target behind the same bastions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[_Key, Link] = {}
        self._connecting: dict[_Key, threading.Lock] = {}
        #: the last failure to connect each chain, and when it ended
        self._failed: dict[_Key, tuple[float, TransportError]] = {}

    def acquire(
        self,
        host: Host,
        jumps: Sequence[Hop],
        known: str,
        timeouts: Timeouts,
        banner: float,
        auth: float,
        deadline: float,
    ) -> Link:
        """A lease on the connection to ``jumps[-1]`` through the hops before it; release()
        it when done. The chain's connections open once and are shared."""
        key: _Key = (tuple(_hop_key(h) for h in jumps), known)
        asked = time.monotonic()
        with self._lock:
            gate = self._connecting.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                failed = self._failed.get(key)
                if failed is not None and failed[0] >= asked:
                    # it failed while this caller waited: the hosts behind it queued on one
                    # attempt, not one connect deadline each
                    raise _for_host(failed[1], host)
                link = self._links.get(key)
                if link is not None and link.alive():
                    link.refs += 1
                    return link
                if link is not None:
                    del self._links[key]
            parent = None
            try:
                if len(jumps) > 1:
                    parent = self.acquire(host, jumps[:-1], known, timeouts, banner, auth, deadline)
                client = _connect_hop(
                    host, jumps[-1], parent, known, timeouts, banner, auth, deadline
                )
            except TransportError as e:
                if parent is not None:
                    parent.release()
                with self._lock:
                    self._failed[key] = (time.monotonic(), e)
                raise
            except BaseException:
                if parent is not None:
                    parent.release()
                raise
            link = Link(self, key, jumps[-1].label, client, parent)
            link.refs = 1
            with self._lock:
                self._links[key] = link
            return link

    def release(self, link: Link) -> None:
        with self._lock:
            link.refs -= 1
            if link.refs > 0:
                return
            if self._links.get(link._key) is link:
                del self._links[link._key]
        link.close()


BASTIONS = BastionPool()


def connect_hop(
    host: Host,
    hop: Hop,
    parent: Link | None,
    known: str,
    timeouts: Timeouts,
    banner: float,
    auth: float,
    deadline: float,
    *,
    extra: Sequence[HostKeyInfo] = (),
) -> Link:
    """A connection to ``hop`` of its own (not shared), through ``parent``; ``extra``: keys
    trusted besides ``known`` (those ``rex hostkeys scan --accept`` is about to pin)."""
    client = _connect_hop(host, hop, parent, known, timeouts, banner, auth, deadline, extra)
    return Link(None, ((_hop_key(hop),), known), hop.label, client, None)


def _connect_hop(
    host: Host,
    hop: Hop,
    parent: Link | None,
    known: str,
    timeouts: Timeouts,
    banner: float,
    auth: float,
    deadline: float,
    extra: Sequence[HostKeyInfo] = (),
) -> paramiko.SSHClient:
    """Key exchange (the key checked against ``known``), then login, to one bastion."""

    remaining = max(0.1, deadline - time.monotonic())
    tcp_timeout = min(hop.connect_timeout or timeouts.connect, remaining)
    sock: Any
    if parent is None:
        try:
            sock = tcp_connect(Host("", hop.address, hop.port), hop.address, hop.port, tcp_timeout)
        except TransportError as e:
            raise _as_bastion(e, host, hop) from e
    else:
        sock = parent.channel(host, hop.address, hop.port, tcp_timeout)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(StrictPolicy())
    if not extra:
        load_known_hosts(client, known)
    # else exactly the keys the caller is about to pin: known_hosts may pin another one for
    # this name (a bastion being replaced), and its parsed entries are shared, not to be edited
    for info in extra:
        blob = base64.b64decode(info.key_base64)
        key = paramiko.PKey.from_type_string(info.key_type, blob)
        client.get_host_keys().add(info.name, info.key_type, key)
    started = time.monotonic()
    try:
        client.connect(
            hop.address,
            hop.port,
            username=hop.login,
            sock=sock,
            timeout=banner + timeouts.connect,
            banner_timeout=banner,
            auth_timeout=auth,
            transport_factory=aead_first,
            **auth_kwargs(hop),
        )
    except Exception as e:
        elapsed = time.monotonic() - started
        transport = client.get_transport()
        client.close()
        with contextlib.suppress(Exception):
            sock.close()
        nobody = Host("", hop.address, hop.port)
        who = User(hop.login, hop.login, hop.identities[0] if hop.identities else None)
        error = connect_error(
            e, nobody, who, hop.address, hop.port, known, transport, banner, elapsed
        )
        raise _as_bastion(error, host, hop) from e
    return client


def _as_bastion(error: TransportError, host: Host, hop: Hop) -> TransportError:
    """``error`` (raised for the bastion) as the failure of ``host``, naming the bastion."""
    where = f"{hop.address}:{hop.port}"
    named = hop.label if hop.label == where else f"{hop.label} ({where})"
    text = f"bastion {named}: {error}"
    if isinstance(error, HostKeyError):
        hint = (
            f"check the bastion's fingerprint, then pin it: rex hostkeys scan -m MANIFEST "
            f"--accept (it scans bastions too); nothing was sent to {host.name}"
        )
    elif isinstance(error, AuthenticationError):
        hint = (
            f"the bastion refused {hop.login}: check its ssh_config User/IdentityFile, the "
            "jump's user@, or the user's identity"
        )
    else:
        hint = "check hosts.*.jump, the user's ssh_options ProxyJump or ssh_config ProxyJump"
    wrapped = type(error)(text, host=host.name, phase=error.phase, hint=hint)
    wrapped.bastion_error = (error, hop)  # type: ignore[attr-defined]
    return wrapped


def _for_host(error: TransportError, host: Host) -> TransportError:
    """A bastion failure raised for one host, raised again for ``host``."""
    raw = getattr(error, "bastion_error", None)
    if raw is None:
        return error
    return _as_bastion(raw[0], host, raw[1])
