"""The failure policy: what a step's failure skips (its dependents), when it ends the run, and
how a wave's steps are batched (``serial``)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from rexplan.core.model import FailurePolicy, Step
from rexplan.engine import events as ev
from rexplan.engine.outcomes import StepResult


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


def abort_reason(
    program: str, results: Iterable[StepResult], policies: dict[str, FailurePolicy]
) -> str | None:
    """After a step of ``program`` ended: why the run ends now, if the program's failures
    exceed its policy; else None."""
    policy = policies.get(program, FailurePolicy())
    mine = [r for r in results if r.step.program == program and r.state != ev.UNPLACED]
    failed = sum(1 for r in mine if counts_as_failure(r.state, policy))
    if not exceeds(policy, failed, len(mine)):
        return None
    return f"{failed} of {len(mine)} steps of {program} failed ({limit(policy)})"


def blocked_by(
    step: Step, results: Iterable[StepResult], policies: dict[str, FailurePolicy]
) -> str | None:
    """Why ``step`` cannot start: a required program has a step that is not ready (a declined
    one does not count, nor an unreachable one if that program ignores unreachable hosts:
    dependents go on without that host)."""
    bad: dict[str, int] = {}
    for r in results:
        if r.step.program not in step.requires or r.state in (
            ev.READY,
            ev.UNCHANGED,
            ev.UNPLACED,
            ev.DECLINED,
        ):
            continue
        policy = policies.get(r.step.program, FailurePolicy())
        if not (r.state == ev.UNREACHABLE and policy.ignore_unreachable):
            bad[r.step.program] = bad.get(r.step.program, 0) + 1
    if not bad:
        return None
    return "requires " + ", ".join(f"{p} ({n} not ready)" for p, n in sorted(bad.items()))
