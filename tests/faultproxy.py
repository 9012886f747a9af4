"""A fault-injecting TCP proxy the tests own: pass, delay, blackhole, reset, cut, flip, drop."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType

UP = "up"  # client -> target
DOWN = "down"  # target -> client
_HEADER = 4
_TRACK_LIMIT = 1 << 20  # a "frame" longer than this is not rex-cb/1: stop cutting frames


@dataclass(frozen=True)
class Fault:
    """What the proxy does to a connection; build one with the functions below."""

    kind: str = "pass"
    ms: float = 0.0
    count: int = 0
    frame: int = 0
    byte: int = 0
    bit: int = 0
    direction: str = UP
    data: bytes = b""


def passthrough() -> Fault:
    """Forward both ways untouched."""
    return Fault("pass")


def delay(ms: float) -> Fault:
    """Hold every chunk ``ms`` milliseconds before forwarding it (both directions)."""
    return Fault("delay", ms=ms)


def blackhole() -> Fault:
    """Accept, read and discard; never connect to the target, never answer."""
    return Fault("blackhole")


def reset() -> Fault:
    """Accept, then reset the connection at once (RST: SO_LINGER 0 and close)."""
    return Fault("reset")


def close_after(count: int) -> Fault:
    """Forward ``count`` bytes (both directions together), then close both sides cleanly."""
    return Fault("close_after", count=count)


def reset_after(count: int) -> Fault:
    """Forward ``count`` bytes (both directions together), then reset both sides."""
    return Fault("reset_after", count=count)


def bitflip(frame: int, byte: int, bit: int, direction: str = UP) -> Fault:
    """Flip ``bit`` of byte ``byte`` (0-3: the length header) of rex-cb/1 frame ``frame``."""
    return Fault("bitflip", frame=frame, byte=byte, bit=bit, direction=direction)


def drop(frame: int, direction: str = UP) -> Fault:
    """Record frame ``frame`` of ``direction`` but never forward it; the rest passes."""
    return Fault("drop", frame=frame, direction=direction)


def inject(data: bytes, direction: str = DOWN, before: int = 0) -> Fault:
    """Send ``data`` (e.g. a forged frame) in ``direction`` ahead of frame ``before``."""
    return Fault("inject", frame=before, direction=direction, data=data)


def frame(payload: bytes) -> bytes:
    """A raw rex-cb/1 frame around ``payload`` (no checks: forged frames are the point)."""
    return struct.pack(">I", len(payload)) + payload


class _Stream:
    """One direction's bytes cut into length-prefixed frames as they pass, and faulted."""

    def __init__(self, fault: Fault, direction: str) -> None:
        mine = fault.direction == direction
        self.flip = fault if mine and fault.kind == "bitflip" else None
        self.drop = fault.frame if mine and fault.kind == "drop" else None
        self.inject = fault if mine and fault.kind == "inject" else None
        self.index = 0
        self.current = bytearray()
        self.frames: list[bytes] = []
        self.tracking = True

    def _length(self) -> int | None:
        if len(self.current) < _HEADER:
            return None
        return _HEADER + int.from_bytes(self.current[:_HEADER], "big")

    def feed(self, data: bytes) -> bytes:
        """The bytes to forward for ``data``; records complete frames as the peer sent them."""
        if not self.tracking:
            return data
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            if self.inject and not self.current and self.index == self.inject.frame:
                out.append(self.inject.data)
                self.inject = None
            total = self._length()
            if total is not None and total > _TRACK_LIMIT:
                self.tracking = False
                out.append(data[pos:])
                break
            want = (_HEADER if total is None else total) - len(self.current)
            piece = bytearray(data[pos : pos + want])
            at = len(self.current)
            flip = self.flip
            if flip and self.index == flip.frame and at <= flip.byte < at + len(piece):
                piece[flip.byte - at] ^= 1 << flip.bit
            self.current += data[pos : pos + len(piece)]
            pos += len(piece)
            if self.drop != self.index:
                out.append(bytes(piece))
            if self._length() == len(self.current):
                self.frames.append(bytes(self.current))
                self.current.clear()
                self.index += 1
        return b"".join(out)


