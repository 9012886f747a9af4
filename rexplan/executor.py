"""Runs a Plan: wave by wave, a thread per in-flight step, every step verified by its callback.

The executor never prints: it emits events.Event records to a sink (the UI, the JSONL writer).
A step is READY only when its agent called back and proved the triple's key (callback.py);
what SSH says (exit status, stderr) is kept as a diagnostic and never decides the outcome.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

from rexplan import events as ev
from rexplan import protocol
from rexplan.callback import CallbackListener, PendingStep
from rexplan.errors import (
    AuthenticationError,
    HostKeyError,
    KeyStoreError,
    TransportError,
    UnreachableError,
)
from rexplan.keys import KeyInfo, KeyStore
from rexplan.model import Manifest, Plan, Step, Timeouts
from rexplan.remote import bundle, bundle_sha
from rexplan.transport import Transport, TransportPool

#: reasons that mean "who you are was not accepted": exit code 6
AUTH_REASONS = frozenset({"auth", "host_key", "no_key", "key_insecure", "bad_proof", "rejected"})

#: agent front exit codes (rexplan.remote.agent) -> failure reason, for the diagnostic only
AGENT_REASONS = {
    10: "no_key",
    11: "start_failed",
    12: "exited",
    13: "not_ready",
    14: "no_callback",
    15: "rejected",
    16: "bad_launch",
    17: "agent_failed",
}

#: bind here when hosts reach the launcher over different routes
ALL_ADDRESSES = "0.0.0.0"  # noqa: S104 - only when the routes to the hosts differ

#: seconds an interrupted run waits for its in-flight steps to wind down
INTERRUPT_GRACE = 10.0

#: seconds added to the remote deadlines before the launcher gives up on the SSH exec
EXEC_SLACK = 5.0


@dataclass
class StepResult:
    """What became of one step."""

    step: Step
    state: str = ev.PENDING
    reason: str | None = None
    phase: str | None = None
    detail: str | None = None
    pid: int | None = None
    started: float | None = None
    finished: float | None = None


@dataclass
class RunResult:
    """Every step's result, in plan order, and whether the run was interrupted."""

    run_id: str
    results: list[StepResult] = field(default_factory=list)
    interrupted: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.state] = out.get(r.state, 0) + 1
        return out

    def exit_code(self) -> int:
        """130 interrupted; 6 authentication; 2 failed or skipped; 3 unreachable; else 0."""
        if self.interrupted:
            return 130
        states = {r.state for r in self.results}
        if any(r.state == ev.FAILED and r.reason in AUTH_REASONS for r in self.results):
            return 6
        if ev.FAILED in states or ev.SKIPPED in states:
            return 2
        if ev.UNREACHABLE in states:
            return 3
        return 0


class _Cancelled(Exception):
    """The run was interrupted before this step started."""


