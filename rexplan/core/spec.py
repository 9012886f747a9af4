"""What a step launches and how a host's record of it compares: pure, no I/O. ``launch_args`` is
the one renderer of a step, so the spec digest the agent records and the one rex expects differ
only when the program changed; ``classify`` and ``action_for`` judge a host's record."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rexplan.core.model import Step
from rexplan.wire import handshake, keyfile, launch, probes

#: a step's status on its host, as ``rex status`` shows it
RUNNING = "running"  # alive (pid + start time) with the manifest's spec
DRIFTED = "drifted"  # alive with another spec digest than the manifest's
RESTARTING = "restarting"  # its supervisor waits out a backoff before the next restart
EXITED = "exited"  # ended by itself; the exit status is recorded
STOPPED = "stopped"  # ended by rex stop (or its supervisor was told to stop)
FAILED = "failed"  # a launch that was not verified, or a restart that could not start
DECLINED = "declined"  # the host declined the last launch (a ``when`` precondition)
ABSENT = "absent"  # never launched as this login on this host
UNKNOWN = "unknown"  # the record says running but neither program nor supervisor lives
UNREACHABLE = "unreachable"  # the host could not be asked
STATUSES = (
    RUNNING,
    DRIFTED,
    RESTARTING,
    EXITED,
    STOPPED,
    FAILED,
    DECLINED,
    ABSENT,
    UNKNOWN,
    UNREACHABLE,
)

#: what an idempotent apply does with a step (the final event's ``action``)
UNCHANGED = "unchanged"
STARTED = "started"
RESTARTED = "restarted"

#: placeholders where the launch fields depend on the run, not on the program
_NO_NONCE = bytes(handshake.NONCE_BYTES)
_NO_CALLBACK = ("127.0.0.1", 1)


def probe_fields(step: Step) -> dict[str, object]:
    """The launch message's ``ready`` dict for a step's probe."""
    rd = step.ready
    out: dict[str, object] = {"kind": rd.kind, "interval": rd.interval, "settle": rd.settle}
    kind = probes.KINDS.get(rd.kind)
    for field in kind.fields if kind else ():  # an unknown kind: make_launch refuses it
        value = getattr(rd, field)
        out[field] = list(value) if isinstance(value, tuple) else value
    return out


def launch_args(
    step: Step,
    *,
    run: str,
    key_path: str,
    nl: bytes,
    callback: tuple[str, int],
    replace: bool = False,
    files: Sequence[tuple[str, str, int]] = (),
    when: Mapping[str, float] | None = None,
    unchanged: bool = False,
    owner: tuple[str, str] | None = None,
    take_over: bool = False,
    renew: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of launch.make_launch for ``step``; ``files`` are (dest, sha256,
    mode) of its program's files, ``when`` its preconditions, ``unchanged``: an instance of
    the same spec running is proven to the listener rather than refused; ``owner``: (name,
    path) of the launching manifest, recorded on the host; ``take_over``: replace an instance
    another manifest owns; ``renew``: it is replaced (rex restart). The record, lock, log and
    files are named by the whole triple."""
    t = step.timeouts
    return {
        "run": run,
        "step": step.id,
        "triple": step.triple,
        "key_path": key_path,
        "nl": nl,
        "callback": callback,
        "deadlines": {
            "start": t.start,
            "ready": step.ready.timeout,
            "callback": t.callback,
            "stop": step.stop_timeout,
        },
        "argv": step.argv,
        "env": step.env,
        "cwd": step.cwd,
        "ready": probe_fields(step),
        "kind": step.kind,
        "log": step.triple,
        "replace": replace,
        "restart": step.restart,
        "files": tuple(files),
        "when": dict(when or {}),
        "unchanged": unchanged,
        "become": step.become,
        "index": step.index,
        "count": step.count,
        "env_clear": step.env_clear,
        "owner": owner,
        "take_over": take_over,
        "renew": renew,
        "autostart": step.autostart,
    }


def expected_spec(step: Step, files: Sequence[tuple[str, str, int]] = ()) -> str:
    """The spec digest the agent records for ``step`` as the manifest declares it now."""
    return launch.spec_digest(expected_launch(step, files))


def expected_launch(step: Step, files: Sequence[tuple[str, str, int]] = ()) -> launch.Launch:
    """The launch of ``step`` as the manifest declares it now, with placeholders for what
    depends on the run (nonce, callback)."""
    args = launch_args(
        step,
        run="expected",
        key_path=keyfile.key_relpath(step.host, step.user, step.program),
        nl=_NO_NONCE,
        callback=_NO_CALLBACK,
        files=files,
    )
    return launch.parse_launch(launch.make_launch(**args))


def record_of(
    records: Mapping[str, Mapping[str, Any]] | None, step: Step
) -> tuple[str, Mapping[str, Any]] | None:
    """(its name, the record) of ``step``'s triple among a login's records: the one named by
    the triple, else one the layout before named by the program, if it names this triple."""
    if records is None:
        return None
    record = records.get(step.triple)
    if record is not None:
        return step.triple, record
    legacy = records.get(step.program)
    if legacy is not None and legacy.get("triple") == step.triple:
        return step.program, legacy
    return None


