"""Runs a Plan: wave by wave, a thread per in-flight step, every step verified by its callback.

The executor never prints: it emits events.Event records to a sink (the UI, the JSONL writer).
A step is READY only when its agent called back and proved the triple's key (callback.py);
what SSH says (exit status, stderr) is kept as a diagnostic and never decides the outcome.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

from rexplan import events as ev
from rexplan import mux, protocol
from rexplan import spec as specs
from rexplan.callback import EXITED, CallbackListener, PendingStep, Verdict, ensure_fd_budget
from rexplan.errors import (
    AuthenticationError,
    Diagnostic,
    HostKeyError,
    HostTimeoutError,
    KeyStoreError,
    ManifestError,
    TransportError,
    UnreachableError,
)
from rexplan.keys import KeyInfo, KeyStore
from rexplan.model import FailurePolicy, FileSpec, Host, Manifest, Plan, Step, Timeouts, When
from rexplan.plan import least_loaded
from rexplan.remote import (
    EXIT_NO_AGENT,
    EXIT_NO_LAUNCH,
    LAUNCH_MARKER,
    bootstrap_argv,
    bootstrap_input,
    bundle,
    bundle_sha,
    launch_argv,
)
from rexplan.text import printable
from rexplan.transport import Gate, Result, Transport, TransportPool
from rexplan.tree import RELAY_LOST, RelayError, TreeLauncher

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
    18: "already_running",
    19: "declined",
    EXIT_NO_AGENT: "agent_upload",
    EXIT_NO_LAUNCH: "agent_start_timeout",
}

#: bind here when hosts reach the launcher over different routes
ALL_ADDRESSES = "0.0.0.0"  # noqa: S104 - only when the routes to the hosts differ

#: verdict code of a step whose resp verified but whose agent never received ``ok``
OK_LOST = "OK_LOST"

#: seconds an interrupted run waits for its in-flight steps to wind down
INTERRUPT_GRACE = 10.0

#: seconds added to the remote deadlines before the launcher gives up on the SSH exec
EXEC_SLACK = 5.0

#: the longest record (REX_HOME/run/PROGRAM.json) read over SFTP, as the agent reads them
RECORD_LIMIT = 1 << 20
#: the longest key file and /proc/PID/stat read from a host: they are a few hundred bytes
KEY_FILE_LIMIT = PROC_STAT_LIMIT = 4096

#: relay errors after which no agent ran on the host: its step fails without awaiting a callback
NOT_RUN = frozenset({"unreachable", "host_key", "auth", "agent_upload", "agent_start_timeout"})

#: what the run summary counts, in this order
SUMMARY = (
    specs.UNCHANGED,
    specs.STARTED,
    specs.RESTARTED,
    ev.FAILED,
    ev.UNREACHABLE,
    ev.SKIPPED,
    ev.DECLINED,
)


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
    action: str | None = None  # spec.STARTED / RESTARTED / UNCHANGED once it is up
    status: int | None = None  # a job's exit status
    output: str | None = None  # the tail of a job's output


@dataclass
class RunResult:
    """Every step's result, in plan order, and whether the run was interrupted."""

    run_id: str
    results: list[StepResult] = field(default_factory=list)
    interrupted: bool = False
    aborted: str | None = None  # why the failure policy ended the run early

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.state] = out.get(r.state, 0) + 1
        return out

    def actions(self) -> dict[str, int]:
        """The summary's counts: unchanged, started, restarted, failed, unreachable, skipped."""
        out = dict.fromkeys(SUMMARY, 0)
        for r in self.results:
            key = r.action if r.action is not None else r.state
            if key in out:
                out[key] += 1
        return out

    def exit_code(self) -> int:
        """130 interrupted; 6 authentication; 2 failed, skipped or declined; 3 unreachable;
        else 0."""
        if self.interrupted:
            return 130
        states = {r.state for r in self.results}
        if any(r.state == ev.FAILED and r.reason in AUTH_REASONS for r in self.results):
            return 6
        if states & {ev.FAILED, ev.SKIPPED, ev.DECLINED}:
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
        tree: TreeLauncher | None = None,
    ) -> None:
        self.manifest = manifest
        self.tree = tree
        if tree is not None:
            tree.warn = self._relay_warning
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
        self._records: dict[str, dict[str, dict[str, Any]] | None] = {}
        self._agent_lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._inflight: dict[str, Step] = {}
        self._inflight_lock = threading.Lock()
        self._policies = {p.name: p.policy for p in manifest.programs}
        self._files: dict[str, tuple[LocalFile, ...]] = {}
        self._abort: str | None = None
        self._abort_lock = threading.Lock()
        self._by_step: dict[str, StepResult] = {}
        self._bundle = bundle()
        self._bundle_sha = bundle_sha()

    # --- events -------------------------------------------------------------------------

    def _relay_warning(self, relay: str, text: str) -> None:
        self._emit(ev.NOTICE, host=relay, detail=f"warning: {text}")

    def _emit(self, kind: str, **fields: object) -> None:
        event = ev.Event(kind=kind, t=round(self._clock() - self._t0, 4), run=self.run_id, **fields)  # type: ignore[arg-type]
        self._emit_sink(event)

    def _state(self, result: StepResult, state: str, **fields: object) -> None:
        result.state = state
        for name in ("reason", "phase", "detail", "pid", "action", "status", "output"):
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
        self._by_step = by_step
        result.results = list(by_step.values())
        self._emit(ev.RUN_STARTED, total=len(by_step))
        hosts = len({(s.host, s.login) for s in self.plan.steps})
        # one SSH connection per host and login, a callback per step in flight, and the
        # connections the listener may hold in the handshake
        notice = ensure_fd_budget(hosts + 2 * self.forks + self.listener.max_handshakes)
        if notice is not None:
            self._emit(ev.NOTICE, detail=notice)
        try:
            for wave in self.plan.waves:
                self._run_wave(wave, by_step)
        except KeyboardInterrupt:
            result.interrupted = True
            self._cancel.set()
            for r in result.results:
                if r.state not in ev.FINAL_STATES:
                    self._state(r, ev.SKIPPED, reason="interrupted", detail="run interrupted")
        result.aborted = self._abort
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
            if self._abort is not None:
                self._state(r, ev.SKIPPED, reason="aborted", detail=self._abort)
            elif blocked:
                self._state(r, ev.SKIPPED, reason="dependency_failed", detail=blocked)
            else:
                todo.append(r)
        todo = self._place(todo)
        for batch in batches([r.step for r in todo], self._policies):
            self._run_batch([by_step[s.id] for s in batch])
        counts: dict[str, int] = {}
        for step in steps:
            state = by_step[step.id].state
            counts[state] = counts.get(state, 0) + 1
        self._emit(ev.WAVE_DONE, wave=number, total=len(steps), counts=counts)

    def _run_batch(self, todo: list[StepResult]) -> None:
        """Launch ``todo`` in parallel (at most ``forks`` at once) and wait for every step."""
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

    def _check_policy(self, program: str) -> None:
        """After a step of ``program`` ended: abort the run if its failures exceed its policy."""
        policy = self._policies.get(program, FailurePolicy())
        mine = [
            r
            for r in self._by_step.values()
            if r.step.program == program and r.state != ev.UNPLACED
        ]
        failed = sum(1 for r in mine if counts_as_failure(r.state, policy))
        if not exceeds(policy, failed, len(mine)):
            return
        with self._abort_lock:
            if self._abort is not None:
                return
            self._abort = f"{failed} of {len(mine)} steps of {program} failed ({limit(policy)})"
        self._emit(ev.NOTICE, program=program, detail=f"aborting the run: {self._abort}")

    def _place(self, todo: list[StepResult]) -> list[StepResult]:
        """Narrow each least-loaded program to its ``count`` best hosts; the others' steps end
        ``unplaced``. Probes every candidate at once (one exec each, on the shared connection)."""
        by_id = {r.step.id: r for r in todo}
        steps = [r.step for r in todo]
        for placed in place(self.manifest, steps, self._probe, forks=self.forks):
            self._emit(ev.NOTICE, program=placed.program, detail=placed.describe())
            detail = f"least-loaded placement chose {placed.picked()}"
            for step in placed.unplaced():
                self._state(by_id[step.id], ev.UNPLACED, reason="not_placed", detail=detail)
        return [r for r in todo if r.state != ev.UNPLACED]

    def _probe(self, step: Step) -> Load:
        """A candidate host's load, measured as its ``load`` setting says (and whether the
        program already runs there, current)."""
        host = self.manifest.host(step.host)

        def current(transport: Transport) -> bool:
            agent = self._agent_on(step.host, step.login, transport)
            files = [f.entry for f in self._local_files(step.program)]
            return self.status_of(step, transport, agent, files)[0].current

        return probe_candidate(
            lambda: self.pool.get(host, self.manifest.user(step.user)),
            host,
            step.timeouts.start,
            current,
        )

    def _blocked_by(self, step: Step, by_step: dict[str, StepResult]) -> str | None:
        """Why ``step`` cannot start: a required program has a step that is not ready (an
        unreachable one does not count if that program ignores unreachable hosts)."""
        bad: dict[str, int] = {}
        for r in by_step.values():
            if r.step.program not in step.requires or r.state in (
                ev.READY,
                ev.UNCHANGED,
                ev.UNPLACED,
            ):
                continue
            policy = self._policies.get(r.step.program, FailurePolicy())
            if not (r.state == ev.UNREACHABLE and policy.ignore_unreachable):
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
            if self._abort is not None:
                self._state(r, ev.SKIPPED, reason="aborted", detail=self._abort)
                return
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
            self._check_policy(step.program)

    def _launch(self, r: StepResult) -> None:
        step = r.step
        if self.tree is not None and self.tree.relayed(step.host):
            self._launch_relayed(r, self.tree)
            return
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
            files = self._local_files(step.program)
        except OSError as exc:
            detail = f"cannot read {exc.filename}: {exc.strerror}"
            self._state(r, ev.FAILED, reason="bad_file", phase="start", detail=detail)
            return
        entries = [f.entry for f in files]
        check: tuple[str, str, str] | None = None
        if files:
            # Files go up before the launch, so this host's records are read first (SFTP)
            try:
                agent_path = self._agent_on(step.host, step.login, transport)
            except TransportError as exc:
                self._clean_leftovers(step, transport)
                self._state(r, ev.FAILED, reason="agent_upload", phase="start", detail=str(exc))
                return
            status, record = self.status_of(step, transport, agent_path, entries)
            action, replacing = specs.action_for(status)
            if action == specs.UNCHANGED:
                self._state(r, ev.UNCHANGED, pid=status.pid, action=action)
                return
            try:
                self._upload(step, transport, files, specs.files_to_upload(entries, record))
            except TransportError as exc:
                self._clean_leftovers(step, transport)
                self._state(r, ev.FAILED, reason="file_upload", phase="start", detail=str(exc))
                return
        else:
            # The fast path: one exec, in which the agent itself finds an unchanged instance
            # (LAUNCH_STUB's check) or replaces one of another spec; a job always runs.
            action, replacing = specs.STARTED, step.kind != "job"
            if step.kind != "job":
                check = (step.triple, step.program, specs.expected_spec(step))
        t = step.timeouts
        # the launch line goes out only once the stub announced itself within the start
        # deadline, and the agent waits for it no longer than that
        agent_argv = launch_argv(host.python, check=check, wait=t.start)
        gate = Gate(LAUNCH_MARKER.encode(), t.start)
        # replacing a running instance first waits out its stop grace
        stopping = step.stop_timeout if replacing else 0.0
        deadline = self._clock() + t.start + t.ready + t.callback + stopping
        line = self._expect(step, info, secret, deadline, replacing, entries)
        del secret
        with self._inflight_lock:
            self._inflight[step.id] = step
        self._state(r, ev.STARTING, phase="start")
        exec_timeout = (
            t.start + step.ready.timeout + t.callback + step.stop_timeout + stopping + EXEC_SLACK
        )
        diag: dict[str, object] = {}
        exec_error: TransportError | None = None
        try:
            res = transport.run(agent_argv, stdin=line, timeout=exec_timeout, gate=gate)
            diag = _front_report(res.stdout)
            if res.exit_status == EXIT_NO_AGENT and diag.get("exit") == EXIT_NO_AGENT:
                # the first launch as this login on this host: upload the agent, launch again
                try:
                    self._agent_on(step.host, step.login, transport)
                except TransportError as exc:
                    self.listener.cancel(step.id)
                    self._clean_leftovers(step, transport)
                    self._state(r, ev.FAILED, reason="agent_upload", phase="start", detail=str(exc))
                    return
                if self._clock() < deadline:
                    res = transport.run(agent_argv, stdin=line, timeout=exec_timeout, gate=gate)
                    diag = _front_report(res.stdout)
        except TransportError as exc:
            if isinstance(exc, HostTimeoutError) and exc.phase == "start":
                # the remote shell started too late: it never got its launch line, so nothing
                # started there and nothing can call back
                self.listener.cancel(step.id)
                detail = f"{exc}: its launch was not sent, nothing was started"
                reason = "agent_start_timeout"
                self._state(r, ev.FAILED, reason=reason, phase="start", detail=detail)
                return
            exec_error = exc
        remaining = max(0.05, deadline - self._clock())
        # A front that reported had its verdict (ok, or no) before it printed; only a front
        # that died without a report may leave a callback in flight.
        wait = remaining if exec_error else min(remaining, 0.2 if "ok" in diag else 2.0)
        verdict = self._settle(r, diag, check, action, wait)
        if verdict is None:
            return
        # no verified callback: failed, whatever SSH said; make sure nothing stays running
        self._kill_remote(transport, host.python, step)
        reason, phase, detail = _failure(verdict, diag, exec_error, info.key_id)
        self._state(r, ev.FAILED, reason=reason, phase=phase, detail=detail)

    def _expect(
        self,
        step: Step,
        info: KeyInfo,
        secret: bytes,
        deadline: float,
        replacing: bool,
        files: Sequence[tuple[str, str, int]],
        unchanged: bool = False,
    ) -> bytes:
        """Register ``step`` with the listener under a fresh launch nonce and return its launch
        line (the nonce travels only in it); ``unchanged``: an instance of the same spec that
        runs is proven to the listener (protocol ``same``) rather than refused."""
        nl = protocol.new_nonce()
        self.listener.expect(
            PendingStep(
                step_id=step.id,
                triple=step.triple,
                key=secret,
                key_id=info.key_id,
                nl=nl,
                deadline=deadline,
                job=step.kind == "job",
            )
        )
        return protocol.make_launch(
            **specs.launch_args(
                step,
                run=self.run_id,
                key_path=protocol.key_relpath(info.host, info.user, info.program),
                nl=nl,
                callback=self.advertise(step.address),
                replace=replacing,
                files=files,
                when=preconditions(self.manifest.program(step.program).when),
                unchanged=unchanged,
            )
        )

    def _settle(
        self,
        r: StepResult,
        diag: dict[str, object],
        check: tuple[str, str, str] | None,
        action: str,
        wait: float,
    ) -> Verdict | None:
        """Conclude a launched step from the agent's report and the listener's verdict; None
        when it is settled (unchanged, ready, a finished job, declined), else the verdict of
        a step that was not verified (its expectation cancelled) for the caller to report.

        The report's ``unchanged`` settles a step only with ``check``: the flat path's, read
        from the SSH channel of the pinned host itself. Through a relay (no ``check``) only
        the agent's proof (the listener's UNCHANGED) does."""
        step = r.step
        if diag.get("unchanged") is True and check is not None:
            self.listener.cancel(step.id)
            pid = diag.get("pid")
            pid = pid if isinstance(pid, int) else None
            self._state(r, ev.UNCHANGED, pid=pid, action=specs.UNCHANGED)
            return None
        if diag.get("replaced") is True:
            action = specs.RESTARTED
        self._state(r, ev.AWAITING, phase="callback")
        verdict = self.listener.wait(step.id, timeout=wait)
        if verdict.ok and diag.get("ok") is False:
            # The agent's report cannot make a step succeed, but it may make one fail: it
            # never got the launcher's ok (lost on the way) and stopped its program.
            verdict = replace(verdict, ok=False, code=OK_LOST)
        if verdict.ok and step.kind == "job":
            self._state(r, ev.RUNNING, phase="job", pid=verdict.pid)
            self._job_done(r, verdict.pid)
            return None
        if verdict.ok:
            self._state(r, ev.READY, phase="ready", pid=verdict.pid, action=action)
            return None
        if verdict.code == protocol.DECLINED:
            detail = verdict.detail or "declined"
            self._state(r, ev.DECLINED, reason="declined", phase="start", detail=detail)
            return None
        if verdict.code == protocol.UNCHANGED:
            self._state(r, ev.UNCHANGED, pid=verdict.pid, action=specs.UNCHANGED)
            return None
        self.listener.cancel(step.id)
        return verdict

    def _launch_relayed(self, r: StepResult, tree: TreeLauncher) -> None:
        """A step on a host below a relay (strategy: tree): the launcher never connects there;
        the relay runs the agent with the launch line, and the agent calls back here as always.
        A relay cannot settle a step, not even as unchanged: the agent proves that with its key
        (protocol ``same``; one callback per unchanged step), where a flat launch takes the
        stub's word read from the pinned host's own SSH channel; a relay's report of
        "unchanged" is a lie, reported as one. A step that failed after its launch line went
        out is killed through the relay, as _kill_remote kills a flat one (its agent would end
        it too, but only by its own deadlines)."""
        step = r.step
        r.phase = "start"
        self._state(r, ev.CONNECTING, phase="connect")
        try:
            info, secret = self.keys.load(step.host, step.user, step.program)
        except KeyStoreError as exc:
            self._state(r, ev.FAILED, reason="no_key", phase="start", detail=str(exc))
            return
        if self._cancel.is_set():
            raise _Cancelled
        action = specs.STARTED
        t = step.timeouts
        service = step.kind != "job"
        stopping = step.stop_timeout if service else 0.0
        deadline = self._clock() + t.connect + t.start + t.ready + t.callback + stopping
        line = self._expect(step, info, secret, deadline, service, (), unchanged=service)
        del secret
        with self._inflight_lock:
            self._inflight[step.id] = step
        self._state(r, ev.STARTING, phase="start")
        exec_timeout = (
            t.start + step.ready.timeout + t.callback + step.stop_timeout + stopping + EXEC_SLACK
        )
        diag: dict[str, object] = {}
        error: RelayError | None = None
        try:
            argv = launch_argv(step.python, wait=t.start)
            diag = tree.launch(step, line, exec_timeout, argv=argv, start=t.start)
        except RelayError as exc:
            error = exc
        remaining = max(0.05, deadline - self._clock())
        if error is not None and (error.reason in NOT_RUN or not error.launched):
            remaining = 0.05  # no agent ran: nothing can call back
        elif error is None:
            remaining = min(remaining, 0.2 if "ok" in diag else 2.0)
        verdict = self._settle(r, diag, None, action, remaining)
        if verdict is None:
            return
        if error is None or error.launched:
            # no verified callback: make sure nothing stays running
            tree.kill(step, self.run_id, step.stop_timeout + EXEC_SLACK)
        if error is None and diag.get("unchanged") is True:
            path = " > ".join(tree.relays_of(step.host))
            lie = f"relay {path} reported it unchanged without its agent's proof: a lie"
            self._emit(ev.NOTICE, host=step.host, detail=f"warning: {step.id}: {lie}")
            self._state(r, ev.FAILED, reason="no_callback", phase="callback", detail=lie)
        elif error is not None and error.reason == "unreachable":
            self._state(
                r, ev.UNREACHABLE, reason="unreachable", phase=error.phase, detail=str(error)
            )
        elif error is not None and (error.reason == RELAY_LOST or error.reason in NOT_RUN):
            self._state(r, ev.FAILED, reason=error.reason, phase=error.phase, detail=str(error))
        else:
            reason, phase, detail = _failure(verdict, diag, error, info.key_id)
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
            # absent, unreadable, too long or malformed: written anew
            with contextlib.suppress(OSError, protocol.KeyFormatError):
                _, _, there = protocol.parse_key_file(transport.get(path, KEY_FILE_LIMIT))
                if protocol.key_id(there) == info.key_id:
                    return
            data = protocol.format_key_file(info.triple, info.created, secret)
            transport.put(data, path, 0o600)

    def _job_done(self, r: StepResult, pid: int | None) -> None:
        """Wait for a verified job's end: ready if it exited 0, else failed with its status."""
        job = self.listener.wait_job(r.step.id)
        assert job is not None  # no timeout: it exits, or its connection ends
        output = job.output.decode("utf-8", "replace")
        if job.code == EXITED and job.status == 0:
            self._state(
                r, ev.READY, phase="job", pid=pid, action=specs.STARTED, status=0, output=output
            )
        elif job.code == EXITED:
            detail = f"job exited with status {job.status}"
            self._state(
                r,
                ev.FAILED,
                reason="exit_status",
                phase="job",
                detail=detail,
                status=job.status,
                output=output,
            )
        else:
            detail = f"lost the job: {job.detail}"
            self._state(r, ev.FAILED, reason="job_lost", phase="job", detail=detail, output=output)

    def _local_files(self, program: str) -> tuple[LocalFile, ...]:
        with self._lock_for(f"files {program}"):
            if program not in self._files:
                self._files[program] = local_files(self.manifest.program(program).files)
            return self._files[program]

    def _upload(
        self, step: Step, transport: Transport, files: Sequence[LocalFile], dests: list[str]
    ) -> None:
        """Put the files the host lacks (by content hash) under REX_HOME/files/<program>/."""
        if not dests:
            return
        base = f"{transport.rex_home()}/files/{step.program}"
        for f in files:
            if f.dest in dests:
                transport.put(f.data, f"{base}/{f.dest}", f.mode)
        self._emit(
            ev.NOTICE,
            host=step.host,
            program=step.program,
            step=step.id,
            detail=f"uploaded {len(dests)} file(s) for {step.id}: {', '.join(dests)}",
        )

    def status_of(
        self,
        step: Step,
        transport: Transport,
        agent: str,
        files: Sequence[tuple[str, str, int]] = (),
    ) -> tuple[specs.StepStatus, dict[str, Any] | None]:
        """``step``'s status on its host and its record there, from the agent's records read
        once per run and login (one exec, whatever the number of steps there); ABSENT if they
        cannot be read, so the launch goes ahead and the agent's lock still refuses a second
        instance."""
        where = f"{step.login}@{step.host}"
        with self._lock_for(f"records {where}"):
            if where not in self._records:
                self._records[where] = sftp_records(transport)
            if self._records[where] is None:
                self._records[where] = read_records(
                    transport, self.manifest.host(step.host).python, agent, step.timeouts.start
                )
                if self._records[where] is None:
                    self._emit(
                        ev.NOTICE,
                        host=step.host,
                        detail=f"cannot read the programs' state of {where}; launching anyway",
                    )
            records = self._records[where]
        record = None if records is None else records.get(step.program)
        status = specs.classify(step, record, specs.expected_spec(step, files), files)
        return status, record

    def _lock_for(self, host: str) -> threading.Lock:
        with self._agent_lock:
            return self._host_locks.setdefault(host, threading.Lock())

    def _agent_on(self, host: str, login: str, transport: Transport) -> str:
        """Path of the agent in ``login``'s REX_HOME on ``host``, uploaded once per host and
        login (logins do not share a REX_HOME) while its hash matches."""
        where = f"{login}@{host}"
        with self._lock_for(where):
            path = self._agents.get(where)
            if path is None:
                path = f"{transport.rex_home()}/agent-{self._bundle_sha[:16]}.py"
                try:
                    st = transport.stat(path)
                    if st is None or st[1] != len(self._bundle):
                        transport.put(self._bundle, path, 0o600)
                except OSError as exc:
                    # SFTP refusals (e.g. a read-only REX_HOME) arrive as OSErrors naming no path
                    raise TransportError(
                        f"cannot write the agent to {path}: {exc.strerror or exc}",
                        host=host,
                        phase="start",
                    ) from exc
                self._agents[where] = path
            return path

    def _clean_leftovers(self, step: Step, transport: Transport) -> None:
        """Remove the temp files of uploads cut mid-way (the connection died under them) over
        a new connection; a host that stays out of reach keeps them, and the user is told."""
        leftovers, transport.leftovers = list(transport.leftovers), []
        if not leftovers:
            return
        host, user = self.manifest.host(step.host), self.manifest.user(step.user)
        self.pool.discard(host, user)
        try:
            fresh = self.pool.get(host, user)
            for path in leftovers:
                fresh.remove(path)
        except (TransportError, OSError) as exc:
            self._emit(
                ev.NOTICE,
                host=step.host,
                detail=f"could not remove the partial upload(s) {', '.join(leftovers)}: {exc}",
            )

    def _kill_remote(self, transport: Transport, python: str, step: Step) -> None:
        """Kill whatever this run started for ``step`` on its host, found by the rex tags
        (the run id goes on stdin: a command line is anyone's to read there)."""
        with contextlib.suppress(TransportError):
            transport.run(
                launch_argv(python, "--kill"),
                stdin=protocol.make_kill(self.run_id, step.id, step.stop_timeout),
                timeout=step.stop_timeout + EXEC_SLACK,
            )

    def _kill_inflight(self) -> None:
        """Kill every step that is starting, on all its hosts at once."""
        with self._inflight_lock:
            steps = list(self._inflight.values())

        def kill(step: Step) -> None:
            self.listener.cancel(step.id)
            if self.tree is not None and self.tree.relayed(step.host):
                # never connected to: its relay runs the kill there
                self.tree.kill(step, self.run_id, 2.0 + EXEC_SLACK)
                return
            host = self.manifest.host(step.host)
            with contextlib.suppress(Exception):
                transport = self.pool.get(host, self.manifest.user(step.user))
                self._kill_remote(transport, host.python, replace(step, stop_timeout=2.0))

        if steps:
            with ThreadPoolExecutor(max_workers=min(self.forks, len(steps))) as killers:
                list(killers.map(kill, steps))


