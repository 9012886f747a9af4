"""Callbacks through the SSH connection (``callback: {via: ssh}``): a remote port forward on
the host's loopback, each forwarded channel piped into a local socket the caller's sink takes.

The launcher asks the host's sshd (``tcpip-forward``, RFC 4254 7.1) to listen on its
127.0.0.1 at a port it chooses; an agent dials that port, sshd opens a ``forwarded-tcpip``
channel back over the connection the launcher already holds, and ``bridge`` joins the channel
to one end of a socketpair whose other end goes to the sink (the callback listener, or the
persistence daemon's client). The handshake runs unchanged over it: the proof is the key.
The forward lives as long as the SSH connection: a launcher that dies takes it with it, and an
agent that cannot call back stops its program.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

import paramiko

from rexplan.transport.base import LOOPBACK, Sink

#: bytes moved per read, either way
CHUNK = 32768


def peer_label(host: str, origin_port: int) -> tuple[str, int]:
    """The peer a forwarded connection is logged and counted as: the host it came through
    (the listener's per-source slots then count per host, not all as one 127.0.0.1)."""
    return f"ssh:{host}", origin_port


def bridge(chan: paramiko.Channel, sock: socket.socket) -> None:
    """Pipe ``chan`` and ``sock`` both ways on a thread of their own until both ends closed
    (or either failed); EOF goes across as a shutdown of the other side's write half."""
    threading.Thread(target=_pump, args=(chan, sock), name="rex-forward", daemon=True).start()


def _pump(chan: paramiko.Channel, sock: socket.socket) -> None:
    sel = selectors.DefaultSelector()
    try:
        sel.register(chan, selectors.EVENT_READ, "chan")
        sel.register(sock, selectors.EVENT_READ, "sock")
        open_ends = 2
        while open_ends:
            for ready, _ in sel.select():
                if ready.data == "chan":
                    data = chan.recv(CHUNK)
                    if data:
                        sock.sendall(data)
                        continue
                    sel.unregister(chan)
                    open_ends -= 1
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                else:
                    data = sock.recv(CHUNK)
                    if data:
                        chan.sendall(data)
                        continue
                    sel.unregister(sock)
                    open_ends -= 1
                    chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # either end gone: both close
    finally:
        sel.close()
        sock.close()
        chan.close()


class Forwards:
    """The remote forwards of one SSH connection, by the port sshd chose for each.

    paramiko keeps one handler per connection for every forward, so this dispatches each
    forwarded channel to its forward's sink by the port it arrived on."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._sinks: dict[int, Sink] = {}
        self._lock = threading.Lock()

    def open(self, transport: paramiko.Transport, sink: Sink) -> int:
        """A new forward from the host's 127.0.0.1 (at a port sshd chooses) to ``sink``;
        paramiko.SSHException when sshd refuses it (AllowTcpForwarding no/local)."""
        with self._lock:
            port = transport.request_port_forward(LOOPBACK, 0, handler=self._channel)
            self._sinks[int(port)] = sink
        return int(port)

    def close(self, transport: paramiko.Transport | None, port: int) -> None:
        """Stop forwarding ``port``: sshd stops listening there, so nothing can dial it."""
        with self._lock:
            known = self._sinks.pop(port, None) is not None
        if known and transport is not None and transport.is_active():
            # not cancel_port_forward: it also drops the connection's one handler, which the
            # other forwards of this connection (other runs' through the daemon) still use
            with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                transport.global_request("cancel-tcpip-forward", (LOOPBACK, port), wait=True)

    def forget(self) -> None:
        """Drop every forward without asking sshd: the connection is closing, and they go
        with it."""
        with self._lock:
            self._sinks.clear()

    def _channel(
        self, chan: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]
    ) -> None:
        """paramiko's handler (on its transport thread: must not block)."""
        with self._lock:
            sink = self._sinks.get(int(server[1]))
        if sink is None:
            chan.close()  # a forward cancelled meanwhile
            return
        ours, theirs = socket.socketpair()
        try:
            sink(theirs, peer_label(self.host, int(origin[1])))
        except OSError:
            ours.close()
            theirs.close()
            chan.close()
            return
        bridge(chan, ours)
