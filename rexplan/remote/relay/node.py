"""This relay: its input, routing and output.

stdin: ``<length>\\n<this relay's bundle>`` (checked by BOOTSTRAP), one JSON header line (this
relay's name, the ``identity`` file it logs in with, the agent's sha256, file name,
missing-agent exit code and launch ``marker``, and its ``children``: name, address, port,
python, ``max_startups``, the known_hosts lines pinning each, and for a child that is a relay
itself its ``relay`` login and children), ``<length>\\n<agent bundle>``, then one JSON line per
request: a step ``{"step", "host", "login", "argv", "line", "timeout", "connect"[, "start"]}``
or a kill ``{"kill": step, ...}``; EOF means no more requests. A step on a direct child runs as
``ssh ... LOGIN@ADDR -- ARGV`` with the launch line on stdin, which a step with a ``start``
gets only once the command printed the marker, within ``connect`` + ``start`` seconds; a step
further down goes to the relay this relay starts on that child (below.py).

stdout, one JSON line per event: ``{"up": name}`` once; per step ``{"step", "launched": true}``
once its launch line is sent, then ``{"step", "report"}`` or ``{"step", "error", "reason",
"phase", "launched"}``; per kill ``{"killed": step, "ok"[, "error"]}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time

from rexplan.remote.relay.below import Below
from rexplan.remote.relay.client import (
    ATTEMPTS,
    BACKOFF,
    BACKOFF_CAP,
    EXIT_BAD_INPUT,
    INSTALL,
    MAX_STARTUPS,
    Client,
    Gate,
    _announced,
    _error,
    _framed,
    _Late,
    _Refused,
    _report,
    _tail,
    classify,
)

# every relay run pays for its imports: typing never
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any


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
