"""The program log's pump: the program writes into a pipe the supervisor owns, and a thread of
the supervisor writes what comes into ``logs/NAME.log`` itself, whole lines at a time, so it
can rotate the log between two lines without losing or repeating one and without stopping the
program (copy-truncate would do both): at ``max_size`` bytes, NAME.log becomes NAME.log.1,
NAME.log.1 becomes NAME.log.2 ... up to NAME.log.KEEP (the oldest goes), and a fresh NAME.log
is opened. A line longer than ``max_size`` is written whole into a file of its own; a partial
line waits for its end (up to LINE_CAP bytes, then it is written as it is).

The supervisor's own lines (``--- rex: ...`` marks with a UTC timestamp, its errors) go
through the same pump, between two of the program's lines. _thread, not threading: the agent
pays for every import at every start."""

from __future__ import annotations

import _thread
import os
import select
import time

from rexplan.remote.agent.failure import _suppress
from rexplan.wire import jobs

#: a partial line this long is written without waiting for its end
LINE_CAP = 1 << 16
#: a relaying pump's max_size: it never rotates (its keeper's pump does)
RELAYED = 1 << 62
#: what a relaying pump keeps of the latest output, for its tails
RECENT = max(jobs.OUT_TAIL, jobs.FAIL_TAIL)
#: bytes read from the pipe at a time
_CHUNK = 1 << 16
#: seconds the pump thread waits for output before it looks whether it should stop
_IDLE = 0.2
_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def log_path(home: str, name: str) -> str:
    """Where the program ``name`` logs: ``REX_HOME/logs/NAME.log`` (rotated: NAME.log.1 ...)."""
    return os.path.join(home, "logs", f"{name}.log")


