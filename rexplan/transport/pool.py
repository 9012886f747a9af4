"""Opening a host's transport by its kind, and the pool sharing one per host and login."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from rexplan.core.model import Host, User
from rexplan.errors import TransportError
from rexplan.transport.base import ConnectOptions, Transport, kind
from rexplan.transport.local import LocalTransport
from rexplan.transport.ssh import SSHTransport

if TYPE_CHECKING:
    from typing_extensions import Unpack


def connect(host: Host, user: User, **opts: Unpack[ConnectOptions]) -> Transport:
    """Open a transport to ``host`` as ``user``; connection errors surface here, by phase.

    ``known_hosts`` None means ~/.ssh/known_hosts; unknown or changed keys are refused, never
    added. Banner and auth deadlines default to ``timeouts.connect``.
    """
    if kind(host.transport).is_local:
        return LocalTransport(host)
    return SSHTransport.open(host, user, **opts)


Connector = Callable[[Host, User], Transport]


class TransportPool:
    """One transport per (host, login), opened on first use and shared by every thread.

    A failed connect is remembered and re-raised for that host, so steps on an unreachable
    host fail at once instead of each waiting out the connect deadline again.
    """

    def __init__(
        self, *, connector: Connector | None = None, **opts: Unpack[ConnectOptions]
    ) -> None:
        def default(host: Host, user: User) -> Transport:
            return connect(host, user, **opts)

        self._connect = connector or default
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, str], _Slot] = {}

    def get(self, host: Host, user: User) -> Transport:
        """The open transport for ``host`` as ``user.login``, connecting on first use."""
        key = (host.name, user.login)
        with self._lock:
            slot = self._slots.setdefault(key, _Slot())
        # connects to different hosts proceed in parallel; the same host connects once
        with slot.lock:
            if slot.error is not None:
                raise slot.error
            if slot.transport is None:
                try:
                    slot.transport = self._connect(host, user)
                except TransportError as e:
                    slot.error = e
                    raise
            return slot.transport

    def discard(self, host: Host, user: User) -> None:
        """Close and forget ``host``'s transport or remembered error; get() reconnects."""
        with self._lock:
            slot = self._slots.pop((host.name, user.login), None)
        if slot is not None:
            with slot.lock:
                if slot.transport is not None:
                    slot.transport.close()

    def close_all(self) -> None:
        """Close every transport; the pool can be used again afterwards."""
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            with slot.lock:
                if slot.transport is not None:
                    with contextlib.suppress(Exception):
                        slot.transport.close()

    def __enter__(self) -> TransportPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transport: Transport | None = None
        self.error: TransportError | None = None