#: seconds over which a ``load: cgroup`` host's probe samples its cgroup's CPU time
CGROUP_SAMPLE = 0.2


def agent_run(transport: Transport, python: str, *args: str, timeout: float) -> Result:
    """Run the agent with ``args`` on the host: the copy a launch left there, through the
    launch stub (its code cached: nothing sent, nothing compiled), else the bundle piped
    over stdin and compiled there (a host rex never launched on: nothing is left on it)."""
    res = transport.run(launch_argv(python, *args), timeout=timeout)
    if res.exit_status != EXIT_NO_AGENT:
        return res
    return transport.run(bootstrap_argv(python, *args), stdin=bootstrap_input(b""), timeout=timeout)


@dataclass(frozen=True)
class Load:
    """A placement candidate: its load per CPU it may use (None: could not be probed),
    available memory, and whether the program already runs there with the manifest's spec.
    ``source`` says what ``per_cpu`` is: ``loadavg`` (the 1-minute load average per CPU) or
    ``cgroup`` (CPUs its cgroup kept busy over the sample, per CPU it may use); ``fallback``
    says why a ``load: cgroup`` host was measured by its load average instead."""

    per_cpu: float | None
    free_mb: int
    current: bool
    source: str = "loadavg"
    fallback: str = ""

    def describe(self) -> str:
        if self.per_cpu is None:
            return "no probe"
        measure = "cgroup load" if self.source == "cgroup" else "load"
        text = f"{measure} {self.per_cpu:.2f}/cpu"
        if self.fallback:
            text += f" (load average: its cgroup could not be read: {self.fallback})"
        return f"{text}, {self.free_mb} MB free" + (", running" if self.current else "")