def owner_of(record: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(name, path) of the manifest a record names as its owner; None when it names none."""
    name = record.get("manifest") if record is not None else None
    if not isinstance(name, str) or not name or record is None:
        return None
    path = record.get("manifest_path")
    return name, path if isinstance(path, str) else ""


def owned_by_other(record: Mapping[str, Any] | None, manifest: str) -> tuple[str, str] | None:
    """The owner of a record whose program (or its supervisor) lives and that another
    manifest than ``manifest`` launched; None when the step is this manifest's to change."""
    owner = owner_of(record)
    if owner is None or owner[0] == manifest or record is None:
        return None
    if record.get("alive") is not True and record.get("supervised") is not True:
        return None
    return owner


def files_to_upload(
    files: Sequence[tuple[str, str, int]], record: Mapping[str, Any] | None
) -> list[str]:
    """The dests of ``files`` whose content the host (its record's ``files``) lacks."""
    there = record.get("files") if record is not None else None
    held = there if isinstance(there, dict) else {}
    return [dest for dest, sha, _ in files if held.get(dest) != sha]


def parse_status(stdout: bytes) -> dict[str, dict[str, Any]]:
    """The agent's ``--status`` line as {program: record}; ValueError if it is not one."""
    for line in reversed(stdout.splitlines()):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except RecursionError:  # a value nested deeper than json reads: no report either
            break
        if not isinstance(data, dict) or data.get("ok") is not True:
            break
        programs = data.get("programs")
        if not isinstance(programs, list):
            break
        return {
            str(p["name"]): p
            for p in programs
            if isinstance(p, dict) and isinstance(p.get("name"), str)
        }
    raise ValueError("no status report from the agent")


@dataclass(frozen=True)
class StepStatus:
    """One step's status on its host."""

    step: Step
    status: str
    code: int | None = None  # the last exit status (negative: killed by that signal)
    pid: int | None = None
    uptime: float | None = None  # seconds, while running
    restarts: int = 0
    run: str | None = None  # the run that launched it
    detail: str | None = None
    #: (name, path) of the manifest that launched it, as its record names it
    owner: tuple[str, str] | None = None
    #: the host's record of what was launched (its ``launched``: wire.launch.recorded_spec)
    #: and the hashes of the files it holds: host bytes, for ``--diff`` only (core/diff.py)
    launched: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)
    held: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)
    resumed: bool = False  # its host's boot entry started it again (agent --boot)

    @property
    def label(self) -> str:
        """``running``, ``exited(3)``, ``restarting``...: the status with its exit code."""
        if self.status == EXITED and self.code is not None:
            return f"{EXITED}({self.code})"
        if self.status == RUNNING and self.resumed:
            return f"{RUNNING} (resumed at boot)"
        return self.status

    @property
    def current(self) -> bool:
        """Running with the manifest's spec (a job: done with status 0)."""
        if self.step.kind == "job":
            return self.status == EXITED and self.code == 0
        return self.status == RUNNING


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def classify(
    step: Step,
    record: Mapping[str, Any] | None,
    expected: str,
    files: Sequence[tuple[str, str, int]] = (),
) -> StepStatus:
    """The status of ``step`` from its host's record (None: there is none); ``files`` are the
    (dest, sha256, mode) the manifest declares, compared with what the host holds."""
    status = _classify(step, record, expected, files)
    owner = owner_of(record)
    return status if owner is None else dataclasses.replace(status, owner=owner)


def _classify(
    step: Step,
    record: Mapping[str, Any] | None,
    expected: str,
    files: Sequence[tuple[str, str, int]],
) -> StepStatus:
    if record is None:
        return StepStatus(step, ABSENT)
    if record.get("triple") != step.triple:
        return StepStatus(
            step, UNKNOWN, detail=f"the record belongs to {record.get('triple')}, not this triple"
        )
    restarts = _int(record.get("restarts")) or 0
    base: dict[str, Any] = {"restarts": restarts, "run": record.get("run")}
    launched, held = record.get("launched"), record.get("files")
    base["launched"] = launched if isinstance(launched, dict) else None
    base["held"] = held if isinstance(held, dict) else None
    state = record.get("state")
    status_code = _int(record.get("status"))
    if record.get("alive") is True:
        uptime = record.get("uptime")
        base.update(pid=_int(record.get("pid")), code=status_code)
        if isinstance(uptime, (int, float)):
            base["uptime"] = float(uptime)
        if record.get("spec") != expected:
            return StepStatus(step, DRIFTED, detail="runs another spec than the manifest's", **base)
        changed = files_to_upload(files, record)
        if changed:
            detail = "changed on the host: " + ", ".join(changed)
            return StepStatus(step, DRIFTED, detail=detail, **base)
        resumed = isinstance(record.get("resumed"), (int, float))
        return StepStatus(step, RUNNING, resumed=resumed, **base)
    if state == "restarting" and record.get("supervised") is True:
        return StepStatus(step, RESTARTING, code=status_code, **base)
    if state == "exited":
        return StepStatus(step, EXITED, code=status_code, detail=record.get("reason"), **base)
    if state == "stopped":
        return StepStatus(step, STOPPED, code=status_code, **base)
    if state == "failed":
        return StepStatus(step, FAILED, code=status_code, detail=record.get("reason"), **base)
    if state == "declined":
        return StepStatus(step, DECLINED, detail=record.get("reason"), **base)
    return StepStatus(
        step, UNKNOWN, detail=f"recorded {state} but neither program nor supervisor lives", **base
    )


def action_for(status: StepStatus) -> tuple[str, bool]:
    """(action, replace) an idempotent apply takes: running and current is left alone; a
    drifted or restarting instance is replaced by the agent; anything else is launched."""
    if status.step.kind == "job":
        return STARTED, False  # a job runs to completion each time; one at a time
    if status.status == RUNNING:
        return UNCHANGED, False
    if status.status in (DRIFTED, RESTARTING):
        return RESTARTED, True
    return STARTED, False


@dataclass(frozen=True)
class StopResult:
    """What ``rex stop`` did to one step: STOPPED (nothing of it runs now), ABSENT (no record
    on the host), FAILED (the agent could not say it stopped it) or UNREACHABLE."""

    step: Step
    outcome: str
    was: str | None = None  # the recorded state before the stop
    killed: tuple[int, ...] = ()  # pids signalled on the host
    detail: str | None = None