@dataclass
class Connection:
    """One proxied connection: the frames each side sent (as sent, before any fault)."""

    client: socket.socket
    fault: Fault
    upstream: socket.socket | None = None
    streams: dict[str, _Stream] = field(default_factory=dict)
    forwarded: int = 0
    ended: set[str] = field(default_factory=set)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def frames(self, direction: str) -> list[bytes]:
        return list(self.streams[direction].frames) if direction in self.streams else []


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """Listens on ``listen`` (default 127.0.0.1, a free port) and forwards to ``target``.

    ``fault`` applies to connections accepted after it is set. Threads: one accepting, two per
    connection; ``stop()`` (or leaving the ``with`` block) closes every socket and joins them.
    """

    def __init__(
        self,
        target: tuple[str, int],
        fault: Fault | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.target = target
        self.fault = fault or passthrough()
        self.connections: list[Connection] = []
        self._listen = listen
        self._server: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "proxy not started"
        host, port = self._server.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> FaultProxy:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self._listen)
        server.listen(1024)
        server.settimeout(0.05)
        self._server = server
        self._spawn(self._accept_loop)
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Close the listener and every connection; join every thread (5 s at most)."""
        self._stop.set()
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            self._close(conn)
        for thread in list(self._threads):
            thread.join(5)
        if self._server is not None:
            self._server.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"fault proxy threads still running: {alive}"

    def frames(self, direction: str, index: int = -1) -> list[bytes]:
        """Frames recorded on connection ``index`` (default the latest) in ``direction``."""
        with self._lock:
            return self.connections[index].frames(direction) if self.connections else []

    def inject_now(self, data: bytes, direction: str = DOWN) -> None:
        """Write ``data`` at once into every open connection, towards ``direction``'s peer."""
        with self._lock:
            conns = [c for c in self.connections if not c.closed]
        for conn in conns:
            sock = conn.client if direction == DOWN else conn.upstream
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(data)

    def wait_idle(self, within: float = 5.0) -> bool:
        """True once every accepted connection is closed."""
        end = time.monotonic() + within
        while time.monotonic() < end:
            with self._lock:
                if all(c.closed for c in self.connections):
                    return True
            time.sleep(0.01)
        return False

    # ---- threads ----

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            fault = self.fault
            if fault.kind == "reset":
                _rst(client)
                continue
            client.settimeout(None)
            conn = Connection(client, fault)
            conn.streams = {UP: _Stream(fault, UP), DOWN: _Stream(fault, DOWN)}
            with self._lock:
                self.connections.append(conn)
            if self._stop.is_set():
                self._close(conn)
                return
            self._spawn(self._serve, conn)

    def _serve(self, conn: Connection) -> None:
        if conn.fault.kind == "blackhole":
            self._pump(conn, conn.client, None, UP)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._close(conn)
            return
        upstream.settimeout(None)
        with conn.lock:
            if conn.closed:
                upstream.close()
                return
            conn.upstream = upstream
        self._spawn(self._pump, conn, upstream, conn.client, DOWN)
        self._pump(conn, conn.client, upstream, UP)

    def _pump(
        self, conn: Connection, src: socket.socket, dst: socket.socket | None, direction: str
    ) -> None:
        stream = conn.streams[direction]
        fault = conn.fault
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            out = stream.feed(data)
            if dst is None:
                continue  # blackhole: swallow
            if fault.kind == "delay" and self._stop.wait(fault.ms / 1000):
                break
            if fault.kind in ("close_after", "reset_after"):
                with conn.lock:
                    room = max(0, fault.count - conn.forwarded)
                    out = out[:room]
                    conn.forwarded += len(out)
                    done = conn.forwarded >= fault.count
                if out and not self._send(dst, out):
                    break
                if done:
                    self._close(conn, rst=fault.kind == "reset_after")
                    return
                continue
            if out and not self._send(dst, out):
                break
        # half-close: the other direction may still be talking
        if dst is not None:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        with conn.lock:
            conn.ended.add(direction)
            both = dst is None or len(conn.ended) == 2
        if both or self._stop.is_set():
            self._close(conn)

    @staticmethod
    def _send(dst: socket.socket, data: bytes) -> bool:
        try:
            dst.sendall(data)
        except OSError:
            return False
        return True

    def _close(self, conn: Connection, rst: bool = False) -> None:
        with conn.lock:
            if conn.closed:
                return
            conn.closed = True
            socks = [s for s in (conn.client, conn.upstream) if s is not None]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            if rst:
                _rst(sock)
            else:
                sock.close()


def replay(address: tuple[str, int], frames: list[bytes], timeout: float = 5.0) -> list[bytes]:
    """Send recorded ``frames`` on a new connection; the raw frames received until it closes."""
    got: list[bytes] = []
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(b"".join(frames))
        stream = _Stream(passthrough(), DOWN)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            stream.feed(data)
        got = stream.frames
    return got


@contextlib.contextmanager
def proxied(target: tuple[str, int], fault: Fault | None = None) -> Iterator[FaultProxy]:
    """``with proxied(addr, fault) as proxy:`` a started proxy, stopped and joined after."""
    proxy = FaultProxy(target, fault)
    with proxy:
        yield proxy