def parse_load(output: str, current: bool) -> Load:
    """A candidate's Load from the output of the agent's ``--load`` mode (its last line
    counts); ValueError when that is not the probe's JSON or its figures make no sense."""
    lines = output.strip().splitlines()
    try:
        # json raises RecursionError on a deeply nested value: a host's words, like any
        data: Any = json.loads(lines[-1]) if lines else None
        load, cpus, free = float(data["load"]), float(data["cpus"]), int(data["free_mb"])
        source, fallback = data.get("source", "loadavg"), data.get("fallback", "")
    except (KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"not the load probe's output: {output[-200:]!r}") from exc
    if not (math.isfinite(load) and math.isfinite(cpus)) or load < 0 or cpus <= 0:
        raise ValueError(f"implausible load {load} on {cpus} CPUs")
    if source not in ("loadavg", "cgroup") or not isinstance(fallback, str):
        raise ValueError(f"unknown load source {source!r}")
    # the host's words go into events and the terminal: one short printable line
    fallback = printable(fallback, 160)
    return Load(load / cpus, free, current, source, fallback)


def choose(candidates: Sequence[tuple[str, Load]], count: int) -> set[str]:
    """The ``count`` candidates to place on: those already running current first (so a
    re-apply changes nothing), then the least loaded per CPU, then the most free memory, then
    manifest order; hosts that could not be probed come last."""
    order = sorted(
        range(len(candidates)),
        key=lambda i: (
            not candidates[i][1].current,
            candidates[i][1].per_cpu is None,
            candidates[i][1].per_cpu or 0.0,
            -candidates[i][1].free_mb,
            i,
        ),
    )
    return {candidates[i][0] for i in order[:count]}


