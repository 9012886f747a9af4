"""Bounded reading of a command's output: poll(2) waits, kept tails, the gate's marker."""

from __future__ import annotations

import collections
import contextlib
import select
import threading
from collections.abc import Callable, Sequence

import paramiko

from rexplan.errors import TransportError
from rexplan.transport.base import OUTPUT_TAIL

#: bytes read from a pipe or channel at a time
CHUNK = 32768


def wait_readable(fds: Sequence[int], timeout: float | None) -> list[int]:
    """``select.select(fds, [], [], timeout)[0]`` over poll(2): select() refuses descriptors
    past FD_SETSIZE (1024), which a launcher with a few hundred connections reaches. EOF and
    errors count as readable, as with select."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLPRI)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [fd for fd, _ in poller.poll(ms)]


class Tail:
    """The last ``limit`` bytes of a stream read chunk by chunk, and how many came before
    them: memory stays at ``limit`` plus a chunk whatever the stream's length, and each byte
    is copied once."""

    __slots__ = ("_chunks", "_size", "cut", "limit")

    def __init__(self, limit: int = OUTPUT_TAIL) -> None:
        self.limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self.cut = 0

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self.limit:
            dropped = len(self._chunks.popleft())
            self._size -= dropped
            self.cut += dropped

    def value(self) -> tuple[bytes, int]:
        """(the kept tail, the bytes dropped before it)."""
        data = b"".join(self._chunks)
        extra = max(0, len(data) - self.limit)
        return data[extra:], self.cut + extra


class Announcement:
    """Whether ``marker`` (or ``wanted``, when given) came as a line of its own in a stream read
    chunk by chunk, looking at each new chunk and the few bytes before it only (never the whole
    output again); ``wanted`` tells which came first."""

    __slots__ = ("_carry", "_needles", "seen", "wanted")

    def __init__(self, marker: bytes, wanted: bytes = b"") -> None:
        self._needles = [b"\n" + m + b"\n" for m in (marker, wanted) if m]
        self._carry = b"\n"  # the stream's start counts as a line start
        self.seen = False
        self.wanted = False

    def feed(self, data: bytes) -> bool:
        if not self.seen:
            window = self._carry + data
            found = [(window.find(n), i) for i, n in enumerate(self._needles) if n in window]
            if found:
                self.seen, self.wanted = True, min(found)[1] == 1
            self._carry = window[-(max(map(len, self._needles)) - 1) :]
        return self.seen


class Stream:
    """A command on an SSH host whose stdin stays open: send data as it comes, read its output
    line by line. stderr is merged into stdout so a chatty command never blocks on a full
    window nobody reads. One reader thread; send() is safe from any thread."""

    def __init__(self, chan: paramiko.Channel, host: str) -> None:
        self.host = host
        self._chan = chan
        self._lines = Lines(self._recv)
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        """Write ``data`` to the command's stdin; TransportError once the channel is gone."""
        with self._send_lock:
            try:
                self._chan.sendall(data)
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise TransportError(f"stream closed: {e}", host=self.host, phase="exec") from e

    def readline(self, limit: int) -> bytes:
        """The next output line (at most ``limit`` bytes); b"" once the command has ended or
        the connection died."""
        return self._lines.readline(limit)

    def _recv(self) -> bytes:
        try:
            return self._chan.recv(CHUNK)
        except (EOFError, paramiko.SSHException):  # the connection died: the end
            return b""

    def close_input(self) -> None:
        """EOF on the command's stdin."""
        with self._send_lock, contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._chan.shutdown_write()

    def close(self) -> None:
        """Close the channel (sshd then closes the command's pipes); idempotent."""
        self._chan.close()


class Lines:
    """Lines out of ``read`` (a chunk of bytes each call; b"" at the end, or when it fails),
    each at most ``limit`` bytes: what a stream's readline() needs."""

    def __init__(self, read: Callable[[], bytes]) -> None:
        self._read = read
        self._buffer = b""

    def readline(self, limit: int) -> bytes:
        """The next line (at most ``limit`` bytes); b"" once the input ended."""
        while b"\n" not in self._buffer and len(self._buffer) < limit:
            try:
                data = self._read()
            except OSError:
                data = b""
            if not data:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += data
        end = min(self._buffer.find(b"\n") + 1 or limit, limit)
        line, self._buffer = self._buffer[:end], self._buffer[end:]
        return line
