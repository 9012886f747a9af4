"""Opening an SSH connection: TCP, key exchange and login inside a paced slot, errors by phase."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any, cast

import fabric
import paramiko

from rexplan.core.model import Host, Timeouts, User
from rexplan.errors import (
    HostTimeoutError,
    TransportError,
)
from rexplan.transport.bastion import BASTIONS, Link, auth_kwargs
from rexplan.transport.dialing import aead_first, connect_error, file_stamps, tcp_connect
from rexplan.transport.pacing import HANDSHAKE_GATES, dropped_by_server
from rexplan.transport.pinning import (
    StrictPolicy,
    load_known_hosts,
)
from rexplan.transport.route import Hop, route

# paramiko logs every failed handshake (a dropped banner exchange included) at ERROR with a
# traceback; with no handler anywhere, logging's last resort would print it on stderr. rex
# reports those failures itself, per host; an application that configures logging still
# receives the records.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


#: the files a fabric.Config reads when it is built (fabric's own; rex reads ssh_config
#: itself, rexplan.transport.route, so fabric gets an empty one)
_FABRIC_FILES = tuple(
    f"{d}fabric.{ext}" for d in ("/etc/", "~/.") for ext in ("yaml", "yml", "json", "py")
)


class _FabricConfigCache:
    """One fabric.Config per content of the files it reads, shared by every Connection, as
    fabric's own Group shares one: a Connection built without one constructs two Configs,
    each loading those files and merging its defaults (a fifth of a launch's launcher CPU)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._config: tuple[tuple[object, ...], fabric.Config] | None = None

    def get(self) -> fabric.Config:
        stamp = (os.path.expanduser("~"), file_stamps(_FABRIC_FILES))
        with self._lock:
            if self._config is None or self._config[0] != stamp:
                self._config = (stamp, fabric.Config(ssh_config=paramiko.SSHConfig()))
            return self._config[1]


_FABRIC_CONFIG = _FabricConfigCache()


class _Connection(fabric.Connection):  # type: ignore[misc]  # fabric ships no types
    """fabric's Connection with every attribute its constructor sets declared: invoke's
    DataProxy turns a set of an undeclared attribute into a write to the Config, and fabric
    3.2 sets ``inline_ssh_env`` undeclared. That write re-merges the shared Config, clearing
    it for a moment under the other threads reading it."""

    inline_ssh_env = None
    #: the lease on the bastion chain this connection goes through (SSHTransport releases it)
    bastion: Link | None = None


def handshake(
    host: Host,
    user: User,
    known: str,
    timeouts: Timeouts,
    banner: float,
    auth: float,
    deadline: float,
) -> tuple[fabric.Connection, StrictPolicy]:
    """One connect, key exchange and authentication, inside a handshake slot of the sshd;
    through the route's bastions (each pinned and shared: rexplan.transport.bastion)."""
    path = route(host, user)
    hop = path.target
    # never empty: fabric would use (and extend) the shared config's own dict instead
    kwargs: dict[str, Any] = {"transport_factory": aead_first, **auth_kwargs(hop)}
    conn = _Connection(
        hop.address,
        user=hop.login,
        port=hop.port,
        config=_FABRIC_CONFIG.get(),
        connect_kwargs=kwargs,
    )
    policy = StrictPolicy()
    # fabric installs AutoAddPolicy in its constructor; replace it before anything connects
    conn.client.set_missing_host_key_policy(policy)
    load_known_hosts(conn.client, known)
    # rex's deadlines and ssh_config's ConnectTimeout (route) apply, not fabric's rounding
    conn.connect_timeout = None
    link = None
    sock: Any = None
    if path.jumps:
        link = BASTIONS.acquire(host, path.jumps, known, timeouts, banner, auth, deadline)
        try:
            sock = link.channel(host, hop.address, hop.port, _tcp_timeout(hop, timeouts))
        except BaseException:
            link.release()
            raise
    address, port = hop.address, hop.port
    gate = HANDSHAKE_GATES.gate(address, port, host.max_startups)
    try:
        if not gate.acquire(host.max_startups, timeout=max(0.0, deadline - time.monotonic())):
            raise HostTimeoutError(
                f"no handshake slot for {address}:{port} within {timeouts.connect:g}s: "
                f"{gate.in_flight} earlier handshakes to it are still in flight "
                f"(max_startups {gate.limit})",
                host=host.name,
                phase="connect",
                hint="that sshd is hung or very slow; check it, or raise timeouts.connect",
            )
        try:
            _open(
                conn,
                host,
                dataclasses.replace(user, login=hop.login),
                known,
                timeouts,
                banner,
                auth,
                sock,
                _tcp_timeout(hop, timeouts),
            )
        except TransportError as e:
            if dropped_by_server(e):
                gate.dropped()
            raise
        else:
            if gate.in_flight > 1 or gate.waiting:
                _settle(conn, timeouts.connect)
        finally:
            # authenticated sessions no longer count toward sshd's MaxStartups
            gate.release()
    except BaseException:
        if sock is not None:
            sock.close()
        if link is not None:
            link.release()
        raise
    conn.bastion = link
    return conn, policy


def _tcp_timeout(hop: Hop, timeouts: Timeouts) -> float:
    """ssh_config's ConnectTimeout where set, else timeouts.connect."""
    return hop.connect_timeout or timeouts.connect


def _open(
    conn: fabric.Connection,
    host: Host,
    user: User,
    known: str,
    timeouts: Timeouts,
    banner: float,
    auth: float,
    channel: Any = None,
    tcp_timeout: float | None = None,
) -> None:
    """TCP connect (or ``channel``, through a bastion), key exchange and authentication of
    ``conn``; errors mapped by phase."""
    address, port = str(conn.host), int(conn.port)
    extra: dict[str, Any] = {
        # start_client's own deadline covers banner and key exchange
        "timeout": banner + timeouts.connect,
        "banner_timeout": banner,
        "auth_timeout": auth,
    }
    sock = channel
    if sock is None:
        sock = tcp_connect(host, address, port, tcp_timeout or timeouts.connect)
    extra["sock"] = sock
    conn.connect_kwargs = {**conn.connect_kwargs, **extra}
    started = time.monotonic()
    try:
        conn.open()
    except BaseException as e:
        elapsed = time.monotonic() - started
        transport = conn.client.get_transport()
        conn.client.close()
        sock.close()
        if isinstance(e, Exception):
            raise connect_error(
                e, host, user, address, port, known, transport, banner, elapsed
            ) from e
        raise


def _settle(conn: fabric.Connection, timeout: float) -> None:
    """One round trip to sshd's post-authentication process before the slot is handed on.

    OpenSSH's listener stops counting a connection only once its monitor has taken over from
    the pre-auth child, a few ms after the client saw USERAUTH_SUCCESS; a waiter dialling in
    that gap is dropped. The post-auth process answers global requests, so its answer means
    the listener's count is down. Paid (one round trip) only while the sshd's gate is shared:
    a handshake alone on it leaves no waiter that could dial into the gap.
    """
    transport = conn.client.get_transport()
    if transport is None or not transport.is_active():
        return
    # Transport.global_request(wait=True) has no deadline: this is its body with one. OpenSSH's
    # ssh sends keepalive@openssh.com for ServerAliveInterval; servers answer it (failure)
    answered = threading.Event()
    transport.completion_event = answered
    request = paramiko.Message()
    request.add_byte(paramiko.common.cMSG_GLOBAL_REQUEST)
    request.add_string("keepalive@openssh.com")
    request.add_boolean(True)
    with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
        cast(Any, transport)._send_user_message(request)
        answered.wait(timeout)
