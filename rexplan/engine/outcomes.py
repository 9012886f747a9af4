"""What became of a run's steps: their results and events, the run's exit code, why a step
failed, and the JSON of ``rex apply --json``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rexplan.core import spec as specs
from rexplan.core.model import Manifest, Step
from rexplan.core.text import printable
from rexplan.engine import events as ev
from rexplan.engine.agentctl import AGENT_REASONS
from rexplan.engine.pending import Verdict
from rexplan.errors import TransportError
from rexplan.wire import chars

#: reasons that mean "who you are was not accepted": exit code 6
AUTH_REASONS = frozenset({"auth", "host_key", "no_key", "key_insecure", "bad_proof", "rejected"})

#: verdict code of a step whose resp verified but whose agent never received ``ok``
OK_LOST = "OK_LOST"

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
    tail: str | None = None  # a failed step: the last lines of its program's output
    log: str | None = None  # host:path of the program's log
    hint: str | None = None  # a failed step: what to run or change next


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
        """130 interrupted; 6 authentication; 2 failed or skipped; 3 unreachable; else 0 (a
        decline is not a failure: a ``when: {required: true}`` one ends the step failed)."""
        if self.interrupted:
            return 130
        states = {r.state for r in self.results}
        if any(r.state == ev.FAILED and r.reason in AUTH_REASONS for r in self.results):
            return 6
        if states & {ev.FAILED, ev.SKIPPED}:
            return 2
        if ev.UNREACHABLE in states:
            return 3
        return 0


class Tracker:
    """Records each step's state on its result and emits it, every event stamped with the run
    and the seconds since the tracker was made."""

    def __init__(self, run_id: str, sink: ev.Sink, clock: Callable[[], float]) -> None:
        self.run_id = run_id
        self._sink = sink
        self._clock = clock
        self._t0 = clock()

    def emit(self, kind: str, **fields: object) -> None:
        event = ev.Event(kind=kind, t=round(self._clock() - self._t0, 4), run=self.run_id, **fields)  # type: ignore[arg-type]
        self._sink(event)

    def state(self, result: StepResult, state: str, **fields: object) -> None:
        result.state = state
        for name in (
            "reason",
            "phase",
            "detail",
            "pid",
            "action",
            "status",
            "output",
            "tail",
            "log",
            "hint",
        ):
            if name in fields:
                setattr(result, name, fields[name])
        s = result.step
        self.emit(
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


def failure(
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
        and chars.KEY_ID_RE.match(held)
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
    if exec_error is not None and exec_error.phase == "agent_upload":
        # the connection died while the first stage received the agent (transport.ssh)
        return "agent_upload", "start", f"the agent did not reach the host: {exec_error}"
    if exec_error is not None:
        phase = exec_error.phase or "start"
        return "no_callback", phase, f"no verified callback; {exec_error}{rejected}"
    if rejected:
        return "no_callback", "callback", f"no verified callback{rejected}"
    return "no_callback", "callback", f"no verified callback ({verdict.code or 'none'})"


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
                "tail": r.tail,
                "log": r.log,
                "hint": r.hint,
                "seconds": None
                if r.started is None or r.finished is None
                else round(r.finished - r.started, 3),
            }
            for r in result.results
        ],
    }