def probe_candidate(
    connect: Callable[[], Transport],
    host: Host,
    timeout: float,
    current: Callable[[Transport], bool],
) -> Load:
    """A placement candidate's Load: the agent's ``--load`` mode once on the host's
    connection (agent_run), then whether the program already runs there current;
    ``Load(None, 0, False)`` when either fails."""
    try:
        transport = connect()
        res = agent_run(
            transport, host.python, "--load", host.load, f"{CGROUP_SAMPLE:g}", timeout=timeout
        )
        return parse_load(res.stdout.decode("ascii", "replace"), current(transport))
    except (TransportError, OSError, ValueError, KeyError, IndexError, TypeError):
        return Load(None, 0, False)


@dataclass(frozen=True)
class Placed:
    """Least-loaded placement of one program: its candidate steps with their Loads, in plan
    order, and the ids of the steps chosen to run."""

    program: str
    candidates: tuple[tuple[Step, Load], ...]
    chosen: frozenset[str]

    def picked(self) -> str:
        """The chosen hosts, in plan order: ``h1, h3``."""
        return ", ".join(s.host for s, _ in self.candidates if s.id in self.chosen)

    def unplaced(self) -> list[Step]:
        """The candidate steps not chosen: apply starts nothing for them."""
        return [s for s, _ in self.candidates if s.id not in self.chosen]

    def describe(self) -> str:
        """``least-loaded placement of P: h1 (of h1 (load 0.10/cpu, 900 MB free), h2 (...))``."""
        shown = ", ".join(f"{s.host} ({load.describe()})" for s, load in self.candidates)
        return f"least-loaded placement of {self.program}: {self.picked()} (of {shown})"


