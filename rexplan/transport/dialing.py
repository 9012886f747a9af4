"""Pieces of opening one SSH connection, shared by targets and bastions: TCP connect, the
transport offering AES-GCM first, private keys loaded once, and failures mapped by phase."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

import paramiko

from rexplan.core.model import Host, User
from rexplan.errors import (
    AuthenticationError,
    HostKeyError,
    HostTimeoutError,
    TransportError,
    UnreachableError,
)
from rexplan.transport.pinning import UnknownHostKey, host_key_name


def timed_out(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if isinstance(seen, TimeoutError) or "timeout" in text or "timed out" in text:
            return True
        seen = seen.__context__
    return False


def file_stamps(paths: Sequence[str]) -> tuple[tuple[int, int] | None, ...]:
    """(mtime, size) of each path, None where there is no file: a cache key that changes
    when any of them is edited, created or removed."""
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(os.path.expanduser(path))
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class IdentityCache:
    """Private keys loaded once per file content rather than per connection: paramiko's
    key_filename path parses the file once per key class it tries (three times for an
    ed25519 key) on every connection. A key that does not load here (encrypted, unknown
    type) is left to paramiko's key_filename path and its error messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[tuple[object, ...], paramiko.PKey | None]] = {}

    def get(self, path: str) -> paramiko.PKey | None:
        cert = path + "-cert.pub"
        stamp = file_stamps((path, cert))
        with self._lock:
            hit = self._keys.get(path)
            if hit is None or hit[0] != stamp:
                hit = (stamp, self._load(path, cert))
                self._keys[path] = hit
            return hit[1]

    @staticmethod
    def _load(path: str, cert: str) -> paramiko.PKey | None:
        try:
            pkey = paramiko.PKey.from_path(path)
            if os.path.isfile(cert):  # as paramiko's key_filename path does
                pkey.load_certificate(cert)
        except Exception:  # paramiko raises many types; its key_filename path reports them
            return None
        return pkey


IDENTITIES = IdentityCache()


#: AEAD ciphers first: their integrity check runs in the cipher library, where with the
#: other ciphers paramiko compares every packet's MAC in a Python loop
_AEAD = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def aead_first(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """SSHClient.connect's transport_factory: paramiko's Transport offering the AES-GCM
    ciphers first (OpenSSH >= 6.2 has them); every cipher it offers stays on the list."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    options.ciphers = tuple(c for c in _AEAD if c in offered) + tuple(
        c for c in offered if c not in _AEAD
    )
    return transport


def tcp_connect(host: Host, address: str, port: int, timeout: float) -> socket.socket:
    hint = f"check hosts.{host.name}.address/port and that sshd runs there"
    where = f"{address}:{port}"
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as e:
        if isinstance(e, socket.gaierror):
            why = f"cannot resolve {address}: {e.strerror}"
        elif isinstance(e, ConnectionRefusedError):
            why = f"connection refused by {where}"
        elif isinstance(e, TimeoutError):
            why = f"no TCP connection to {where} within {timeout:g}s"
        else:
            why = f"cannot connect to {where}: {e.strerror or e}"
        raise UnreachableError(why, host=host.name, phase="connect", hint=hint) from e
    # SSH packets are small request/reply pairs: Nagle plus delayed ACK would add ~40 ms to each
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect_error(
    exc: Exception,
    host: Host,
    user: User,
    address: str,
    port: int,
    known_hosts: str,
    transport: paramiko.Transport | None,
    banner: float,
    elapsed: float,
) -> TransportError:
    """Map a failed fabric/paramiko connect to the phase it failed in."""
    name = host_key_name(address, port)
    if isinstance(exc, UnknownHostKey):
        return HostKeyError(
            f"unknown host key for {name} ({exc.key.get_name()} {exc.key.fingerprint}): "
            f"not in {known_hosts}; nothing was run",
            host=host.name,
            phase="hostkey",
            hint="check the fingerprint, then pin it: rex hostkeys scan -m MANIFEST --accept",
        )
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            f"host key CHANGED for {name}: it offered {exc.key.get_name()} "
            f"{exc.key.fingerprint}, {known_hosts} pins {exc.expected_key.fingerprint} "
            f"(possible man-in-the-middle); known_hosts left unchanged, nothing was run",
            host=host.name,
            phase="hostkey",
            hint=f"if {host.name} was really rebuilt: rex hostkeys scan -m MANIFEST "
            f"--replace {host.name}",
        )
    if transport is None or not transport.remote_version:
        if elapsed >= banner or timed_out(exc):
            return HostTimeoutError(
                f"no SSH banner from {address}:{port} within {banner:g}s (sshd hung or overloaded)",
                host=host.name,
                phase="banner",
            )
        return TransportError(
            f"{address}:{port} closed the connection before the SSH banner: {exc}",
            host=host.name,
            phase="banner",
        )
    if transport.host_key is None:
        if timed_out(exc):
            return HostTimeoutError(
                f"SSH key exchange with {address}:{port} timed out", host=host.name, phase="kex"
            )
        return TransportError(f"SSH key exchange failed: {exc}", host=host.name, phase="kex")
    if isinstance(exc, paramiko.AuthenticationException) and "timeout" in str(exc).lower():
        return HostTimeoutError(
            f"authentication as {user.login} did not complete in time", host=host.name, phase="auth"
        )
    if isinstance(exc, paramiko.SSHException):
        offered = user.identity or "agent and default keys"
        return AuthenticationError(
            f"{address}:{port} refused login as {user.login} with {offered}",
            host=host.name,
            phase="auth",
            hint=f"check users.{user.name}.identity and ~{user.login}/.ssh/authorized_keys "
            "on the host",
        )
    return TransportError(f"connection failed: {exc}", host=host.name, phase="auth")
