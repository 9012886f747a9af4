"""Tree fan-out (``strategy: tree``): the launcher connects to k relays, which launch the rest.

LAM's scalable boot. The plan's SSH hosts, in plan order, are split k-ary (``split``): the
launcher's own children are the first k hosts, launched as in a flat run; each is also the
relay of an even share of the others, and a relay whose share exceeds k hands the surplus to
relays of its own, recursively. A relay is rexplan/remote/relay/ run over the launcher's
pooled SSH connection to the relay host, with stdin kept open: each step below it is sent as it
is launched (the executor's agent argv and launch line; no key, ever), and its outcome comes
back as one JSON line. Every agent still calls back to this launcher and is verified here: a
relay cannot make a step succeed, nor settle it unchanged (the agent proves that to the
listener with its key, protocol ``same``; a relay's "unchanged" is not taken). A line of a
relay for a step it was not sent (outside its subtree) is dropped and reported, as a relay
reports such lines of the relays below it (``warn``): ``warn`` gets them, WARNINGS per relay.
Relays log in to their children with OpenSSH, the manifest's ``relay_identity`` (a key file on
the relay hosts) and strict host keys pinned from the launcher's known_hosts, at most each
child's ``max_startups`` handshakes at once per sshd, retrying those the sshd dropped. A step
that failed after its launch line went out is killed through its relay (``kill``), as the flat
launcher kills one over its own connection.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence

from rexplan.core.model import Manifest, Step
from rexplan.core.settings import TREE_VIA_SSH, tree_problems, via_ssh_hosts
from rexplan.core.simulate import Subtree, split_tree
from rexplan.errors import TransportError, UsageError
from rexplan.transport.base import DEFAULT_KNOWN_HOSTS, kind
from rexplan.transport.pinning import host_key_name
from rexplan.transport.pool import TransportPool
from rexplan.transport.shipping import (
    EXIT_NO_AGENT,
    LAUNCH_MARKER,
    RELAY_BOOTSTRAP,
    agent_name,
    bundle,
    bundle_sha,
    launch_argv,
    relay_source,
)
from rexplan.transport.ssh import open_stream
from rexplan.transport.streams import Stream
from rexplan.trust import hostkeys
from rexplan.wire.launch import make_kill

#: the reason of a step whose relay died (or could not be started) before it reported
RELAY_LOST = "relay_lost"
#: seconds each relay hop may add to a step's launch, past its connect deadline
HOP_SLACK = 5.0
#: seconds close() waits for a relay to finish after its last step
CLOSE_GRACE = 10.0
#: the longest line read from a relay (a longer one is cut there, and is no JSON), and the
#: characters of a relay's non-JSON line kept for the message when it ends
_LINE = 1 << 20
_SAID = 200
#: warnings about one relay's stray lines reported, at most (then one saying more came)
WARNINGS = 8


def split(hosts: Sequence[str], k: int) -> list[Subtree]:
    """The launcher's children: the first min(k, N) hosts, each the root of a contiguous,
    as-even-as-possible share of the rest (recursively). Every host appears exactly once."""
    return list(split_tree(hosts, k))


def _printable(value: object, limit: int = 300) -> str:
    """A relay's text as it may be shown: ``limit`` printable ASCII characters at most."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(value)[:limit])


def _framed(data: bytes) -> bytes:
    return b"%d\n" % len(data) + data


class RelayError(TransportError):
    """A step below a relay has no report: ``reason`` is its failure reason (``relay_lost``,
    ``unreachable``, ``host_key``, ``auth``, ``agent_upload``, ``agent_start_timeout``,
    ``timeout``, ``exec``) and ``launched`` says whether a relay had started its agent, which
    may then still call back."""

    def __init__(self, message: str, *, host: str, reason: str, phase: str, launched: bool) -> None:
        super().__init__(message, host=host, phase=phase)
        self.reason = reason
        self.launched = launched