def place(
    manifest: Manifest, steps: Sequence[Step], probe: Callable[[Step], Load], *, forks: int
) -> list[Placed]:
    """Least-loaded placement among ``steps``: ``probe`` every candidate of every least-loaded
    program at once (at most ``forks`` in flight), then choose each program's ``count``.
    ``rex apply`` calls it at each wave, ``apply --dry-run`` once for the plan."""
    groups = least_loaded(manifest, steps)
    candidates = [s for group in groups.values() for s in group]
    if not candidates:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(candidates)))) as probes:
        probed = list(probes.map(probe, candidates))
    loads = {s.id: load for s, load in zip(candidates, probed, strict=True)}
    placed = []
    for program, group in groups.items():
        count = manifest.program(program).placement.count or len(group)
        chosen = choose([(s.id, loads[s.id]) for s in group], count)
        placed.append(Placed(program, tuple((s, loads[s.id]) for s in group), frozenset(chosen)))
    return placed


@dataclass(frozen=True)
class LocalFile:
    """A program's file as the launcher reads it: where it goes, its bytes, hash and mode."""

    dest: str
    data: bytes = field(repr=False)
    sha: str
    mode: int

    @property
    def entry(self) -> tuple[str, str, int]:
        """(dest, sha256 hex, mode), as the launch message and the spec digest carry it."""
        return self.dest, self.sha, self.mode


