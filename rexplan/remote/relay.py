"""The relay of tree fan-out: on a relay host, launch its subtree's steps over OpenSSH.

Stdlib only, Python >= 3.8. The launcher (rexplan.tree) runs it as ``python3 -I -S -c
BOOTSTRAP <sha256> <name>`` over its SSH connection to the relay host and writes to stdin:
``<length>\\n<this source>`` (checked by BOOTSTRAP), one JSON header line (this relay's name,
the ``identity`` file it logs in with, the agent's sha256, file name, missing-agent exit code
and launch ``marker``, and its ``children``: name, address, port, python, ``max_startups``,
the known_hosts lines pinning each, and for a child that is a relay itself its ``relay`` login
and children), ``<length>\\n<agent bundle>``, then one JSON line per request as the launcher
has it: a step ``{"step", "host", "login", "argv", "line", "timeout", "connect"[, "start"]}``
or a kill ``{"kill": step, "host", "login", "argv", "line", "timeout", "connect"}``. stdin
stays open; EOF means no more requests.

A step on a direct child runs as ``ssh ... LOGIN@ADDR -- ARGV`` (OpenSSH: batch mode, strict
host keys pinned in a temporary known_hosts file, this identity only) with the launch line on
stdin, which a step with a ``start`` gets only once the command printed the marker line, within
``connect`` + ``start`` seconds; a step further down goes to the relay this relay starts on
that child (the same way, with this source). A kill runs its ``argv`` (the agent's
``--kill``) on the step's host the same way, with its ``line`` (the run and step) on stdin.
Launch lines hold no key: every agent proves itself to the root launcher directly.

Connection storms: at most a child's ``max_startups`` of this relay's ssh clients are in the
handshake with its sshd at once (children sharing an sshd share the smallest), counted until
the sshd's post-authentication process confirmed the session; an ssh the sshd dropped before
authenticating (MaxStartups' early drop) is run again after a full-jitter pause, at most
ATTEMPTS times within ``connect`` seconds. Nothing is retried once authenticated, so never
after a launch line went out.

Upward, one JSON line per event: ``{"up": name}`` once; per step ``{"step", "launched": true}``
once its launch line is sent, then ``{"step", "report": <the agent front's report>}`` or
``{"step", "error", "reason", "phase", "launched"}``, reason ``unreachable``, ``host_key``,
``auth``, ``agent_upload``, ``agent_start_timeout`` (no marker in time: the launch line was
never sent), ``timeout``, ``exec`` (ssh ended without a report) or ``relay_lost`` (the relay
below died); per kill ``{"killed": step, "ok": true}`` or ``{"killed": step, "ok": false,
"error"}``. Lines from relays below are passed up as they are, but only those for the steps
and kills this relay sent there and still awaits: a line for any other step is dropped and
reported upward as ``{"warn": text}`` (WARNINGS of them per relay below, then one saying that
more came).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import random
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

# every relay run pays for its imports: typing never
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import IO, Any

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


def _subtree(child: dict[str, Any]) -> list[str]:
    """Every host at or below ``child``."""
    out = [child["name"]]
    for below in (child.get("relay") or {}).get("children", ()):
        out.extend(_subtree(below))
    return out


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
    (rexplan.transport.HandshakeGate for OpenSSH clients); safe across threads."""

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


