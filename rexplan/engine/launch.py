"""Launching one step: over its host's SSH connection or through a relay, registered with the
callback listener first, settled by the listener's verdict (never by what SSH says)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from rexplan.core import spec as specs
from rexplan.core.model import Host, Manifest, Step, When
from rexplan.core.text import printable
from rexplan.engine import events as ev
from rexplan.engine import failout
from rexplan.engine.agentctl import EXEC_SLACK, HostAgents
from rexplan.engine.fanout import RELAY_LOST, RelayError, TreeLauncher
from rexplan.engine.listener import CallbackListener
from rexplan.engine.outcomes import OK_LOST, StepResult, Tracker, failure
from rexplan.engine.pending import EXITED, PendingStep, Verdict
from rexplan.errors import (
    AuthenticationError,
    HostKeyError,
    HostTimeoutError,
    KeyStoreError,
    TransportError,
    UnreachableError,
)
from rexplan.transport.base import LOOPBACK, Gate, Transport, kind, last_report
from rexplan.transport.pool import TransportPool
from rexplan.transport.shipping import (
    AGENT_WANTED,
    EXIT_NO_AGENT,
    LAUNCH_MARKER,
    agent_supply,
    launch_argv,
)
from rexplan.trust.keys import KeyInfo, KeyStore
from rexplan.wire import codes, handshake, keyfile, launch

#: relay errors after which no agent ran on the host: its step fails without awaiting a callback
NOT_RUN = frozenset({"unreachable", "host_key", "auth", "agent_upload", "agent_start_timeout"})


class Cancelled(Exception):
    """The run was interrupted before this step started."""


class Launcher:
    """Launches steps and settles each from its callback; keeps the steps in flight, so an
    interrupted run can kill them."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        keys: KeyStore,
        pool: TransportPool,
        listener: CallbackListener,
        advertise: Callable[[str], tuple[str, int]],
        agents: HostAgents,
        tracker: Tracker,
        cancel: threading.Event,
        clock: Callable[[], float],
        tree: TreeLauncher | None,
        tail: int = failout.DEFAULT_TAIL,
        take_over: bool = False,
    ) -> None:
        self.manifest = manifest
        self.tail = tail
        #: replace instances another manifest owns (``rex apply --take-over``)
        self.take_over = take_over
        self.owner = owner_field(manifest)
        self.keys = keys
        self.pool = pool
        self.listener = listener
        self.advertise = advertise
        self.agents = agents
        self.tree = tree
        self.run_id = tracker.run_id
        self._tracker = tracker
        self._state = tracker.state
        self._cancel = cancel
        self._clock = clock
        self._inflight: dict[str, Step] = {}
        self._inflight_lock = threading.Lock()

    def launch(self, r: StepResult, *, force: bool = False) -> None:
        """Launch ``r``'s step and record how it ended; Cancelled if the run was interrupted
        before it started. ``force``: a running instance is replaced even if it runs the
        manifest's spec (rex restart, restart_with)."""
        step = r.step
        force = force and step.kind != "job"
        if self.tree is not None and self.tree.relayed(step.host):
            self._launch_relayed(r, self.tree, force)
            return
        host = self.manifest.host(step.host)
        user = self.manifest.user(step.user)
        r.phase = "connect"
        self._state(r, ev.CONNECTING, phase="connect")
        try:
            transport = self.pool.get(host, user)
        except (AuthenticationError, HostKeyError) as exc:
            reason = "host_key" if isinstance(exc, HostKeyError) else "auth"
            hint = failout.connect_hint(exc, step, self.manifest.path)
            phase = exc.phase or "connect"
            self._state(r, ev.FAILED, reason=reason, phase=phase, detail=str(exc), hint=hint)
            return
        except UnreachableError as exc:
            detail, hint = str(exc), exc.hint
            self._state(
                r, ev.UNREACHABLE, reason="unreachable", phase="connect", detail=detail, hint=hint
            )
            return
        except TransportError as exc:
            detail, hint = str(exc), exc.hint
            self._state(
                r, ev.UNREACHABLE, reason="timeout", phase=exc.phase, detail=detail, hint=hint
            )
            return

        r.phase = "start"
        try:
            callback = self._callback_for(step, host, transport)
        except TransportError as exc:
            self._state(r, ev.FAILED, reason="no_callback", phase="start", detail=str(exc))
            return
        try:
            info, secret = self._key_for(step, transport)
        except KeyStoreError as exc:
            hint = failout.key_hint(exc, step)
            self._state(r, ev.FAILED, reason="no_key", phase="start", detail=str(exc), hint=hint)
            return
        if self._cancel.is_set():
            raise Cancelled
        try:
            files = self.agents.files_of(step)
        except OSError as exc:
            detail = f"cannot read {exc.filename}: {exc.strerror}"
            self._state(r, ev.FAILED, reason="bad_file", phase="start", detail=detail)
            return
        entries = [f.entry for f in files]
        check: tuple[str, str, str, str] | None = None
        if files:
            # Files go up before the launch, so this host's records are read first (SFTP)
            try:
                agent_path = self.agents.agent_on(step.host, step.login, transport)
            except TransportError as exc:
                self.agents.clean_leftovers(step, transport)
                self._state(r, ev.FAILED, reason="agent_upload", phase="start", detail=str(exc))
                return
            status, record = self.agents.status_of(step, transport, agent_path, entries)
            owner = specs.owned_by_other(record, self.manifest.name)
            if owner is not None and not self.take_over:
                detail = f"{step.triple} is owned by manifest {owned_text(owner)}"
                self._state(r, ev.FAILED, reason="owned", phase="start", detail=detail)
                return
            action, replacing = specs.action_for(status)
            if force:
                action, replacing = specs.STARTED, True
            elif owner is not None and status.status == specs.RUNNING:
                action, replacing = specs.RESTARTED, True  # taken over: relaunched as ours
            if action == specs.UNCHANGED:
                self._state(r, ev.UNCHANGED, pid=status.pid, action=action)
                return
            # a record of the layout before (by program) holds its files elsewhere: all go up
            held = record if record is not None and record.get("name") == step.triple else None
            try:
                self.agents.upload(step, transport, files, specs.files_to_upload(entries, held))
            except TransportError as exc:
                self.agents.clean_leftovers(step, transport)
                self._state(r, ev.FAILED, reason="file_upload", phase="start", detail=str(exc))
                return
        else:
            # The fast path: one exec, in which the agent itself finds an unchanged instance
            # (LAUNCH_STUB's check) or replaces one of another spec; a job always runs.
            action, replacing = specs.STARTED, step.kind != "job"
            if step.kind != "job" and not force:
                check = (step.triple, step.triple, specs.expected_spec(step), self.owner[0])
        t = step.timeouts
        # the launch line goes out only once the stub announced itself within the start
        # deadline, and the agent waits for it no longer than that
        # a missing agent is asked for and comes in the same exec (AGENT_WANTED)
        agent_argv = launch_argv(host.python, check=check, wait=t.start, offer=True)
        gate = Gate(LAUNCH_MARKER.encode(), t.start, AGENT_WANTED.encode(), agent_supply())
        # replacing a running instance first waits out its stop grace
        stopping = step.stop_timeout if replacing else 0.0
        deadline = self._clock() + t.start + t.ready + t.callback + stopping
        line = self._expect(step, info, secret, deadline, replacing, entries, callback, renew=force)
        del secret
        exec_timeout = self._starting(r, stopping)
        diag: dict[str, object] = {}
        exec_error: TransportError | None = None
        try:
            res = transport.run(agent_argv, stdin=line, timeout=exec_timeout, gate=gate)
            diag = last_report(res.stdout)
            if res.exit_status == EXIT_NO_AGENT and diag.get("exit") == EXIT_NO_AGENT:
                # the first launch as this login on this host: upload the agent, launch again
                try:
                    self.agents.agent_on(step.host, step.login, transport)
                except TransportError as exc:
                    self.listener.cancel(step.id)
                    self.agents.clean_leftovers(step, transport)
                    self._state(r, ev.FAILED, reason="agent_upload", phase="start", detail=str(exc))
                    return
                if self._clock() < deadline:
                    res = transport.run(agent_argv, stdin=line, timeout=exec_timeout, gate=gate)
                    diag = last_report(res.stdout)
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
        self.agents.kill_remote(transport, host.python, step)
        reason, phase, detail = failure(verdict, diag, exec_error, info.key_id)
        if reason == "no_callback" and host.callback == "direct" and exec_error is None:
            detail += unreachable_hint(step.host, callback)
        self._failed(r, reason, phase, detail, diag)

    def _failed(
        self, r: StepResult, reason: str, phase: str, detail: str, diag: dict[str, object]
    ) -> None:
        """A launch that was not verified: failed, with what its program wrote last, where
        its log is and what to do next, when the agent's report tells."""
        step = r.step
        hint = failout.launch_hint(
            reason, step, diag, self.manifest.path, self.advertise(step.address)
        )
        raw = diag.get("tail")
        self._state(
            r,
            ev.FAILED,
            reason=reason,
            phase=phase,
            detail=detail,
            tail=failout.last_lines(raw if isinstance(raw, str) else None, self.tail),
            log=failout.log_place(step.host, diag),
            hint=hint,
        )

    def _callback_for(self, step: Step, host: Host, transport: Transport) -> tuple[str, int]:
        """Where the step's agent dials: the listener (``via: direct``), or the port its
        host's sshd forwards to the listener over ``transport``'s connection (``via: ssh``)."""
        if host.callback == "ssh" and not kind(host.transport).is_local:
            return LOOPBACK, transport.callback_port(self.listener.adopt)
        return self.advertise(step.address)

    def _starting(self, r: StepResult, stopping: float) -> float:
        """The step's launch goes out now: in flight until it ends; the seconds its exec (or
        relay) may take."""
        step, t = r.step, r.step.timeouts
        with self._inflight_lock:
            self._inflight[step.id] = step
        self._state(r, ev.STARTING, phase="start")
        return t.start + step.ready.timeout + t.callback + step.stop_timeout + stopping + EXEC_SLACK

    def ended(self, step_id: str) -> None:
        """The step is over: an interrupt no longer kills it."""
        with self._inflight_lock:
            self._inflight.pop(step_id, None)

    def _expect(
        self,
        step: Step,
        info: KeyInfo,
        secret: bytes,
        deadline: float,
        replacing: bool,
        files: Sequence[tuple[str, str, int]],
        callback: tuple[str, int],
        unchanged: bool = False,
        renew: bool = False,
    ) -> bytes:
        """Register ``step`` with the listener under a fresh launch nonce and return its launch
        line (the nonce travels only in it); ``unchanged``: an instance of the same spec that
        runs is proven to the listener (protocol ``same``) rather than refused."""
        nl = handshake.new_nonce()
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
        return launch.make_launch(
            **specs.launch_args(
                step,
                run=self.run_id,
                key_path=keyfile.key_relpath(info.host, info.user, info.program),
                nl=nl,
                callback=callback,
                replace=replacing,
                files=files,
                when=preconditions(self.manifest.program(step.program).when),
                unchanged=unchanged,
                owner=self.owner,
                take_over=self.take_over,
                renew=renew,
            ),
            logs=self.manifest.program(step.program).logs,
        )

    def _settle(
        self,
        r: StepResult,
        diag: dict[str, object],
        check: tuple[str, str, str, str] | None,
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
            self._job_done(r, verdict.pid, failout.log_place(step.host, diag))
            return None
        if verdict.ok:
            self._state(r, ev.READY, phase="ready", pid=verdict.pid, action=action)
            return None
        if verdict.code == codes.DECLINED:
            detail = verdict.detail or "declined"
            # a decline is "not here, and that is fine" unless the program requires its `when`
            state = ev.FAILED if self.manifest.program(step.program).when.required else ev.DECLINED
            self._state(r, state, reason="declined", phase="start", detail=detail)
            return None
        if verdict.code == codes.UNCHANGED:
            self._state(r, ev.UNCHANGED, pid=verdict.pid, action=specs.UNCHANGED)
            return None
        self.listener.cancel(step.id)
        return verdict

    def _launch_relayed(self, r: StepResult, tree: TreeLauncher, force: bool = False) -> None:
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
            hint = failout.key_hint(exc, step)
            self._state(r, ev.FAILED, reason="no_key", phase="start", detail=str(exc), hint=hint)
            return
        if self._cancel.is_set():
            raise Cancelled
        action = specs.STARTED
        t = step.timeouts
        service = step.kind != "job"
        stopping = step.stop_timeout if service else 0.0
        deadline = self._clock() + t.connect + t.start + t.ready + t.callback + stopping
        callback = self.advertise(step.address)
        line = self._expect(
            step,
            info,
            secret,
            deadline,
            service,
            (),
            callback,
            unchanged=service and not force,
            renew=force,
        )
        del secret
        exec_timeout = self._starting(r, stopping)
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
            self._tracker.emit(ev.NOTICE, host=step.host, detail=f"warning: {step.id}: {lie}")
            self._state(r, ev.FAILED, reason="no_callback", phase="callback", detail=lie)
        elif error is not None and error.reason == "unreachable":
            self._state(
                r, ev.UNREACHABLE, reason="unreachable", phase=error.phase, detail=str(error)
            )
        elif error is not None and (error.reason == RELAY_LOST or error.reason in NOT_RUN):
            self._state(r, ev.FAILED, reason=error.reason, phase=error.phase, detail=str(error))
        else:
            reason, phase, detail = failure(verdict, diag, error, info.key_id)
            self._failed(r, reason, phase, detail, diag)

    def _key_for(self, step: Step, transport: Transport) -> tuple[KeyInfo, bytes]:
        """The key the launcher proves with; ``transport: local`` keys are made on first use."""
        if (
            kind(step.transport).is_local
            and self.keys.find(step.host, step.user, step.program) is None
        ):
            if self.keys.find(step.host, step.user, None) is None:
                info, created = self.keys.create(step.host, step.user, step.program)
                if created:
                    self._tracker.emit(
                        ev.NOTICE,
                        host=step.host,
                        triple=step.triple,
                        detail=f"created key {info.key_id} for local triple {step.triple}",
                    )
        info, secret = self.keys.load(step.host, step.user, step.program)
        if kind(step.transport).is_local:
            self.agents.ensure_local_copy(transport, info, secret)
        return info, secret

    def _job_done(self, r: StepResult, pid: int | None, log: str | None) -> None:
        """Wait for a verified job's end: ready if it exited 0, else failed with its status,
        the last lines of its output and where its log is."""
        job = self.listener.wait_job(r.step.id)
        assert job is not None  # no timeout: it exits, or its connection ends
        output = job.output.decode("utf-8", "replace")
        if job.code == EXITED and job.status == 0:
            self._state(
                r, ev.READY, phase="job", pid=pid, action=specs.STARTED, status=0, output=output
            )
        else:
            exited = job.code == EXITED
            self._state(
                r,
                ev.FAILED,
                reason="exit_status" if exited else "job_lost",
                phase="job",
                detail=f"job exited with status {job.status}"
                if exited
                else f"lost the job: {job.detail}",
                output=output,
                tail=failout.last_lines(output, self.tail),
                log=log,
                **({"status": job.status} if exited else {}),
            )

    def kill_inflight(self, forks: int) -> None:
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
                self.agents.kill_remote(transport, host.python, replace(step, stop_timeout=2.0))

        if steps:
            with ThreadPoolExecutor(max_workers=min(forks, len(steps))) as killers:
                list(killers.map(kill, steps))


def owner_field(manifest: Manifest) -> tuple[str, str]:
    """(name, absolute path) of ``manifest``, as the records of its steps name their owner
    (a path the launch message cannot carry is left out)."""
    path = os.path.abspath(manifest.path)
    if not path.isprintable() or len(path) > launch.MAX_OWNER_PATH:
        path = ""
    return manifest.name, path


def owned_text(owner: tuple[str, str]) -> str:
    """An owner as ``name (path)`` (the path filtered: it comes from a host's record)."""
    name, path = owner
    return f"{printable(name)} ({printable(path)})" if path else printable(name)


def preconditions(when: When) -> dict[str, float]:
    """The launch message's ``when`` for a program's preconditions."""
    out: dict[str, float] = {}
    if when.max_load is not None:
        out["max_load"] = when.max_load
    if when.min_free_mb is not None:
        out["min_free_mb"] = float(when.min_free_mb)
    return out


def unreachable_hint(host: str, callback: tuple[str, int]) -> str:
    """What a step that got no callback over ``via: direct`` adds: where its agent dialled,
    and the way out when the host cannot open connections to the launcher."""
    address, port = callback
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return (
        f" (the agent dialled {where}; if {host} cannot open connections to the launcher, "
        "call back through its SSH connection: callback: {via: ssh})"
    )