def local_files(specs_: Iterable[FileSpec]) -> tuple[LocalFile, ...]:
    """Read a program's ``files``; OSError if one cannot be read."""
    out = []
    for f in specs_:
        with open(f.src, "rb") as src:
            data = src.read()
        out.append(LocalFile(f.dest, data, hashlib.sha256(data).hexdigest(), f.mode))
    return tuple(out)


def preconditions(when: When) -> dict[str, float]:
    """The launch message's ``when`` for a program's preconditions."""
    out: dict[str, float] = {}
    if when.max_load is not None:
        out["max_load"] = when.max_load
    if when.min_free_mb is not None:
        out["min_free_mb"] = float(when.min_free_mb)
    return out


def counts_as_failure(state: str, policy: FailurePolicy) -> bool:
    """Whether a step that ended in ``state`` counts against its program's policy."""
    return state == ev.FAILED or (state == ev.UNREACHABLE and not policy.ignore_unreachable)


def exceeds(policy: FailurePolicy, failed: int, total: int) -> bool:
    """Whether ``failed`` of a program's ``total`` steps are more than its policy allows:
    strictly more, so ``max_fail: 25%`` lets 1 of 4 fail and aborts at 2 of 4."""
    if failed <= 0:
        return False
    if policy.any_errors_fatal:
        return True
    if policy.max_fail is not None and failed > policy.max_fail:
        return True
    return policy.max_fail_percent is not None and failed * 100 > policy.max_fail_percent * total