class Executor:
    """Launches a plan's steps and verifies each one through the callback listener."""

    def __init__(
        self,
        manifest: Manifest,
        plan: Plan,
        *,
        keys: KeyStore,
        pool: TransportPool,
        listener: CallbackListener,
        advertise: Callable[[str], tuple[str, int]],
        emit: ev.Sink,
        forks: int = 64,
        run_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manifest = manifest
        self.plan = plan
        self.keys = keys
        self.pool = pool
        self.listener = listener
        self.advertise = advertise
        self.forks = max(1, forks)
        self.run_id = run_id or listener.run_id
        self._emit_sink = emit
        self._clock = clock
        self._t0 = clock()
        self._cancel = threading.Event()
        self._agents: dict[str, str] = {}
        self._agent_lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._inflight: dict[str, Step] = {}
        self._inflight_lock = threading.Lock()
        self._bundle = bundle()
        self._bundle_sha = bundle_sha()

    # --- events -------------------------------------------------------------------------

    def _emit(self, kind: str, **fields: object) -> None:
        event = ev.Event(kind=kind, t=round(self._clock() - self._t0, 4), run=self.run_id, **fields)  # type: ignore[arg-type]
        self._emit_sink(event)

    def _state(self, result: StepResult, state: str, **fields: object) -> None:
        result.state = state
        for name in ("reason", "phase", "detail", "pid"):
            if name in fields:
                setattr(result, name, fields[name])
        s = result.step
        self._emit(
            ev.STEP,
            wave=s.wave,
            step=s.id,
            host=s.host,
            program=s.program,
            triple=s.triple,
            state=state,
            **fields,
        )

    # --- the run ------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Launch every wave in order; on KeyboardInterrupt stop, clean up and mark it."""
        result = RunResult(self.run_id)
        by_step = {s.id: StepResult(s) for s in self.plan.steps}
        result.results = list(by_step.values())
        self._emit(ev.RUN_STARTED, total=len(by_step))
        try:
            for wave in self.plan.waves:
                self._run_wave(wave, by_step)
        except KeyboardInterrupt:
            result.interrupted = True
            self._cancel.set()
            for r in result.results:
                if r.state not in ev.FINAL_STATES:
                    self._state(r, ev.SKIPPED, reason="interrupted", detail="run interrupted")
        self._emit(ev.RUN_DONE, total=len(by_step), counts=result.counts())
        return result

    def _run_wave(self, wave: Iterable[Step], by_step: dict[str, StepResult]) -> None:
        steps = list(wave)
        if not steps:
            return
        number = steps[0].wave
        self._emit(ev.WAVE_STARTED, wave=number, total=len(steps))
        todo: list[StepResult] = []
        for step in steps:
            r = by_step[step.id]
            blocked = self._blocked_by(step, by_step)
            if blocked:
                self._state(r, ev.SKIPPED, reason="dependency_failed", detail=blocked)
            else:
                todo.append(r)
        pool = ThreadPoolExecutor(max_workers=min(self.forks, max(1, len(todo))))
        futures: set[Future[None]] = set()
        try:
            futures = {pool.submit(self._run_step, r) for r in todo}
            while futures:
                # a short timeout keeps the main thread responsive to Ctrl-C
                _, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            # stop launching, kill what is starting, then give the steps a bounded time to
            # notice (their agents exit once their programs are gone); a second Ctrl-C ends it
            self._cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self._kill_inflight()
            wait(futures, timeout=INTERRUPT_GRACE)
            raise
        pool.shutdown(wait=True)
        counts: dict[str, int] = {}
        for step in steps:
            state = by_step[step.id].state
            counts[state] = counts.get(state, 0) + 1
        self._emit(ev.WAVE_DONE, wave=number, total=len(steps), counts=counts)

    def _blocked_by(self, step: Step, by_step: dict[str, StepResult]) -> str | None:
        """Why ``step`` cannot start: a required program has a step that is not ready."""
        bad: dict[str, int] = {}
        for r in by_step.values():
            if r.step.program in step.requires and r.state not in (ev.READY, ev.UNCHANGED):
                bad[r.step.program] = bad.get(r.step.program, 0) + 1
        if not bad:
            return None
        return "requires " + ", ".join(f"{p} ({n} not ready)" for p, n in sorted(bad.items()))

    # --- one step -----------------------------------------------------------------------

    def _run_step(self, r: StepResult) -> None:
        step = r.step
        r.started = self._clock()
        try:
            if self._cancel.is_set():
                raise _Cancelled
            self._launch(r)
        except _Cancelled:
            self._state(r, ev.SKIPPED, reason="interrupted", detail="run interrupted")
        except Exception as exc:  # the boundary for one step: it fails, the run goes on
            self._state(
                r,
                ev.FAILED,
                reason="internal",
                phase=r.phase,
                detail=f"{type(exc).__name__}: {exc}",
            )
        finally:
            r.finished = self._clock()
            with self._inflight_lock:
                self._inflight.pop(step.id, None)

    def _launch(self, r: StepResult) -> None:
        step = r.step
        host = self.manifest.host(step.host)
        user = self.manifest.user(step.user)
        r.phase = "connect"
        self._state(r, ev.CONNECTING, phase="connect")
        try:
            transport = self.pool.get(host, user)
        except (AuthenticationError, HostKeyError) as exc:
            reason = "host_key" if isinstance(exc, HostKeyError) else "auth"
            self._state(r, ev.FAILED, reason=reason, phase=exc.phase or "connect", detail=str(exc))
            return
        except UnreachableError as exc:
            self._state(r, ev.UNREACHABLE, reason="unreachable", phase="connect", detail=str(exc))
            return
        except TransportError as exc:
            self._state(r, ev.UNREACHABLE, reason="timeout", phase=exc.phase, detail=str(exc))
            return

        r.phase = "start"
        try:
            info, secret = self._key_for(step, transport)
        except KeyStoreError as exc:
            self._state(r, ev.FAILED, reason="no_key", phase="start", detail=str(exc))
            return
        if self._cancel.is_set():
            raise _Cancelled
        try:
            agent_path = self._agent_on(step.host, transport)
        except TransportError as exc:
            self._state(r, ev.FAILED, reason="agent_upload", phase="start", detail=str(exc))
            return

        t = step.timeouts
        nl = protocol.new_nonce()
        deadline = self._clock() + t.start + t.ready + t.callback
        self.listener.expect(
            PendingStep(
                step_id=step.id,
                triple=step.triple,
                key=secret,
                key_id=info.key_id,
                nl=nl,
                deadline=deadline,
            )
        )
        line = protocol.make_launch(
            run=self.run_id,
            step=step.id,
            triple=step.triple,
            key_path=protocol.key_relpath(info.host, info.user, info.program),
            nl=nl,
            callback=self.advertise(step.address),
            deadlines={
                "start": t.start,
                "ready": step.ready.timeout,
                "callback": t.callback,
                "stop": step.stop_timeout,
            },
            argv=step.argv,
            env=step.env,
            cwd=step.cwd,
            ready=_probe(step),
            kind=step.kind,
            log=step.program,
        )
        del secret, nl
        with self._inflight_lock:
            self._inflight[step.id] = step
        self._state(r, ev.STARTING, phase="start")
        diag: dict[str, object] = {}
        exec_error: TransportError | None = None
        try:
            res = transport.run(
                [host.python, "-I", "-S", agent_path],
                stdin=line,
                timeout=t.start + step.ready.timeout + t.callback + step.stop_timeout + EXEC_SLACK,
            )
            diag = _front_report(res.stdout)
        except TransportError as exc:
            exec_error = exc
        self._state(r, ev.AWAITING, phase="callback")
        remaining = max(0.05, deadline - self._clock())
        verdict = self.listener.wait(
            step.id, timeout=remaining if exec_error else min(remaining, 2.0)
        )
        if verdict.ok:
            self._state(r, ev.READY, phase="ready", pid=verdict.pid)
            return
        # no verified callback: failed, whatever SSH said; make sure nothing stays running
        self.listener.cancel(step.id)
        self._kill_remote(transport, host.python, agent_path, step)
        reason, phase, detail = _failure(verdict.code, diag, exec_error)
        self._state(r, ev.FAILED, reason=reason, phase=phase, detail=detail)

    def _key_for(self, step: Step, transport: Transport) -> tuple[KeyInfo, bytes]:
        """The key the launcher proves with; ``transport: local`` keys are made on first use."""
        if step.transport == "local" and self.keys.find(step.host, step.user, step.program) is None:
            if self.keys.find(step.host, step.user, None) is None:
                info, created = self.keys.create(step.host, step.user, step.program)
                if created:
                    self._emit(
                        ev.NOTICE,
                        host=step.host,
                        triple=step.triple,
                        detail=f"created key {info.key_id} for local triple {step.triple}",
                    )
        info, secret = self.keys.load(step.host, step.user, step.program)
        if step.transport == "local":
            self._ensure_local_copy(transport, info, secret)
        return info, secret

    def _ensure_local_copy(self, transport: Transport, info: KeyInfo, secret: bytes) -> None:
        """Local hosts read keys from REX_HOME/keys like any host; copy when it differs."""
        rel = protocol.key_relpath(info.host, info.user, info.program)
        path = f"{transport.rex_home()}/keys/{rel}"
        with self._lock_for(transport.host.name):
            with contextlib.suppress(FileNotFoundError, protocol.KeyFormatError):
                _, _, there = protocol.parse_key_file(transport.get(path))
                if protocol.key_id(there) == info.key_id:
                    return
            data = protocol.format_key_file(info.triple, info.created, secret)
            transport.put(data, path, 0o600)

    def _lock_for(self, host: str) -> threading.Lock:
        with self._agent_lock:
            return self._host_locks.setdefault(host, threading.Lock())

    def _agent_on(self, host: str, transport: Transport) -> str:
        """Path of the agent in ``transport``'s REX_HOME, uploaded once per host and login
        (each login has its own REX_HOME) while its hash matches."""
        where = _agent_key(host, transport.login)
        with self._lock_for(where):
            path = self._agents.get(where)
            if path is None:
                path = f"{transport.rex_home()}/agent-{self._bundle_sha[:16]}.py"
                st = transport.stat(path)
                if st is None or st[1] != len(self._bundle):
                    transport.put(self._bundle, path, 0o600)
                self._agents[where] = path
            return path

    def _kill_remote(self, transport: Transport, python: str, agent: str, step: Step) -> None:
        """Kill whatever this run started for ``step`` on its host, found by the rex tags."""
        with contextlib.suppress(TransportError):
            transport.run(
                [python, "-I", "-S", agent, "--kill", self.run_id, step.id],
                timeout=step.stop_timeout + EXEC_SLACK,
            )

    def _kill_inflight(self) -> None:
        """Kill every step that is starting, on all its hosts at once."""
        with self._inflight_lock:
            steps = list(self._inflight.values())

        def kill(step: Step) -> None:
            self.listener.cancel(step.id)
            host = self.manifest.host(step.host)
            agent = self._agents.get(step.host)
            if agent is None:
                return
            with contextlib.suppress(Exception):
                transport = self.pool.get(host, self.manifest.user(step.user))
                self._kill_remote(transport, host.python, agent, replace(step, stop_timeout=2.0))

        if steps:
            with ThreadPoolExecutor(max_workers=min(self.forks, len(steps))) as killers:
                list(killers.map(kill, steps))


def _probe(step: Step) -> dict[str, object]:
    """The launch message's ``ready`` dict for a step's probe."""
    rd = step.ready
    out: dict[str, object] = {"kind": rd.kind, "interval": rd.interval, "settle": rd.settle}
    if rd.kind == "tcp":
        out.update(host=rd.host, port=rd.port)
    elif rd.kind == "http":
        out["url"] = rd.url
    elif rd.kind == "command":
        out["argv"] = list(rd.argv)
    elif rd.kind == "file":
        out["path"] = rd.path
    return out


def _front_report(stdout: bytes) -> dict[str, object]:
    """The agent front's one JSON line: a diagnostic, never the verdict."""
    for line in reversed(stdout.splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return {}


def _failure(
    code: str, diag: dict[str, object], exec_error: TransportError | None
) -> tuple[str, str, str]:
    """(reason, phase, detail) for a step that was not verified."""
    if code in ("BAD_PROOF", "WRONG_KEY"):
        return "bad_proof", "callback", f"callback did not prove the key ({code})"
    exit_code = diag.get("exit")
    agent_reason = str(diag.get("reason") or "")
    if isinstance(exit_code, int) and exit_code in AGENT_REASONS:
        reason = AGENT_REASONS[exit_code]
        phase = {"not_ready": "ready", "exited": "ready", "no_callback": "callback"}.get(
            reason, "start"
        )
        detail = agent_reason or reason
        status = diag.get("status")
        if reason == "exited" and isinstance(status, int):
            detail = f"program exited with status {status} before it was ready"
        return reason, phase, detail
    if exec_error is not None:
        return "no_callback", exec_error.phase or "start", f"no verified callback; {exec_error}"
    return "no_callback", "callback", f"no verified callback ({code or 'none'})"


def new_run_id() -> str:
    """A fresh run id: time-ordered and unguessable enough to tell runs apart."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def route_source(address: str, port: int = 22) -> str:
    """This machine's address on the route to ``address`` (a UDP connect sends no packet)."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return str(s.getsockname()[0])


def callback_endpoints(manifest: Manifest, plan: Plan) -> tuple[str, Callable[[str], str]]:
    """(bind address, host address -> address that host dials) for this run's listener.

    ``callback.bind``/``advertise`` win. Otherwise loopback when every host of the plan is
    local or loopback (no traffic leaves the machine), else the launcher's address on the
    route to each host, bound to all addresses only when the routes differ.
    """
    cb = manifest.callback
    if cb.bind is not None:
        fixed = cb.advertise or cb.bind
        if fixed in (ALL_ADDRESSES, "::"):
            return cb.bind, route_source
        return cb.bind, lambda _address: fixed
    remote = sorted(
        {s.address for s in plan.steps if s.transport != "local" and not _is_loopback(s.address)}
    )
    if not remote:
        local = cb.advertise or "127.0.0.1"
        return "127.0.0.1", lambda _address: local
    sources = {route_source(a) for a in remote}
    if cb.advertise is not None:
        advertised = cb.advertise
        return (sources.pop() if len(sources) == 1 else ALL_ADDRESSES), lambda _a: advertised
    if len(sources) == 1:
        only = sources.pop()
        return only, lambda address: "127.0.0.1" if _is_loopback(address) else only
    return (
        ALL_ADDRESSES,
        lambda address: "127.0.0.1" if _is_loopback(address) else route_source(address),
    )


def apply(
    manifest: Manifest,
    plan: Plan,
    *,
    keys: KeyStore,
    known_hosts: str | None,
    emit: ev.Sink,
    forks: int | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Run ``plan``: one callback listener and one transport per host for the whole run."""
    bind, dial = callback_endpoints(manifest, plan)
    connect_timeout = max((s.timeouts.connect for s in plan.steps), default=10.0)
    with CallbackListener(bind, manifest.callback.port, run_id=run_id or new_run_id()) as listener:
        port = listener.address[1]
        with TransportPool(
            known_hosts=known_hosts, timeouts=Timeouts(connect=connect_timeout)
        ) as pool:
            executor = Executor(
                manifest,
                plan,
                keys=keys,
                pool=pool,
                listener=listener,
                advertise=lambda address: (dial(address), port),
                emit=emit,
                forks=forks or manifest.forks,
            )
            return executor.run()


def result_to_dict(result: RunResult, manifest: Manifest) -> dict[str, object]:
    """The stable JSON of ``rex apply --json``: format 1, one object per step in plan order."""
    return {
        "format": 1,
        "run": result.run_id,
        "manifest": manifest.path,
        "manifest_digest": manifest.digest,
        "exit": result.exit_code(),
        "interrupted": result.interrupted,
        "counts": result.counts(),
        "steps": [
            {
                "id": r.step.id,
                "wave": r.step.wave,
                "host": r.step.host,
                "program": r.step.program,
                "triple": r.step.triple,
                "state": r.state,
                "reason": r.reason,
                "phase": r.phase if r.state not in (ev.READY, ev.UNCHANGED) else None,
                "detail": r.detail,
                "pid": r.pid,
                "seconds": None
                if r.started is None or r.finished is None
                else round(r.finished - r.started, 3),
            }
            for r in result.results
        ],
    }
