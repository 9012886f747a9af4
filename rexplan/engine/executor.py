"""Runs a Plan: wave by wave, a thread per in-flight step, every step verified by its callback.

The executor never prints: it emits events.Event records to a sink (the UI, the JSONL writer).
A step is READY only when its agent called back and proved the triple's key (listener.py);
what SSH says (exit status, stderr) is kept as a diagnostic and never decides the outcome.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from rexplan.core.model import Manifest, Plan, Step, Timeouts
from rexplan.core.spec import RESTARTED
from rexplan.engine import bootentry
from rexplan.engine import events as ev
from rexplan.engine.agentctl import HostAgents
from rexplan.engine.endpoints import callback_endpoints, listen
from rexplan.engine.failout import DEFAULT_TAIL
from rexplan.engine.fanout import TreeLauncher
from rexplan.engine.launch import Cancelled, Launcher
from rexplan.engine.listener import CallbackListener
from rexplan.engine.outcomes import RunResult, StepResult, Tracker
from rexplan.engine.placement import Load, place, probe_candidate
from rexplan.engine.policy import abort_reason, batches, blocked_by
from rexplan.engine.runs import new_run_id
from rexplan.transport import persist as mux
from rexplan.transport.base import Transport
from rexplan.transport.fds import ensure_fd_budget
from rexplan.transport.pool import TransportPool
from rexplan.trust.keys import KeyStore

#: seconds an interrupted run waits for its in-flight steps to wind down
INTERRUPT_GRACE = 10.0


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
        tail: int = DEFAULT_TAIL,
        take_over: bool = False,
        restart: frozenset[str] = frozenset(),
    ) -> None:
        self.manifest = manifest
        self.restart = restart
        self.tree = tree
        if tree is not None:
            tree.warn = self._relay_warning
        self.plan = plan
        self.pool = pool
        self.listener = listener
        self.forks = max(1, forks)
        self.run_id = run_id or listener.run_id
        self._clock = clock
        self._tracker = Tracker(self.run_id, emit, clock)
        self._emit = self._tracker.emit
        self._state = self._tracker.state
        self._cancel = threading.Event()
        self._policies = {p.name: p.policy for p in manifest.programs}
        self._abort: str | None = None
        self._abort_lock = threading.Lock()
        self._by_step: dict[str, StepResult] = {}
        self.agents = HostAgents(manifest, pool, self.run_id, self._emit)
        self.launcher = Launcher(
            manifest,
            keys=keys,
            pool=pool,
            listener=listener,
            advertise=advertise,
            agents=self.agents,
            tracker=self._tracker,
            cancel=self._cancel,
            clock=clock,
            tree=tree,
            tail=tail,
            take_over=take_over,
        )

    def _relay_warning(self, relay: str, text: str) -> None:
        self._emit(ev.NOTICE, host=relay, detail=f"warning: {text}")

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
        if not result.interrupted:
            self._boot_entries(result)
        result.aborted = self._abort
        self._emit(ev.RUN_DONE, total=len(by_step), counts=result.counts())
        return result

    def _boot_entries(self, result: RunResult) -> None:
        """Bring the boot entries in line (bootentry.py): the logins with an autostart step in
        the run, and those where a step was restarted (it may have dropped autostart). Hosts
        below a relay are not connected to: their entries wait for a flat apply."""
        steps = [
            r.step
            for r in result.results
            if (r.step.autostart or r.action == RESTARTED)
            and (self.tree is None or not self.tree.relayed(r.step.host))
        ]

        def warn(host: str, text: str) -> None:
            self._emit(ev.NOTICE, host=host, detail=f"warning: {text}")

        try:
            bootentry.sync_all(self.manifest, steps, self.pool, warn, forks=self.forks)
        except KeyboardInterrupt:
            result.interrupted = True

    def _run_wave(self, wave: Iterable[Step], by_step: dict[str, StepResult]) -> None:
        steps = list(wave)
        if not steps:
            return
        number = steps[0].wave
        self._emit(ev.WAVE_STARTED, wave=number, total=len(steps))
        todo: list[StepResult] = []
        for step in steps:
            r = by_step[step.id]
            blocked = blocked_by(step, by_step.values(), self._policies)
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
            self.launcher.kill_inflight(self.forks)
            wait(futures, timeout=INTERRUPT_GRACE)
            raise
        pool.shutdown(wait=True)

    def _check_policy(self, program: str) -> None:
        """After a step of ``program`` ended: abort the run if its failures exceed its policy."""
        reason = abort_reason(program, self._by_step.values(), self._policies)
        if reason is None:
            return
        with self._abort_lock:
            if self._abort is not None:
                return
            self._abort = reason
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
            agent = self.agents.agent_on(step.host, step.login, transport)
            files = [f.entry for f in self.agents.files_of(step)]
            return self.agents.status_of(step, transport, agent, files)[0].current

        return probe_candidate(
            lambda: self.pool.get(host, self.manifest.user(step.user)),
            host,
            step.timeouts.start,
            current,
        )

    def _forced(self, step: Step) -> bool:
        """Restart ``step`` even if it runs current: ``rex restart`` selected it, or a program
        it has ``restart_with`` was restarted earlier in this run (waves order them first)."""
        if step.id in self.restart:
            return True
        if not step.restart_with or step.kind == "job":
            return False
        restarted = sorted(
            {
                r.step.program
                for r in self._by_step.values()
                if r.step.program in step.restart_with and r.action == RESTARTED
            }
        )
        if restarted:
            detail = f"restarting with {', '.join(restarted)} (restart_with)"
            self._emit(ev.NOTICE, program=step.program, host=step.host, detail=detail)
        return bool(restarted)

    def _run_step(self, r: StepResult) -> None:
        step = r.step
        r.started = self._clock()
        try:
            if self._cancel.is_set():
                raise Cancelled
            if self._abort is not None:
                self._state(r, ev.SKIPPED, reason="aborted", detail=self._abort)
                return
            self.launcher.launch(r, force=self._forced(step))
        except Cancelled:
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
            self.launcher.ended(step.id)
            self._check_policy(step.program)


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
    tail: int = DEFAULT_TAIL,
    take_over: bool = False,
    restart: frozenset[str] = frozenset(),
) -> RunResult:
    """Run ``plan``: one callback listener and one transport per host for the whole run;
    ``strategy`` (default: the manifest's) ``tree`` launches most hosts through relays;
    a failed step shows the last ``tail`` lines of its program's output; ``take_over``:
    replace the instances other manifests own instead of failing ``owned``; the steps named
    in ``restart`` are restarted even when they run current (rex restart)."""
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
                tail=tail,
                take_over=take_over,
                restart=restart,
            )
            try:
                return executor.run()
            finally:
                if tree is not None:
                    tree.close()
