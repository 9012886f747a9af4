"""One ssh client of a relay and what its end means: OpenSSH in batch mode with strict host
keys pinned in a temporary known_hosts file, this identity only.

Connection storms: at most a child's ``max_startups`` of a relay's ssh clients are in the
handshake with its sshd at once (Gate; children sharing an sshd share the smallest), counted
until the sshd's post-authentication process confirmed the session; an ssh the sshd dropped
before authenticating is run again after a full-jitter pause, at most ATTEMPTS times within
``connect`` seconds. Nothing is retried once authenticated, so never after a launch line went
out.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time

# every relay run pays for its imports: typing never
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


#: ``python3 -I -S -c BOOTSTRAP <sha256> <name>``: read "<length>\n<relay source>" from stdin,
#: check its sha256, run it with its own source at hand (it starts the relays below it)
BOOTSTRAP = (
    "import sys,hashlib\n"
    "b=sys.stdin.buffer\n"
    "s=b.read(int(b.readline(16)))\n"
    "if hashlib.sha256(s).hexdigest()!=sys.argv[1]:\n"
    " sys.stderr.write('rex-relay: relay damaged in transit\\n');sys.exit(16)\n"
    "exec(compile(s,'<rex-relay>','exec'),{'__name__':'__rex_relay__','SOURCE':s})\n"
)

#: ``python3 -I -S -c INSTALL <sha256> <file name>``: write the "<length>\n<agent bundle>" on
#: stdin to REX_HOME/<file name> (mode 0600, atomically) if its sha256 matches
INSTALL = (
    "import os,sys,hashlib\n"
    "b=sys.stdin.buffer\n"
    "s=b.read(int(b.readline(16)))\n"
    "if hashlib.sha256(s).hexdigest()!=sys.argv[1]:sys.exit(16)\n"
    "h=os.environ.get('REX_HOME') or os.path.join(os.path.expanduser('~'),'.rex')\n"
    "os.makedirs(h,0o700,exist_ok=True)\n"
    "t=os.path.join(h,'.%s.%d.tmp'%(sys.argv[2],os.getpid()))\n"
    "d=os.open(t,os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW,0o600)\n"
    "with os.fdopen(d,'wb') as f:f.write(s)\n"
    "os.replace(t,os.path.join(h,sys.argv[2]))\n"
)

EXIT_BAD_INPUT = 16
#: OpenSSH's default MaxStartups start value, for a child whose header names none
MAX_STARTUPS = 10
#: ssh runs in all for one request whose handshakes the sshd keeps dropping, and the full-jitter
#: pause before retry n: uniform in [0, min(BACKOFF_CAP, BACKOFF * 2**(n-1))] (as the launcher)
ATTEMPTS = 4
BACKOFF = 0.1
BACKOFF_CAP = 2.0
_TAIL = 4  # lines of a dead process's stderr kept for the error message
_KEEP = 1 << 16  # bytes of a relay below's stderr kept for its error message
_LINE = 1 << 20  # the longest line read from a relay below (the launcher reads no longer)
WARNINGS = 8  # lines of a relay below for steps it was not sent that are reported, at most
#: ssh's own failures (exit 255), by what it printed: (reason, phase)
_SSH_FAILURES = (
    ("Host key verification failed", "host_key", "hostkey"),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "host_key", "hostkey"),
    ("Permission denied", "auth", "auth"),
    ("Too many authentication failures", "auth", "auth"),
    ("Connection refused", "unreachable", "connect"),
    ("timed out", "unreachable", "connect"),
    ("No route to host", "unreachable", "connect"),
    ("Network is unreachable", "unreachable", "connect"),
    ("Could not resolve hostname", "unreachable", "connect"),
    ("Connection closed by", "unreachable", "connect"),
    ("Connection reset by", "unreachable", "connect"),
)
#: what an sshd's MaxStartups drop (it closes right after accept) makes ssh print
_DROPS = (
    "kex_exchange_identification",
    "ssh_exchange_identification",
    "Connection closed by",
    "Connection reset by",
)
#: ssh's debug line once the server's post-authentication process confirmed the session
#: channel: sshd stopped counting the connection toward MaxStartups before that process ran
_SESSION = b"debug1: Sending command: "
_AUTHENTICATED = b"Authenticated to "
#: ssh's log lines (LogLevel DEBUG1) that are no failure: left out of error messages
_LOG = (b"debug", b"Authenticated to ", b"Transferred: ", b"Bytes per second: ")


def _framed(data: bytes) -> bytes:
    return b"%d\n" % len(data) + data


def _report(stdout: bytes) -> dict[str, Any] | None:
    """The agent front's JSON report: its last line that is a JSON object."""
    for line in reversed(stdout.splitlines()):
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: a value nested deep
            continue
        if isinstance(data, dict):
            return data
    return None


def _tail(stderr: bytes) -> str:
    lines = [x.strip() for x in stderr.decode("utf-8", "replace").splitlines() if x.strip()]
    return "; ".join(lines[-_TAIL:]) or "no output"


def classify(status: int, stderr: bytes) -> tuple[str, str]:
    """(reason, phase) of an ssh that ended without the agent's report."""
    if status == 255:
        text = stderr.decode("utf-8", "replace")
        for needle, reason, phase in _SSH_FAILURES:
            if needle in text:
                return reason, phase
    return "exec", "start"