class Relay:
    """This relay: its children, the known_hosts file pinning them, and the relays below it."""

    def __init__(self, header: dict[str, Any], source: bytes, bundle: bytes, out: IO[bytes]):
        self.header = header
        self.name = str(header["name"])
        self.source = source
        self.bundle = bundle
        self.out = out
        self._out_lock = threading.Lock()
        self.children = {c["name"]: c for c in header["children"]}
        self.route = {host: c["name"] for c in header["children"] for host in _subtree(c)}
        self.gates: dict[tuple[str, int], Gate] = {}
        for c in header["children"]:
            limit = int(c.get("max_startups") or MAX_STARTUPS)
            gate = self.gates.setdefault((str(c["address"]), int(c["port"])), Gate(limit))
            gate.limit = min(gate.limit, max(1, limit))
        self.below: dict[str, Below] = {}
        self.threads: list[threading.Thread] = []
        home = os.environ.get("REX_HOME") or os.path.join(os.path.expanduser("~"), ".rex")
        os.makedirs(home, 0o700, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".relay-", dir=home)
        self.known_hosts = os.path.join(self.tmp, "known_hosts")
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(line + "\n" for c in header["children"] for line in c["known_hosts"])

    def emit(self, msg: dict[str, Any]) -> None:
        self.emit_line((json.dumps(msg) + "\n").encode())

    def emit_line(self, line: bytes) -> None:
        # a launcher that went away cannot be told; the children still run to their outcome
        with self._out_lock:
            try:
                self.out.write(line)
                self.out.flush()
            except (OSError, ValueError):
                pass

    def ssh(self, child: dict[str, Any], login: str, argv: list[str], connect: float) -> list[str]:
        """OpenSSH argv running ``argv`` on ``child`` as ``login``; the command line is quoted
        here, the only string built from data."""
        options = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": self.known_hosts,
            "GlobalKnownHostsFile": "/dev/null",
            "IdentitiesOnly": "yes",
            # no master left behind by a user's ssh_config, no forwarding
            "ControlMaster": "no",
            "ControlPath": "none",
            "ForwardAgent": "no",
            "ClearAllForwardings": "yes",
            "ConnectTimeout": str(max(1, math.ceil(connect))),
            # its log says when it authenticated and when the session runs (Client.session)
            "LogLevel": "DEBUG1",
        }
        out = ["ssh", "-T"]
        for key, value in options.items():
            out += ["-o", f"{key}={value}"]
        identity = str(self.header["identity"])
        out += ["-i", identity, "-p", str(child["port"]), "-l", login, child["address"], "--"]
        return [*out, shlex.join(argv)]

    def connect(
        self, child: dict[str, Any], ssh: list[str], connect: float, up_by: float
    ) -> Client:
        """Run ``ssh`` inside a handshake slot of ``child``'s sshd (taken within ``connect``
        seconds, else _Refused) until its session runs or it ended (its status set), by
        ``up_by`` (else _Late); run again after a full-jitter pause while the sshd dropped it
        before it authenticated, at most ATTEMPTS times and only while the pause ends within
        ``connect`` seconds."""
        address, port = str(child["address"]), int(child["port"])
        gate = self.gates[(address, port)]
        until = time.monotonic() + connect
        tries = 0
        while True:
            tries += 1
            if not gate.acquire(until):
                raise _Refused(
                    f"no handshake slot for {address}:{port} within {connect:g}s: "
                    f"{gate.in_flight} earlier handshakes from relay {self.name} to it are "
                    f"still in flight (max_startups {gate.limit})"
                )
            try:
                client = Client(ssh)
                if not client.pump(client.session, up_by):
                    client.finish(b"", up_by)
                    if client.dropped():
                        gate.dropped()
            finally:
                gate.release()
            client.tries = tries
            if not client.dropped():
                return client
            pause = random.uniform(0.0, min(BACKOFF_CAP, BACKOFF * 2 ** (tries - 1)))
            if tries >= ATTEMPTS or time.monotonic() + pause >= until:
                return client
            time.sleep(pause)

    def run(
        self,
        child: dict[str, Any],
        msg: dict[str, Any],
        argv: list[str],
        data: bytes,
        marker: bytes | None = None,
        launch: str | None = None,
    ) -> Client:
        """Run ``argv`` on ``child`` as ``msg``'s login within its connect and ``timeout``
        seconds, ``data`` on stdin once the session runs and, with ``marker``, only once the
        command printed that line, within ``connect`` + ``start`` s (else _Late); its Client
        with ``sent`` whether ``data`` went out, which is announced upward as step
        ``launch``'s launch."""
        connect, timeout = float(msg["connect"]), float(msg["timeout"])
        now = time.monotonic()
        end = now + timeout
        up_by = end if marker is None else now + connect + float(msg["start"])
        ssh = self.ssh(child, str(msg["login"]), argv, connect)
        client = self.connect(child, ssh, connect, up_by)
        if client.status is not None:
            return client
        try:
            feed = True
            if marker is not None:
                line = marker
                feed = client.pump(lambda: _announced(client.out, line), up_by)
            if feed and launch is not None:
                self.emit({"step": launch, "launched": True})
            client.sent = feed
            client.finish(data if feed else b"", end)
        except _Late:
            raise _Late(client.sent) from None
        return client

    def dispatch(self, msg: dict[str, Any]) -> None:
        """Launch one step (or kill one) on its child, or pass it to the relay below that
        leads to it."""
        kill = msg.get("kill")
        via = self.route.get(str(msg.get("host")))
        if via is None:
            error = f"{msg.get('host')} is not below relay {self.name}"
            if kill is not None:
                self.emit({"killed": kill, "ok": False, "error": error})
            else:
                self.emit(_error(msg["step"], error, "exec", "relay", launched=False))
            return
        if via != msg["host"]:
            below = self.below.get(via)
            if below is None:
                below = self.below[via] = Below(self, self.children[via])
            below.send(msg)
            return
        target = self._leaf if kill is None else self._kill
        thread = threading.Thread(target=target, args=(self.children[via], msg))
        thread.start()
        self.threads.append(thread)

    def _leaf(self, child: dict[str, Any], msg: dict[str, Any]) -> None:
        step, argv, name = msg["step"], list(msg["argv"]), child["name"]
        marker = None
        if msg.get("start") is not None:
            marker = str(self.header["agent"]["marker"]).encode()
        line = str(msg["line"]).encode()
        agent = self.header["agent"]
        try:
            done = self.run(child, msg, argv, line, marker, step)
            report = _report(done.out)
            if report is not None and done.status == agent["missing"] == report.get("exit"):
                # the host's interpreter: a launch's argv may start with the shell check
                python = str(child["python"])
                install = [python, "-I", "-S", "-c", INSTALL, agent["sha"], agent["name"]]
                got = self.run(child, msg, install, _framed(self.bundle))
                if got.status != 0:
                    error = f"{name}: cannot install the agent: {_tail(got.said())}"
                    self.emit(_error(step, error, "agent_upload", "start", launched=False))
                    return
                done = self.run(child, msg, argv, line, marker, step)
                report = _report(done.out)
        except _Refused as exc:
            self.emit(_error(step, f"{name}: {exc}", "unreachable", "connect", launched=False))
            return
        except _Late as late:
            if marker is not None and not late.sent:
                within = float(msg["connect"]) + float(msg["start"])
                error = f"{name}: the agent did not start within {within:g}s"
                self.emit(_error(step, error, "agent_start_timeout", "start", launched=False))
            else:
                error = f"{name}: no report within {float(msg['timeout']):g}s"
                self.emit(_error(step, error, "timeout", "start", launched=late.sent))
            return
        except (OSError, ValueError) as exc:
            # ssh could not even be run here: nothing reached the child
            self.emit(_error(step, f"relay {self.name}: {exc}", "exec", "start", launched=False))
            return
        if report is not None:
            self.emit({"step": step, "report": report})
            return
        reason, phase = classify(done.status or 0, done.said())
        self.emit(_error(step, self._failure(name, done), reason, phase, launched=done.sent))

    def _failure(self, name: str, client: Client) -> str:
        error = f"{name}: ssh from relay {self.name} exited {client.status}: {_tail(client.said())}"
        if client.tries > 1 and client.dropped():
            error += (
                f" ({client.tries} attempts, each dropped before authentication: set "
                f"hosts.{name}.max_startups to its sshd's MaxStartups start value, or raise that)"
            )
        return error

    def _kill(self, child: dict[str, Any], msg: dict[str, Any]) -> None:
        """Run a kill (the agent's ``--kill``, its request line on stdin) on ``child`` and
        report its outcome."""
        step, name = msg["kill"], child["name"]
        try:
            done = self.run(child, msg, list(msg["argv"]), str(msg.get("line", "")).encode())
        except _Refused as exc:
            self.emit({"killed": step, "ok": False, "error": f"{name}: {exc}"})
            return
        except _Late:
            error = f"{name}: the kill did not end within {float(msg['timeout']):g}s"
            self.emit({"killed": step, "ok": False, "error": error})
            return
        except (OSError, ValueError) as exc:
            self.emit({"killed": step, "ok": False, "error": f"relay {self.name}: {exc}"})
            return
        report = _report(done.out)
        if report is not None and report.get("ok") is True:
            self.emit({"killed": step, "ok": True})
        else:
            self.emit({"killed": step, "ok": False, "error": self._failure(name, done)})

    def finish(self) -> None:
        """No more requests: let every launch and kill end, then the relays below."""
        for below in self.below.values():
            below.close()
        for thread in self.threads:
            thread.join()
        for below in self.below.values():
            below.join()

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _error(step: str, error: str, reason: str, phase: str, launched: bool = True) -> dict[str, Any]:
    return {"step": step, "error": error, "reason": reason, "phase": phase, "launched": launched}


