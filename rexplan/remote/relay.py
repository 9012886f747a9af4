"""The relay of tree fan-out: on a relay host, launch its subtree's steps over OpenSSH.

Stdlib only, Python >= 3.8. The launcher (rexplan.tree) runs it as ``python3 -I -S -c
BOOTSTRAP <sha256> <name>`` over its SSH connection to the relay host and writes to stdin:
``<length>\\n<this source>`` (checked by BOOTSTRAP), one JSON header line (this relay's name,
the ``identity`` file it logs in with, the agent's sha256, file name, missing-agent exit code
and launch ``marker``, and its ``children``: name, address, port, python, the known_hosts
lines pinning each, and for a child that is a relay itself its ``relay`` login and children),
``<length>\\n<agent bundle>``, then step lines as the launcher has them: ``{"step", "host",
"login", "argv", "line", "timeout", "connect"[, "start"]}``. stdin stays open; EOF means no
more steps.

A step on a direct child runs as ``ssh ... LOGIN@ADDR -- ARGV`` (OpenSSH: batch mode, strict
host keys pinned in a temporary known_hosts file, this identity only) with the launch line on
stdin, which a step with a ``start`` gets only once the command printed the marker line, within
``connect`` + ``start`` seconds of the ssh's start; a step further down goes to the relay this
relay starts on that child (the same way, with this source). Launch lines hold no key: every
agent proves itself to the root launcher directly. Upward, one JSON line per event: ``{"up":
name}`` once; per step ``{"step", "launched": true}``, then ``{"step", "report": <the agent
front's report>}`` or ``{"step", "error", "reason", "phase", "launched"}``, reason
``unreachable``, ``host_key``, ``auth``, ``agent_upload``, ``agent_start_timeout`` (no marker
in time: the launch line was never sent), ``timeout``, ``exec`` (ssh ended without a report)
or ``relay_lost`` (the relay below died). Lines from relays below are passed up as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
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
_TAIL = 4  # lines of a dead process's stderr kept for the error message
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


def _framed(data: bytes) -> bytes:
    return b"%d\n" % len(data) + data


def _report(stdout: bytes) -> dict[str, Any] | None:
    """The agent front's JSON report: its last line that is a JSON object."""
    for line in reversed(stdout.splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
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


def _subtree(child: dict[str, Any]) -> list[str]:
    """Every host at or below ``child``."""
    out = [child["name"]]
    for below in (child.get("relay") or {}).get("children", ()):
        out.extend(_subtree(below))
    return out


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
        }
        out = ["ssh", "-T"]
        for key, value in options.items():
            out += ["-o", f"{key}={value}"]
        identity = str(self.header["identity"])
        out += ["-i", identity, "-p", str(child["port"]), "-l", login, child["address"], "--"]
        return [*out, shlex.join(argv)]

    def dispatch(self, msg: dict[str, Any]) -> None:
        """Launch one step on its child, or pass it to the relay below that leads to it."""
        via = self.route.get(str(msg.get("host")))
        if via is None:
            error = f"{msg.get('host')} is not below relay {self.name}"
            self.emit({"step": msg.get("step"), "error": error, "reason": "exec", "phase": "relay"})
            return
        if via != msg["host"]:
            below = self.below.get(via)
            if below is None:
                below = self.below[via] = Below(self, self.children[via])
            below.send(msg)
            return
        thread = threading.Thread(target=self._leaf, args=(self.children[via], msg))
        thread.start()
        self.threads.append(thread)

    def _leaf(self, child: dict[str, Any], msg: dict[str, Any]) -> None:
        step, login, argv = msg["step"], msg["login"], list(msg["argv"])
        timeout, connect = float(msg["timeout"]), float(msg["connect"])
        launch = str(msg["line"]).encode()
        gate = None
        if msg.get("start") is not None:
            gate = (str(self.header["agent"]["marker"]).encode(), connect + float(msg["start"]))
        try:
            self.emit({"step": step, "launched": True})
            status, out, err = _run(self.ssh(child, login, argv, connect), launch, timeout, gate)
            report = _report(out)
            agent = self.header["agent"]
            if report is not None and status == agent["missing"] == report.get("exit"):
                install = [argv[0], "-I", "-S", "-c", INSTALL, agent["sha"], agent["name"]]
                ssh = self.ssh(child, login, install, connect)
                status, _, err = _run(ssh, _framed(self.bundle), timeout)
                if status != 0:
                    error = f"{child['name']}: cannot install the agent: {_tail(err)}"
                    self.emit(_error(step, error, "agent_upload", "start"))
                    return
                ssh = self.ssh(child, login, argv, connect)
                status, out, err = _run(ssh, launch, timeout, gate)
                report = _report(out)
        except _NotStarted as exc:
            error = f"{child['name']}: the agent did not start within {exc.within:g}s"
            self.emit(_error(step, error, "agent_start_timeout", "start", launched=False))
            return
        except subprocess.TimeoutExpired:
            error = f"{child['name']}: no report within {timeout:g}s"
            self.emit(_error(step, error, "timeout", "start"))
            return
        except (OSError, ValueError) as exc:
            # ssh could not even be run here: nothing reached the child
            self.emit(_error(step, f"relay {self.name}: {exc}", "exec", "start", launched=False))
            return
        if report is not None:
            self.emit({"step": step, "report": report})
            return
        reason, phase = classify(status, err)
        name, tail = child["name"], _tail(err)
        error = f"{name}: ssh from relay {self.name} exited {status}: {tail}"
        self.emit(_error(step, error, reason, phase))

    def finish(self) -> None:
        """No more steps: let every launch end, then the relays below."""
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