def dropped(status: int, stderr: bytes) -> bool:
    """Whether an ssh that never authenticated ended because its sshd closed the connection
    during the banner or key exchange: what MaxStartups' early drop looks like."""
    if classify(status, stderr) != ("unreachable", "connect"):
        return False
    text = stderr.decode("utf-8", "replace")
    return any(needle in text for needle in _DROPS)


def _announced(out: bytes, marker: bytes) -> bool:
    return b"\n" + marker + b"\n" in b"\n" + out


class _Late(Exception):
    """An ssh did not get as far as it had to in time (it was killed); ``sent``: after its
    stdin data went out."""

    def __init__(self, sent: bool = False) -> None:
        super().__init__(sent)
        self.sent = sent


class _Refused(Exception):
    """No handshake slot for the child's sshd within the connect deadline."""


class Gate:
    """At most ``limit`` of this relay's ssh clients in the handshake with one sshd at once
    (rexplan.transport.pacing.HandshakeGate for OpenSSH clients); safe across threads."""

    def __init__(self, limit: int) -> None:
        self.cond = threading.Condition()
        self.limit = max(1, limit)
        self.in_flight = 0

    def acquire(self, until: float) -> bool:
        """Wait for a slot until ``until`` (monotonic time); False if none came."""
        with self.cond:
            while self.in_flight >= self.limit:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            self.in_flight += 1
            return True

    def dropped(self) -> None:
        """The sshd dropped a handshake this gate admitted (call before its release): admit no
        more than the others still in flight, at least one, from now on."""
        with self.cond:
            self.limit = max(1, min(self.limit, self.in_flight - 1))

    def release(self) -> None:
        with self.cond:
            self.in_flight -= 1
            self.cond.notify()


class Client:
    """One ssh process: its stdout and stderr (where ssh logs at DEBUG1) as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.command = argv[-1].encode()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out_fd = self.proc.stdout.fileno()
        self.err_fd = self.proc.stderr.fileno()
        self.got = {self.out_fd: b"", self.err_fd: b""}
        self.open = {self.out_fd, self.err_fd}
        self.status: int | None = None
        self.tries = 1
        self.sent = False

    @property
    def out(self) -> bytes:
        return self.got[self.out_fd]

    @property
    def err(self) -> bytes:
        return self.got[self.err_fd]

    def session(self) -> bool:
        """Whether the remote command runs (which the post-authentication process started)."""
        return bool(self.out) or _SESSION in self.err

    def dropped(self) -> bool:
        """Whether ssh ended before authenticating because the sshd dropped the connection."""
        if self.status is None or self.out or _AUTHENTICATED in self.err:
            return False
        return dropped(self.status, self.said())

    def said(self) -> bytes:
        """stderr without ssh's debug log: the remote's stderr and ssh's own messages. ssh
        logs the command it sends, newlines and all, truncated at 900 bytes."""
        err = self.err.replace(_SESSION + self.command[:900], _SESSION)
        return b"\n".join(x for x in err.splitlines() if x.strip() and not x.startswith(_LOG))

    def pump(self, done: Callable[[], bool], until: float) -> bool:
        """Read output until ``done()`` (True) or stdout ended (False); past ``until`` kill
        ssh and raise _Late."""
        while not done():
            if self.out_fd not in self.open:
                return False
            self._read(self.open, until)
        return True

    def finish(self, data: bytes, until: float) -> int:
        """Write ``data`` to ssh's stdin and close it, read the rest of its output, and return
        its exit status; past ``until`` kill it and raise _Late."""
        stdin = self.proc.stdin
        assert stdin is not None
        view = memoryview(data)
        os.set_blocking(stdin.fileno(), False)
        while view:
            if self._read(self.open, until, stdin.fileno()):
                try:
                    view = view[os.write(stdin.fileno(), view[:65536]) :]
                except BlockingIOError:
                    continue
                except OSError:
                    break  # ssh is gone: the rest cannot be delivered
        try:
            stdin.close()
        except OSError:
            pass
        while self.open:
            self._read(self.open, until)
        try:
            self.status = self.proc.wait(max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise _Late from None
        self._close()
        return self.status

    def drain(self) -> None:
        """Read stderr until it ends, keeping its last _KEEP bytes (a relay below's ssh)."""
        for chunk in iter(lambda: os.read(self.err_fd, 65536), b""):
            self.got[self.err_fd] = (self.err + chunk)[-_KEEP:]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close()

    def _read(self, fds: set[int], until: float, write: int | None = None) -> bool:
        """Wait for output on ``fds`` (or room to ``write``) and read what came; whether
        ``write`` may be written to. Past ``until`` kill ssh and raise _Late."""
        left = until - time.monotonic()
        if left <= 0:
            self.kill()
            raise _Late
        readable, writable, _ = select.select(list(fds), [] if write is None else [write], [], left)
        for fd in readable:
            data = os.read(fd, 65536)
            if data:
                # the tail only (the report is the last line, the marker is looked for after
                # each read): a child flooding its output costs this relay a MiB a stream
                self.got[fd] = (self.got[fd] + data)[-_LINE:]
            else:
                self.open.discard(fd)
        return bool(writable)

    def _close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


def _error(step: str, error: str, reason: str, phase: str, launched: bool = True) -> dict[str, Any]:
    return {"step": step, "error": error, "reason": reason, "phase": phase, "launched": launched}