class _Waiter:
    """One step's outcome, filled in by its relay's reader thread."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.launched = False
        self.report: dict[str, object] | None = None
        self.error: tuple[str, str, str] | None = None  # message, reason, phase


class _Relay:
    """One of the launcher's own children as a relay: its stream and the steps it owes."""

    def __init__(self, tree: TreeLauncher, sub: Subtree) -> None:
        self.tree = tree
        self.host = sub.host
        self.sub = sub
        self.lock = threading.Lock()
        self.stream: Stream | None = None
        self.reader: threading.Thread | None = None
        self.lost: str | None = None
        self.up = False
        self.waiters: dict[str, _Waiter] = {}
        self.kills: dict[str, list[_Waiter]] = {}  # step id -> kills awaiting their answer
        self.asked: set[str] = set()  # every step id sent to it, as a step or a kill
        self.warned = 0

    def submit(self, step: Step, message: bytes) -> _Waiter:
        """Send ``step`` to this relay (started on first use); RelayError once it is lost."""
        waiter = _Waiter()
        with self.lock:
            if self.stream is None and self.lost is None:
                self._start()
            if self.lost is not None or self.stream is None:
                raise RelayError(
                    self.lost or f"relay {self.host} is not running",
                    host=step.host,
                    reason=RELAY_LOST,
                    phase="relay",
                    launched=False,
                )
            self.waiters[step.id] = waiter
        self._send(step.id, message)
        return waiter

    def forget(self, step_id: str) -> None:
        with self.lock:
            self.waiters.pop(step_id, None)

    def kill(self, step_id: str, message: bytes) -> _Waiter | None:
        """Send a kill for ``step_id``; None when this relay is not running (then nothing
        went through it)."""
        waiter = _Waiter()
        with self.lock:
            if self.lost is not None or self.stream is None:
                return None
            self.kills.setdefault(step_id, []).append(waiter)
        self._send(step_id, message)
        return waiter

    def _send(self, step_id: str, message: bytes) -> None:
        """Send a message about ``step_id`` (whose waiter is registered); a failed send loses
        the relay, which answers every waiter."""
        with self.lock:
            self.asked.add(step_id)
            stream = self.stream
        if stream is None:
            return  # lost meanwhile: _lose answered the waiter
        try:
            stream.send(message)
        except TransportError as exc:
            self._lose(f"relay {self.host} lost: {exc}")

    def forget_kill(self, step_id: str, waiter: _Waiter) -> None:
        with self.lock:
            waiting = self.kills.get(step_id, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self.kills.pop(step_id, None)

    def _start(self) -> None:
        tree, first = self.tree, self.tree.first[self.host]
        host = tree.manifest.host(self.host)
        argv = [host.python, "-I", "-S", "-c", RELAY_BOOTSTRAP, tree.relay_sha, self.host]
        try:
            transport = tree.pool.get(host, tree.manifest.user(first.user))
            stream = open_stream(transport, argv, timeout=first.timeouts.start)
        except TransportError as exc:
            self.lost = f"cannot start relay {self.host}: {exc}"
            return
        header = tree.header(self.host, self.sub.children)
        try:
            stream.send(_framed(relay_source()) + header + _framed(bundle()))
        except TransportError as exc:
            stream.close()
            self.lost = f"cannot start relay {self.host}: {exc}"
            return
        self.stream = stream
        self.reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.reader.start()

    def _read(self, stream: Stream) -> None:
        said: collections.deque[str] = collections.deque(maxlen=4)
        while True:
            line = stream.readline(_LINE)
            if not line:
                break
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: a value nested deep
                said.append(line[:_SAID].decode("utf-8", "replace").strip())
                continue
            if isinstance(msg, dict):
                self._on(msg)
        what = "lost" if self.up else "did not start"
        self._lose(f"relay {self.host} {what}" + (f": {'; '.join(said)}" if said else ""))

    def _on(self, msg: dict[str, object]) -> None:
        if "up" in msg:
            self.up = True
            return
        if "warn" in msg:  # from a relay below it: this one passes it on, unverifiable
            self._warn(f"via relay {self.host}: {_printable(msg['warn'])}")
            return
        if "killed" in msg:
            self._on_killed(str(msg["killed"]), msg)
            return
        with self.lock:
            waiter = self.waiters.get(str(msg.get("step")))
            stray = waiter is None and str(msg.get("step")) not in self.asked
        if stray:
            what = _printable(msg.get("step"), 100)
            self._warn(f"relay {self.host} sent a line for {what!r}, outside its subtree: dropped")
        with self.lock:
            waiter = self.waiters.get(str(msg.get("step")))
            if waiter is None:
                return
            report, error = msg.get("report"), msg.get("error")
            if isinstance(report, dict):
                waiter.report = report
            elif error is not None:
                reason, phase = msg.get("reason") or "exec", msg.get("phase") or "relay"
                waiter.error = (str(error), str(reason), str(phase))
                waiter.launched = msg.get("launched") is not False
            else:
                waiter.launched = waiter.launched or msg.get("launched") is True
                return
            del self.waiters[str(msg["step"])]
        waiter.done.set()

    def _warn(self, text: str) -> None:
        """Report what this relay (or one below it) did wrong, WARNINGS times at most."""
        with self.lock:
            self.warned += 1
            count = self.warned
        if count <= WARNINGS:
            self.tree.warn(self.host, text)
        elif count == WARNINGS + 1:
            self.tree.warn(self.host, f"relay {self.host}: more warnings, not shown")

    def _on_killed(self, step_id: str, msg: dict[str, object]) -> None:
        with self.lock:
            waiting = self.kills.get(step_id)
            if not waiting and step_id not in self.asked:
                stray = _printable(step_id, 100)
            else:
                stray = None
        if stray is not None:
            self._warn(f"relay {self.host} answered a kill of {stray!r}, outside its subtree")
            return
        with self.lock:
            waiting = self.kills.get(step_id)
            if not waiting:
                return
            waiter = waiting.pop(0)
            if not waiting:
                del self.kills[step_id]
        waiter.report = msg
        waiter.done.set()

    def _lose(self, why: str) -> None:
        with self.lock:
            if self.lost is None:
                self.lost = why
            waiters, self.waiters = self.waiters, {}
            kills, self.kills = self.kills, {}
        for waiter in waiters.values():
            waiter.error = (why, RELAY_LOST, "relay")
            waiter.done.set()
        for waiting in kills.values():
            for waiter in waiting:
                waiter.error = (why, RELAY_LOST, "relay")
                waiter.done.set()

    def close(self) -> None:
        """No more steps: the relay finishes what it launched and exits; then close."""
        with self.lock:
            stream, reader = self.stream, self.reader
        if stream is None or reader is None:
            return
        stream.close_input()
        reader.join(CLOSE_GRACE)
        stream.close()
        reader.join(CLOSE_GRACE)


class TreeLauncher:
    """Launches the steps of hosts below the launcher's k children through relays on them.

    ``relayed(host)`` says whether the executor must use ``launch`` for a host's steps instead
    of its own connection. Relays are started on the first step below them and fed steps of
    every wave as they come; ``close()`` ends them.
    """

    def __init__(
        self,
        manifest: Manifest,
        plan_steps: Sequence[Step],
        pool: TransportPool,
        known_hosts: str | None,
        fanout: int,
    ) -> None:
        problems = tree_problems(
            manifest.programs, manifest.relay_identity, manifest.hosts, manifest.users
        )
        if problems:
            keys, message, hint = problems[0]
            where = ".".join(str(k) for k in keys)
            raise UsageError(f"strategy tree: {where}: {message}", hint=hint)
        forwarded = via_ssh_hosts(manifest.hosts)
        if forwarded:
            message, hint = TREE_VIA_SSH
            raise UsageError(f"strategy tree: host {forwarded[0]}: {message}", hint=hint)
        self.manifest = manifest
        self.pool = pool
        self.first: dict[str, Step] = {}
        for step in plan_steps:
            if kind(step.transport).can_relay:
                self.first.setdefault(step.host, step)
        self.tree = split(list(self.first), fanout)
        self.relay_sha = hashlib.sha256(relay_source()).hexdigest()
        self._connect = max((s.timeouts.connect for s in plan_steps), default=10.0)
        path = os.path.expanduser(known_hosts or DEFAULT_KNOWN_HOSTS)
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                self._known_hosts = f.read()
        except FileNotFoundError:
            self._known_hosts = ""
        self._top: dict[str, str] = {}  # host below a relay -> the launcher's child above it
        self._depth: dict[str, int] = {}  # relay hops between the launcher and the host
        self._above: dict[str, tuple[str, ...]] = {}  # host -> the relays to it, top first
        #: (relay, text): what a relay did wrong; the executor emits it as a notice
        self.warn: Callable[[str, str], None] = lambda relay, text: None
        self._relays: dict[str, _Relay] = {}
        for sub in self.tree:
            if sub.children:
                self._relays[sub.host] = _Relay(self, sub)
            self._index(sub.host, sub.children, 1)

    def _index(
        self, top: str, children: Sequence[Subtree], depth: int, path: tuple[str, ...] = ()
    ) -> None:
        path = path or (top,)
        for child in children:
            self._top[child.host] = top
            self._depth[child.host] = depth
            self._above[child.host] = path
            self._index(top, child.children, depth + 1, (*path, child.host))

    def relays_of(self, host_name: str) -> tuple[str, ...]:
        """The relays a relayed host's steps pass, the launcher's child first."""
        return self._above[host_name]

    def relayed(self, host_name: str) -> bool:
        """Whether ``host_name``'s steps go through a relay (it is not the launcher's child)."""
        return host_name in self._top

    def header(self, name: str, children: Sequence[Subtree]) -> bytes:
        """The JSON header line of the relay on ``name``, whose children are ``children``."""
        head = {
            "name": name,
            "connect": self._connect,
            "identity": self.manifest.relay_identity,
            "agent": {
                "sha": bundle_sha(),
                "name": agent_name(),
                "missing": EXIT_NO_AGENT,
                "marker": LAUNCH_MARKER,
            },
            "children": [self._child(c) for c in children],
        }
        return (json.dumps(head) + "\n").encode()

    def _child(self, sub: Subtree) -> dict[str, object]:
        host = self.manifest.host(sub.host)
        pin = host_key_name(host.address, host.port)
        entry: dict[str, object] = {
            "name": host.name,
            "address": host.address,
            "port": host.port,
            "python": host.python,
            "max_startups": host.max_startups,
            "known_hosts": [
                f"{pin} {kind} {key}" for kind, key in hostkeys.pinned_keys(self._known_hosts, pin)
            ],
        }
        if sub.children:
            entry["relay"] = {
                "login": self.first[sub.host].login,
                "children": [self._child(c) for c in sub.children],
            }
        return entry

    def launch(
        self,
        step: Step,
        line: bytes,
        timeout: float,
        *,
        argv: Sequence[str],
        start: float | None = None,
    ) -> dict[str, object]:
        """Have ``step``'s relay run ``argv`` on its host with ``line`` on stdin (``timeout``:
        the exec deadline there; ``start``: ``line`` waits for the launch stub's marker, which
        must come within the connect and ``start`` deadlines) and return the agent front's
        report; RelayError if there is none."""
        top = self._relays[self._top[step.host]]
        message = {
            "step": step.id,
            "host": step.host,
            "login": step.login,
            "argv": list(argv),
            "line": line.decode("ascii"),
            "timeout": timeout,
            "connect": step.timeouts.connect,
        }
        if start is not None:
            message["start"] = start
        waiter = top.submit(step, (json.dumps(message) + "\n").encode())
        bound = timeout + self._depth[step.host] * (step.timeouts.connect + HOP_SLACK)
        if not waiter.done.wait(bound):
            top.forget(step.id)
            raise RelayError(
                f"no report from relay {top.host} within {bound:g}s",
                host=step.host,
                reason="timeout",
                phase="relay",
                launched=waiter.launched,
            )
        if waiter.error is not None:
            message_, reason, phase = waiter.error
            raise RelayError(
                message_, host=step.host, reason=reason, phase=phase, launched=waiter.launched
            )
        assert waiter.report is not None
        return waiter.report

    def kill(self, step: Step, run: str, timeout: float) -> bool:
        """Have ``step``'s relay run the agent's ``--kill`` on its host within ``timeout``
        seconds there: what run ``run`` started for the step ends. The request goes on the
        agent's stdin, never in a command line (the relay's ssh, the host's shell). Whether
        the relay reported it done; never raises (a lost relay cannot be asked)."""
        top = self._relays[self._top[step.host]]
        grace = max(0.0, min(step.stop_timeout, timeout))
        message = {
            "kill": step.id,
            "host": step.host,
            "login": step.login,
            "argv": launch_argv(step.python, "--kill"),
            "line": make_kill(run, step.id, grace).decode("ascii"),
            "timeout": timeout,
            "connect": step.timeouts.connect,
        }
        waiter = top.kill(step.id, (json.dumps(message) + "\n").encode())
        if waiter is None:
            return False
        bound = timeout + self._depth[step.host] * (step.timeouts.connect + HOP_SLACK)
        if not waiter.done.wait(bound):
            top.forget_kill(step.id, waiter)
            return False
        return waiter.report is not None and waiter.report.get("ok") is True

    def close(self) -> None:
        """End every relay (each first finishes what it launched), in parallel."""
        closers = [threading.Thread(target=r.close) for r in self._relays.values()]
        for thread in closers:
            thread.start()
        for thread in closers:
            thread.join()