class _NotStarted(Exception):
    """The command did not print the launch marker within ``within`` seconds."""

    def __init__(self, within: float) -> None:
        super().__init__(within)
        self.within = within


def _announce(
    proc: subprocess.Popen[bytes], marker: bytes, within: float
) -> tuple[bool, list[bytes]]:
    """Read ``proc``'s output until ``marker`` is a line of its stdout (True) or that ends
    (False), within ``within`` seconds (else _NotStarted); and [stdout, stderr] so far."""
    assert proc.stdout is not None and proc.stderr is not None
    end = time.monotonic() + within
    fds = {proc.stdout.fileno(): 0, proc.stderr.fileno(): 1}
    got = [b"", b""]
    while b"\n" + marker + b"\n" not in b"\n" + got[0]:
        if proc.stdout.fileno() not in fds:
            return False, got
        left = end - time.monotonic()
        if left <= 0:
            raise _NotStarted(within)
        for fd in select.select(list(fds), [], [], left)[0]:
            data = os.read(fd, 65536)
            if data:
                got[fds[fd]] += data
            else:
                del fds[fd]
    return True, got


def _run(
    argv: list[str], stdin: bytes, timeout: float, gate: tuple[bytes, float] | None = None
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` with ``stdin``; kill it past ``timeout`` (TimeoutExpired). ``gate`` =
    (marker, seconds): ``stdin`` is written only once ``marker`` is a line of the output, and
    not at all if the output ends first; _NotStarted (and killed) past those seconds."""
    end = time.monotonic() + timeout
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    got = [b"", b""]
    try:
        if gate is not None:
            announced, got = _announce(proc, *gate)
            stdin = stdin if announced else b""
        out, err = proc.communicate(stdin, timeout=max(0.0, end - time.monotonic()))
    except (subprocess.TimeoutExpired, _NotStarted):
        # killing ssh closes the session: a remote still in its login gets EOF, not the line
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, got[0] + out, got[1] + err


class Below:
    """The relay this relay started on one of its children, fed step lines as they come."""

    def __init__(self, relay: Relay, child: dict[str, Any]) -> None:
        self.relay = relay
        self.child = child
        self.lock = threading.Lock()
        self.pending: dict[str, bool] = {}  # step id -> launched
        self.lost: str | None = None
        self.up = False
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        header = dict(relay.header, name=child["name"], children=child["relay"]["children"])
        sha = hashlib.sha256(relay.source).hexdigest()
        argv = [child["python"], "-I", "-S", "-c", BOOTSTRAP, sha, child["name"]]
        ssh = relay.ssh(child, child["relay"]["login"], argv, float(relay.header["connect"]))
        self.proc = subprocess.Popen(
            ssh, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        first = (json.dumps(header) + "\n").encode()
        self.lines.put(_framed(relay.source) + first + _framed(relay.bundle))
        self.err = b""
        self.threads = [
            threading.Thread(target=self._write),
            threading.Thread(target=self._read),
            threading.Thread(target=self._drain),
        ]
        for thread in self.threads:
            thread.start()

    def send(self, msg: dict[str, Any]) -> None:
        with self.lock:
            lost = self.lost
            if lost is None:
                self.pending[msg["step"]] = False
        if lost is not None:
            self.relay.emit(_error(msg["step"], lost, "relay_lost", "relay", launched=False))
            return
        self.lines.put((json.dumps(msg) + "\n").encode())

    def _write(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while True:
                data = self.lines.get()
                if data is None:
                    break
                stdin.write(data)
                stdin.flush()
        except OSError:
            pass  # it died; _read reports that
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def _drain(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        for chunk in iter(lambda: stderr.read(4096), b""):
            self.err = (self.err + chunk)[-4096:]

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if "up" in msg:
                self.up = True
                continue
            step = msg.get("step")
            with self.lock:
                if step in self.pending:
                    if msg.get("launched") and len(msg) == 2:
                        self.pending[step] = True
                    else:
                        del self.pending[step]
            self.relay.emit_line(line if line.endswith(b"\n") else line + b"\n")
        status = self.proc.wait()
        self.threads[2].join()
        what = "lost" if self.up else "did not start"
        name, tail = self.child["name"], _tail(self.err)
        detail = f"relay {name} {what} (exit {status}: {tail})"
        with self.lock:
            self.lost = detail
            pending, self.pending = self.pending, {}
        for step, launched in pending.items():
            self.relay.emit(_error(step, detail, "relay_lost", "relay", launched))

    def close(self) -> None:
        self.lines.put(None)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def main(source: bytes) -> int:
    """Read the header and the agent, then launch step lines until EOF; 16 on bad input."""
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