def limit(policy: FailurePolicy) -> str:
    """The policy that was exceeded, as the manifest says it."""
    if policy.any_errors_fatal:
        return "any_errors_fatal"
    if policy.max_fail is not None:
        return f"max_fail {policy.max_fail}"
    return f"max_fail {policy.max_fail_percent:g}%"


def batches(steps: list[Step], policies: dict[str, FailurePolicy]) -> list[list[Step]]:
    """``steps`` of one wave in launch batches: batch k holds the k-th ``serial``-sized chunk
    of each program's steps (all of them when the program has no ``serial``)."""
    per_program: dict[str, list[Step]] = {}
    for s in steps:
        per_program.setdefault(s.program, []).append(s)
    out: list[list[Step]] = []
    for program, mine in per_program.items():
        policy = policies.get(program, FailurePolicy())
        size = len(mine)
        if policy.serial is not None:
            size = policy.serial
        elif policy.serial_percent is not None:
            size = math.ceil(len(mine) * policy.serial_percent / 100)
        size = max(1, size)
        for k, start in enumerate(range(0, len(mine), size)):
            if k == len(out):
                out.append([])
            out[k].extend(mine[start : start + size])
    return out


def read_records(
    transport: Transport, python: str, agent: str, timeout: float
) -> dict[str, dict[str, Any]] | None:
    """The agent's ``--status`` records of one login on one host; None if unreadable."""
    try:
        res = transport.run([python, "-I", "-S", agent, "--status"], timeout=timeout)
        return specs.parse_status(res.stdout)
    except (TransportError, ValueError):
        return None


def sftp_records(transport: Transport) -> dict[str, dict[str, Any]] | None:
    """The records of one login on one host read over SFTP, with liveness from /proc: what the
    agent's ``--status`` reports, minus the uptime, without starting a Python there. None (ask
    the agent) when a program has uploaded files, since hashing them is the agent's job."""
    try:
        home = transport.rex_home()
        run = f"{home}/run"
        out: dict[str, dict[str, Any]] = {}
        for entry in transport.listdir(run):
            name = entry[: -len(".json")]
            if entry.startswith(".") or not entry.endswith(".json") or not name:
                continue
            if transport.listdir(f"{home}/files/{name}"):
                return None
            try:
                record = json.loads(transport.get(f"{run}/{entry}", RECORD_LIMIT))
            except (OSError, ValueError, RecursionError):
                continue  # vanished, unreadable or too long: the agent skips it too
            if not isinstance(record, dict):
                continue
            record.update(
                name=name,
                alive=_same_process(transport, record.get("pid"), record.get("start")),
                supervised=_same_process(transport, record.get("agent"), record.get("agent_start")),
                files={},
            )
            out[name] = record
        return out
    except (TransportError, OSError):
        return None