def stamp() -> str:
    """The time for a log mark: UTC, to the second, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LogPump:
    """Owns the pipe the program's stdout and stderr go to (``write_fd``) and the log it fills.

    ``start`` is where the current run's output begins in the current NAME.log (a rotation
    sets it to 0 and counts ``rotated``), for the tail a failure report carries."""

    def __init__(self, path: str, fd: int, max_size: int, keep: int, relay: bool = False) -> None:
        self.path = path
        self.fd = fd
        #: ``fd`` is a pipe to the pump of a become program's keeper, which owns the log (the
        #: account cannot rename in the login's logs/): lines pass whole, never rotated here,
        #: and the tail of the current run is kept in memory (``recent``)
        self.relay = relay
        self.max_size = RELAYED if relay else max_size
        self.keep = keep
        self.size = 0 if relay else os.fstat(fd).st_size
        self.recent = b""
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.partial = b""
        self.lock = _thread.allocate_lock()
        self.done = False
        self.stopped = False  # the thread left its loop
        self.start = self.size
        self.rotated = 0

    def run(self) -> None:
        """Start the pump thread."""
        _thread.start_new_thread(self._loop, ())

    def _loop(self) -> None:
        try:
            while not self.done:
                try:
                    select.select([self.read_fd], [], [], _IDLE)
                    with self.lock:
                        if not self.done:
                            self._pump()
                except OSError:  # the log cannot be written: the program must not block on it
                    with _suppress(OSError):
                        os.read(self.read_fd, _CHUNK)
                    time.sleep(_IDLE)
        finally:
            self.stopped = True

    def _pump(self) -> bool:
        """Write what the pipe holds now; False once it held nothing."""
        try:
            data = os.read(self.read_fd, _CHUNK)
        except BlockingIOError:
            return False
        if not data:
            return False
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) < LINE_CAP:
            self.partial = data
            return True
        if cut == 0:
            cut = len(data)
        self.partial = data[cut:]
        self._write(data[:cut])
        return True

    def _write(self, lines: bytes) -> None:
        """Append whole lines, rotating first wherever the next line would pass max_size."""
        while lines:
            room = max(0, self.max_size - self.size)  # a log from before may be larger
            if len(lines) <= room:
                take = len(lines)
            else:
                take = lines.rfind(b"\n", 0, room) + 1
                if take == 0:  # not even the first line fits
                    if self.size > 0:
                        self._rotate()
                        continue
                    take = lines.find(b"\n") + 1 or len(lines)  # a line of its own
            self._append(lines[:take])
            lines = lines[take:]

    def _append(self, data: bytes) -> None:
        if self.relay:
            self.recent = (self.recent + data)[-RECENT:]
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
            self.size += written

    def _rotate(self) -> None:
        """NAME.log -> NAME.log.1 -> ... -> NAME.log.KEEP (the oldest goes), a fresh NAME.log."""
        if self.keep > 0:
            for n in range(self.keep - 1, 0, -1):
                with _suppress(FileNotFoundError):
                    os.rename(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            with _suppress(FileNotFoundError):  # removed by hand: nothing to keep
                os.rename(self.path, f"{self.path}.1")
        else:
            with _suppress(FileNotFoundError):
                os.unlink(self.path)
        fd = os.open(self.path, _LOG_FLAGS, 0o600)
        os.close(self.fd)
        self.fd = fd
        self.size = 0
        self.start = 0
        self.rotated += 1

    def drain(self) -> None:
        """Write everything the pipe holds now, the partial line included: what the program
        wrote before this call is in the log after it."""
        with self.lock:
            while self._pump():
                pass
            if self.partial:
                data, self.partial = self.partial, b""
                self._write(data)

    def note(self, text: str) -> None:
        """A line of the supervisor's (``--- rex: TEXT at TIME``), between two of the
        program's lines."""
        with self.lock:
            while self._pump():
                pass
            # OSError: a full disk must not end the supervisor
            with _suppress(OSError):
                self._write(f"--- rex: {text} at {stamp()}\n".encode())

    def begin(self, text: str) -> None:
        """Mark the start of a run of the program (``note``); its output begins after it."""
        self.note(text)
        with self.lock:
            self.start = self.size
            self.rotated = 0

    def finish(self) -> None:
        """Stop the thread after a last drain, as the supervisor ends (having pointed its
        stderr elsewhere), and close ``write_fd``. What the program left
        running may still hold the pipe: then a process of its own (holding nothing but the
        pipe and the log) goes on writing the log until they all closed it, so their next
        write does not end them with SIGPIPE."""
        with _suppress(OSError):
            self.drain()
        # the thread writes only holding the lock: once this holds it, the thread writes no
        # more (it may still sit in its select; the process ends under it), and the
        # supervisor ends at once (its program lock with it) instead of a poll later
        if not self.lock.acquire(True, 2 * _IDLE + 1):
            return  # the thread is stuck in a write: no fork beside it
        self.done = True
        with _suppress(OSError):
            os.close(self.write_fd)  # the caller's other copies (its stderr) went before
        try:
            data = os.read(self.read_fd, _CHUNK)
        except BlockingIOError:
            data = b"?"  # open, and empty for now
        except OSError:
            return
        if not data:
            return  # end of file: nothing else holds the pipe
        if data != b"?":
            self.partial += data
        if os.fork() == 0:
            try:
                self._drain_until_closed()
            finally:
                os._exit(0)

    def _drain_until_closed(self) -> None:
        """The drainer: keep only the pipe and the log (no lock, no report pipe), then write
        until every writer closed the pipe."""
        os.setsid()
        keep = {self.read_fd, self.fd}
        with _suppress(OSError):
            for name in os.listdir("/proc/self/fd"):
                if int(name) not in keep:
                    with _suppress(OSError):
                        os.close(int(name))
        os.set_blocking(self.read_fd, True)
        with _suppress(OSError):
            while True:
                data = os.read(self.read_fd, _CHUNK)
                if not data:
                    break
                self.partial += data
                cut = self.partial.rfind(b"\n") + 1
                if cut or len(self.partial) >= LINE_CAP:
                    cut = cut or len(self.partial)
                    lines, self.partial = self.partial[:cut], self.partial[cut:]
                    self._write(lines)
            if self.partial:
                self._write(self.partial)

    def tail(self, limit: int = jobs.FAIL_TAIL) -> bytes:
        """The last ``limit`` bytes (at most) of what the current run wrote, from NAME.log
        and, when a rotation came since the run began, the file before it; opened by
        jobs.cut_line when more came before."""
        self.drain()
        if self.relay:
            return self._recent_tail(limit)
        names = [(self.path, self.start)]
        if self.rotated and self.keep:
            names.append((f"{self.path}.1", 0))
        pieces: list[bytes] = []
        total = 0
        for name, begin in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                break
            try:
                end = os.fstat(fd).st_size
                have = max(0, end - begin)
                want = max(0, min(have, limit - sum(map(len, pieces))))
                pieces.insert(0, os.pread(fd, want, end - want))
                total += have
            finally:
                os.close(fd)
        data = b"".join(pieces)
        if total <= limit:
            return data
        # the line for ``total`` is as long as the one for what is cut, or longer
        keep = limit - len(jobs.cut_line(total))
        return jobs.cut_line(total - keep) + data[len(data) - keep :]

    def _recent_tail(self, limit: int) -> bytes:
        """tail() of a relaying pump: from the bytes it kept of what passed through."""
        total = self.size - self.start
        data = self.recent[len(self.recent) - min(total, len(self.recent)) :]
        if total <= limit:
            return data
        keep = limit - len(jobs.cut_line(total))
        return jobs.cut_line(total - keep) + data[len(data) - keep :]