def _lines(first: bytes, stream: IO[bytes]) -> Iterator[bytes]:
    """``first`` (output read already) and then ``stream``, line by line; a line longer than
    _LINE comes in pieces (no JSON, so dropped): a relay below cannot make this one buffer
    without bound."""
    if first:
        lines = first.splitlines(keepends=True)
        if not lines[-1].endswith(b"\n"):
            lines[-1] += stream.readline(_LINE)
        yield from lines
    yield from iter(lambda: stream.readline(_LINE), b"")


class Below:
    """The relay this relay started on one of its children, fed requests as they come."""

    def __init__(self, relay: Relay, child: dict[str, Any]) -> None:
        self.relay = relay
        self.child = child
        self.lock = threading.Lock()
        self.pending: dict[str, bool] = {}  # step id -> launched
        self.kills: list[str] = []  # step ids of kills it owes an answer
        self.asked: set[str] = set()  # step ids of every step and kill sent to it
        self.strays = 0  # its lines for steps it was never sent
        self.lost: str | None = None
        self.up = False
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.threads = [threading.Thread(target=self._run)]
        self.threads[0].start()

    def send(self, msg: dict[str, Any]) -> None:
        kill = msg.get("kill")
        with self.lock:
            lost = self.lost
            if lost is None and kill is not None:
                self.kills.append(kill)
                self.asked.add(kill)
            elif lost is None:
                self.pending[msg["step"]] = False
                self.asked.add(msg["step"])
        if lost is not None:
            if kill is not None:
                self.relay.emit({"killed": kill, "ok": False, "error": lost})
            else:
                self.relay.emit(_error(msg["step"], lost, "relay_lost", "relay", launched=False))
            return
        self.lines.put((json.dumps(msg) + "\n").encode())

    def _run(self) -> None:
        relay, child, name = self.relay, self.child, self.child["name"]
        header = dict(relay.header, name=name, children=child["relay"]["children"])
        sha = hashlib.sha256(relay.source).hexdigest()
        argv = [child["python"], "-I", "-S", "-c", BOOTSTRAP, sha, name]
        connect = float(relay.header["connect"])
        ssh = relay.ssh(child, child["relay"]["login"], argv, connect)
        try:
            client = relay.connect(child, ssh, connect, time.monotonic() + connect)
        except _Refused as exc:
            self._lose(f"relay {name} did not start: {exc}")
            return
        except _Late:
            self._lose(f"relay {name} did not start within {connect:g}s")
            return
        except OSError as exc:
            self._lose(f"relay {name} did not start: relay {relay.name}: {exc}")
            return
        status = client.status
        if status is None:
            first = _framed(relay.source) + (json.dumps(header) + "\n").encode()
            writer = threading.Thread(
                target=self._write, args=(client, first + _framed(relay.bundle))
            )
            drain = threading.Thread(target=client.drain)
            self.threads += [writer, drain]
            writer.start()
            drain.start()
            assert client.proc.stdout is not None
            self._read(_lines(client.out, client.proc.stdout))
            status = client.proc.wait()
            drain.join()
        what = "lost" if self.up else "did not start"
        self._lose(f"relay {name} {what} (exit {status}: {_tail(client.said())})")

    def _write(self, client: Client, first: bytes) -> None:
        stdin = client.proc.stdin
        assert stdin is not None
        data: bytes | None = first
        try:
            while data is not None:
                stdin.write(data)
                stdin.flush()
                data = self.lines.get()
        except OSError:
            pass  # it died; _run reports that
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def _read(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: a value nested deep
                continue
            if not isinstance(msg, dict):
                continue
            if "up" in msg:
                self.up = True
                continue
            if "warn" in msg:  # from further down: passed up, bounded there
                self.relay.emit_line(line if line.endswith(b"\n") else line + b"\n")
                continue
            step, killed = msg.get("step"), msg.get("killed")
            with self.lock:
                if killed is not None and killed in self.kills:
                    self.kills.remove(killed)
                elif killed is None and step in self.pending:
                    if msg.get("launched") and len(msg) == 2:
                        self.pending[step] = True
                    else:
                        del self.pending[step]
                else:
                    # not owed: late (sent, answered already) or a step it was never sent,
                    # which a relay speaking for steps outside its subtree would claim
                    stray = killed if killed is not None else step
                    if stray not in self.asked:
                        self._stray(stray)
                    continue
            self.relay.emit_line(line if line.endswith(b"\n") else line + b"\n")

    def _stray(self, step: Any) -> None:
        """Report a line of the relay below for a step it was not sent (under the lock)."""
        self.strays += 1
        name = self.child["name"]
        if self.strays <= WARNINGS:
            what = "".join(c if " " <= c <= "~" else "?" for c in str(step)[:100])
            text = f"relay {name} sent a line for {what!r}, a step outside its subtree: dropped"
            self.relay.emit({"warn": text})
        elif self.strays == WARNINGS + 1:
            self.relay.emit({"warn": f"relay {name} sent more lines for steps outside its subtree"})

    def _lose(self, detail: str) -> None:
        """It ended or never started: fail what it still owes."""
        with self.lock:
            self.lost = detail
            pending, self.pending = self.pending, {}
            kills, self.kills = self.kills, []
        for step, launched in pending.items():
            self.relay.emit(_error(step, detail, "relay_lost", "relay", launched))
        for kill in kills:
            self.relay.emit({"killed": kill, "ok": False, "error": detail})

    def close(self) -> None:
        self.lines.put(None)

    def join(self) -> None:
        self.threads[0].join()  # then the writer and drain it started, if any, are listed
        for thread in self.threads[1:]:
            thread.join()


def main(source: bytes) -> int:
    """Read the header and the agent, then serve request lines until EOF; 16 on bad input."""
    stdin = sys.stdin.buffer
    try:
        header = json.loads(stdin.readline())
        bundle = stdin.read(int(stdin.readline(16)))
    except ValueError as exc:
        sys.stderr.write(f"rex-relay: bad input: {exc}\n")
        return EXIT_BAD_INPUT
    if hashlib.sha256(bundle).hexdigest() != header["agent"]["sha"]:
        sys.stderr.write("rex-relay: agent damaged in transit\n")
        return EXIT_BAD_INPUT
    relay = Relay(header, source, bundle, sys.stdout.buffer)
    try:
        relay.emit({"up": relay.name})
        for line in stdin:
            if line.strip():
                relay.dispatch(json.loads(line))
        relay.finish()
    finally:
        relay.cleanup()
    return 0


if __name__ == "__rex_relay__":
    sys.exit(main(globals()["SOURCE"]))