def _same_process(transport: Transport, pid: Any, start: Any) -> bool:
    """The agent's ``same_process`` over SFTP: ``pid`` lives, not a zombie, and started at
    ``start`` (clock ticks since boot, /proc/PID/stat field 22), so a reused pid does not count."""
    if type(pid) is not int or pid <= 1 or not isinstance(start, str):
        return False
    try:
        fields = transport.get(f"/proc/{pid}/stat", PROC_STAT_LIMIT).rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return len(fields) > 19 and fields[0] != b"Z" and fields[19] == start.encode()


def _front_report(stdout: bytes) -> dict[str, object]:
    """The agent front's one JSON line: a diagnostic, never the verdict."""
    for line in reversed(stdout.splitlines()):
        with contextlib.suppress(ValueError, RecursionError):  # RecursionError: nested deep
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return {}


def _failure(
    verdict: Verdict, diag: dict[str, object], exec_error: TransportError | None, key_id: str
) -> tuple[str, str, str]:
    """(reason, phase, detail) for a step that was not verified; ``key_id`` is the key's the
    launcher proved with. The attempts the listener rejected meanwhile (the verdict's detail)
    are only detail: anyone who can connect can make them. The agent front's report comes
    over SSH: a refused agent names the key it holds there."""
    held = diag.get("key_id")
    if (
        diag.get("exit") == 15
        and isinstance(held, str)
        and protocol.KEY_ID_RE.match(held)
        and held != key_id
    ):
        detail = (
            f"the agent proved a different key (key_id {held}, expected {key_id}): "
            "run rex_key distribute"
        )
        return "bad_proof", "callback", detail
    rejected = f"; {verdict.detail}" if verdict.detail else ""
    if verdict.code == OK_LOST:
        detail = "the agent proved the key but never received ok, so it stopped its program"
        return "ok_lost", "callback", detail
    exit_code = diag.get("exit")
    agent_reason = printable(str(diag.get("reason") or ""))  # the host's words
    if isinstance(exit_code, int) and exit_code in AGENT_REASONS:
        reason = AGENT_REASONS[exit_code]
        phase = {"not_ready": "ready", "exited": "ready", "no_callback": "callback"}.get(
            reason, "start"
        )
        detail = agent_reason or reason
        status = diag.get("status")
        if reason == "exited" and isinstance(status, int):
            detail = f"program exited with status {status} before it was ready"
        return reason, phase, detail + rejected
    if exec_error is not None:
        phase = exec_error.phase or "start"
        return "no_callback", phase, f"no verified callback; {exec_error}{rejected}"
    if rejected:
        return "no_callback", "callback", f"no verified callback{rejected}"
    return "no_callback", "callback", f"no verified callback ({verdict.code or 'none'})"


def new_run_id() -> str:
    """A fresh run id: time-ordered, then 128 random bits, so a stranger cannot guess one
    (the listener refuses a callback naming another run before any HMAC)."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(16)


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
    strategy: str | None = None,
) -> RunResult:
    """Run ``plan``: one callback listener and one transport per host for the whole run;
    ``strategy`` (default: the manifest's) ``tree`` launches most hosts through relays."""
    bind, dial = callback_endpoints(manifest, plan)
    connect_timeout = max((s.timeouts.connect for s in plan.steps), default=10.0)
    listener = CallbackListener(bind, manifest.callback.port, run_id=run_id or new_run_id())
    listen(listener, manifest, bind)
    with listener:
        port = listener.address[1]
        with mux.transport_pool(
            known_hosts=known_hosts,
            timeouts=Timeouts(connect=connect_timeout),
            persist=manifest.persist,
        ) as pool:
            tree = None
            if (strategy or manifest.strategy) == "tree":
                tree = TreeLauncher(manifest, plan.steps, pool, known_hosts, manifest.fanout)
            executor = Executor(
                manifest,
                plan,
                keys=keys,
                pool=pool,
                listener=listener,
                advertise=lambda address: (dial(address), port),
                emit=emit,
                forks=forks or manifest.forks,
                tree=tree,
            )
            try:
                return executor.run()
            finally:
                if tree is not None:
                    tree.close()


def listen(listener: CallbackListener, manifest: Manifest, bind: str) -> None:
    """Start the run's listener before any host is contacted; a ManifestError (exit 4) naming
    the address when it cannot listen there, e.g. another process (maybe another user's)
    holds a fixed ``callback.port``: agents would call that process instead."""
    try:
        listener.start()
    except OSError as exc:
        listener.close()
        port = manifest.callback.port
        where = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
        if exc.errno == errno.EADDRINUSE:
            setting, problem = "callback.port", f"{where} is already in use by another process"
            hint = "stop what listens there, or choose another callback.port (0: any free port)"
        else:
            setting, problem = "callback", f"cannot listen on {where}"
            hint = "callback.bind must be an address of this machine"
        message = f"{problem} ({exc.strerror or exc}); no host was contacted"
        raise ManifestError([Diagnostic(manifest.path, 0, 0, setting, message, hint)]) from None


def result_to_dict(result: RunResult, manifest: Manifest) -> dict[str, object]:
    """The stable JSON of ``rex apply --json``: format 1, one object per step in plan order."""
    return {
        "format": 1,
        "run": result.run_id,
        "manifest": manifest.path,
        "manifest_digest": manifest.digest,
        "exit": result.exit_code(),
        "interrupted": result.interrupted,
        "aborted": result.aborted,
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
                "action": r.action,
                "status": r.status,
                "output": r.output,
                "seconds": None
                if r.started is None or r.finished is None
                else round(r.finished - r.started, 3),
            }
            for r in result.results
        ],
    }
