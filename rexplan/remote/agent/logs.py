"""``--logs LINES once|follow NAME...``: the programs' output, as the supervisor writes it to
``REX_HOME/logs/NAME.log``, for ``rex logs``.

Every line goes out as ``NAME SP TEXT LF``, TEXT at most LINE_MAX bytes (a longer line goes
out in pieces, nothing is dropped); ``.none NAME`` says NAME has no log. First the last LINES
lines of each log (from the newest rotated file, NAME.log.1, too when NAME.log holds fewer),
at most TAIL_BUDGET bytes in all; then ``.end``. With ``follow`` the logs are then followed
(a rotated log is read to its end, then the new file from its start; a truncated one from its
start) until stdin closes or stdout breaks: the launcher closing its channel is the end, so
no follower outlives the command that started it."""

from __future__ import annotations

import os
import select
import sys

from rexplan.wire import chars

#: the longest TEXT of an output line; longer lines go out in pieces
LINE_MAX = 4096
#: the bytes of all the first tails together: within what a launcher keeps of a command's
#: output (transport.base.OUTPUT_TAIL, 1 MiB)
TAIL_BUDGET = 960 * 1024
#: the most lines asked for, and names per request
MAX_LINES = 100_000
MAX_NAMES = 512
#: seconds between two looks at the logs while following
POLL = 0.2
_CHUNK = 1 << 16

USAGE = "usage: agent --logs LINES once|follow NAME..."


def _path(home: str, name: str, rotated: int = 0) -> str:
    return os.path.join(home, "logs", f"{name}.log" + (f".{rotated}" if rotated else ""))


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None


def _last_lines(fd: int, end: int, lines: int, budget: int) -> tuple[list[bytes], bool]:
    """The last ``lines`` complete lines before ``end`` of ``fd`` (at most ``budget`` bytes),
    and whether the file may hold more before them."""
    start = max(0, end - budget)
    data = os.pread(fd, end - start, start)
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    cut = start > 0
    if cut and parts:
        parts.pop(0)  # the first piece may be the end of a longer line
    more = cut or len(parts) > lines
    return parts[-lines:] if lines else [], more


class _Out:
    """stdout as a descriptor: whole writes, and the end of the command when it breaks."""

    def __init__(self) -> None:
        self.buf: list[bytes] = []

    def line(self, name: str, text: bytes) -> None:
        head = name.encode() + b" "
        if not text:
            self.buf.append(head + b"\n")
        for i in range(0, len(text), LINE_MAX):
            self.buf.append(head + text[i : i + LINE_MAX] + b"\n")

    def meta(self, text: str) -> None:
        self.buf.append(text.encode() + b"\n")

    def flush(self) -> None:
        data, self.buf = b"".join(self.buf), []
        view = memoryview(data)
        while view:
            written = os.write(1, view)  # OSError (EPIPE): the reader is gone
            view = view[written:]


class _Follower:
    """One log followed by path: its open file and how far it was read."""

    def __init__(self, home: str, name: str, fd: int | None, pos: int) -> None:
        self.path = _path(home, name)
        self.name = name
        self.fd = fd
        self.pos = pos
        self.partial = b""

    def poll(self, out: _Out) -> None:
        if self.fd is None:
            self.fd, self.pos = _open(self.path), 0
            if self.fd is None:
                return
        self._drain(out)
        try:
            now = os.stat(self.path, follow_symlinks=False)
            same = now.st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return  # mid-rotation: the new file comes at a next look
        if not same:  # rotated: the old file was read to its end above
            self._emit_partial(out)
            os.close(self.fd)
            self.fd, self.pos = _open(self.path), 0
            if self.fd is not None:
                self._drain(out)

    def _drain(self, out: _Out) -> None:
        assert self.fd is not None
        if os.fstat(self.fd).st_size < self.pos:
            self._emit_partial(out)
            self.pos = 0  # truncated: from its start
        while True:
            data = os.pread(self.fd, _CHUNK, self.pos)
            if not data:
                return
            self.pos += len(data)
            pieces = (self.partial + data).split(b"\n")
            self.partial = pieces.pop()
            for piece in pieces:
                out.line(self.name, piece)
            while len(self.partial) >= LINE_MAX:
                out.line(self.name, self.partial[:LINE_MAX])
                self.partial = self.partial[LINE_MAX:]

    def _emit_partial(self, out: _Out) -> None:
        if self.partial:
            out.line(self.name, self.partial)
            self.partial = b""


def _first(home: str, name: str, lines: int, budget: int, out: _Out) -> _Follower:
    """Write ``name``'s last ``lines`` lines; its follower, from the end of what was read."""
    fd = _open(_path(home, name))
    if fd is None and _open_closed(_path(home, name, 1)) is False:
        out.meta(f".none {name}")
        return _Follower(home, name, None, 0)
    end = 0
    got: list[bytes] = []
    more = True
    if fd is not None:
        end = os.fstat(fd).st_size
        got, more = _last_lines(fd, end, lines, budget)
    if more is False and len(got) < lines:
        old = _open(_path(home, name, 1))
        if old is not None:
            try:
                rest = budget - sum(len(g) + 1 for g in got)
                if rest > 0:
                    older, _ = _last_lines(old, os.fstat(old).st_size, lines - len(got), rest)
                    got = older + got
            finally:
                os.close(old)
    # the budget holds for what goes out, prefixes included: the oldest lines give way
    size = sum(len(name) + 2 + len(text) for text in got)
    drop = 0
    while size > budget and drop < len(got):
        size -= len(name) + 2 + len(got[drop])
        drop += 1
    for text in got[drop:]:
        out.line(name, text)
    return _Follower(home, name, fd, end)


def _open_closed(path: str) -> bool:
    """Whether ``path`` can be opened (and closed again)."""
    fd = _open(path)
    if fd is None:
        return False
    os.close(fd)
    return True


def _stdin_closed() -> bool:
    """Whether stdin reached its end (the launcher closed the channel), waiting up to POLL."""
    try:
        if select.select([0], [], [], POLL)[0]:
            return not os.read(0, _CHUNK)
    except OSError:
        return True
    return False


def logs_mode(home: str, args: list[str]) -> int | None:
    """Run ``--logs`` with ``args`` (what follows it); None when they are not valid."""
    if len(args) < 3 or args[1] not in ("once", "follow") or len(args) - 2 > MAX_NAMES:
        return None
    try:
        lines = int(args[0])
    except ValueError:
        return None
    names = args[2:]
    named = all(chars.TRIPLE_RE.match(n) or chars.NAME_RE.match(n) for n in names)
    if not 0 <= lines <= MAX_LINES or not named:
        return None
    out = _Out()
    budget = TAIL_BUDGET // len(names)
    try:
        followers = [_first(home, name, lines, budget, out) for name in dict.fromkeys(names)]
        out.meta(".end")
        out.flush()
        if args[1] == "once":
            return 0
        while not _stdin_closed():
            for follower in followers:
                follower.poll(out)
            out.flush()
    except OSError:  # stdout broke: the launcher is gone
        pass
    finally:
        try:
            sys.stdout.flush()
        except OSError:
            pass
    return 0
