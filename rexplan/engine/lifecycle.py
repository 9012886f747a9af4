"""``rex status`` and ``rex stop``: read and end what a manifest runs, in parallel over SSH.

Both run the agent in one of its modes (agentctl.agent_run: the copy a launch left on the
host, else the bundle piped over stdin), so reading or stopping never writes a file to a
host. ``survey`` reads each host's records with one exec per host and login, whatever the
number of steps there, and classifies every step (spec.classify). ``stop`` goes through the
waves in reverse order, dependents first, in parallel within a wave: the agent tells each
program's supervisor to stop it (TERM to the group, the stop grace, KILL, then every process
still tagged with the triple), or with ``force`` kills supervisor, group and tagged processes
at once.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rexplan.core import diff as diffs
from rexplan.core import selection
from rexplan.core import spec as specs
from rexplan.core.model import Manifest, Plan, Step, Timeouts
from rexplan.engine import bootentry
from rexplan.engine import events as ev
from rexplan.engine.agentctl import EXEC_SLACK, agent_run, local_files
from rexplan.engine.placement import Load, Placed, place, probe_candidate
from rexplan.engine.report import Reporter
from rexplan.errors import TransportError, UsageError
from rexplan.transport import persist as mux
from rexplan.transport.base import last_report
from rexplan.transport.pool import TransportPool
from rexplan.trust.keys import KeyStore, default_known_hosts

_log = logging.getLogger(__name__)

STOPPED, ABSENT, STOP_FAILED, UNREACHABLE = (
    specs.STOPPED,
    specs.ABSENT,
    specs.FAILED,
    specs.UNREACHABLE,
)


def _by_login(steps: Sequence[Step]) -> list[list[Step]]:
    groups: dict[tuple[str, str], list[Step]] = {}
    for s in steps:
        groups.setdefault((s.host, s.login), []).append(s)
    return list(groups.values())


def _workers(forks: int, jobs: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(forks, jobs)))


def survey(
    manifest: Manifest, steps: Sequence[Step], pool: TransportPool, *, forks: int = 64
) -> list[specs.StepStatus]:
    """Every step's status on its host, in the order of ``steps``."""

    def read(group: list[Step]) -> list[specs.StepStatus]:
        first = group[0]
        host = manifest.host(first.host)
        try:
            transport = pool.get(host, manifest.user(first.user))
            res = agent_run(transport, host.python, "--status", timeout=first.timeouts.start)
        except TransportError as exc:
            return [specs.StepStatus(s, specs.UNREACHABLE, detail=str(exc)) for s in group]
        try:
            records = specs.parse_status(res.stdout)
        except ValueError:
            why = res.stderr.decode(errors="replace").strip()[-200:] or f"exit {res.exit_status}"
            detail = f"the agent gave no status report ({why})"
            return [specs.StepStatus(s, specs.UNKNOWN, detail=detail) for s in group]
        return [status(s, specs.record_of(records, s)) for s in group]

    def status(step: Step, found: tuple[str, Any] | None) -> specs.StepStatus:
        record = None if found is None else found[1]
        try:
            files = [f.entry for f in local_files(step.files)]
        except OSError as exc:
            return specs.StepStatus(step, specs.UNKNOWN, detail=f"cannot read {exc.filename}")
        return specs.classify(step, record, specs.expected_spec(step, files), files)

    groups = _by_login(steps)
    with _workers(forks, len(groups)) as workers:
        found = {st.step.id: st for sts in workers.map(read, groups) for st in sts}
    return [found[s.id] for s in steps]


#: the dry-run action of a step whose triple runs for another manifest (apply fails it)
OWNED = "owned"
#: statuses whose program or supervisor lives: another manifest's instance is its own
_LIVE = (specs.RUNNING, specs.DRIFTED, specs.RESTARTING)


def planned_action(status: specs.StepStatus, manifest: str | None = None) -> str:
    """What ``rex apply`` of manifest ``manifest`` would do with a step in this status
    (``apply --dry-run``): ``owned`` when its triple runs for another manifest."""
    if status.status == specs.UNREACHABLE:
        return UNREACHABLE
    owner = status.owner
    if manifest is not None and owner is not None and owner[0] != manifest:
        if status.status in _LIVE:
            return OWNED
    return specs.action_for(status)[0]


def placements(
    manifest: Manifest,
    statuses: Sequence[specs.StepStatus],
    pool: TransportPool,
    *,
    forks: int = 64,
) -> list[Placed]:
    """Least-loaded placement as ``rex apply`` would make it now: every candidate host probed
    (one exec on its connection), whether the program runs there current taken from its
    status; an unreachable host counts as not probed, as it would in apply."""
    by_id = {st.step.id: st for st in statuses}

    def probe(step: Step) -> Load:
        st = by_id[step.id]
        if st.status == specs.UNREACHABLE:
            return Load(None, 0, False)
        host = manifest.host(step.host)
        return probe_candidate(
            lambda: pool.get(host, manifest.user(step.user)),
            host,
            step.timeouts.start,
            lambda _transport: st.current,
        )

    return place(manifest, [st.step for st in statuses], probe, forks=forks)


def dry_run_actions(
    statuses: Sequence[specs.StepStatus], placed: Sequence[Placed], manifest: str | None = None
) -> list[str]:
    """What ``rex apply`` (of manifest ``manifest``) would do with each step: ``unplaced``
    for a least-loaded candidate it would not choose, else the step's planned_action."""
    left_out = {s.id for p in placed for s in p.unplaced()}
    return [
        ev.UNPLACED if st.step.id in left_out else planned_action(st, manifest) for st in statuses
    ]


def placement_to_dict(placed: Placed) -> dict[str, object]:
    """One program's least-loaded placement as ``apply --dry-run --json`` shows it."""
    return {
        "program": placed.program,
        "chosen": [s.id for s, _ in placed.candidates if s.id in placed.chosen],
        "candidates": [
            {
                "id": s.id,
                "host": s.host,
                "load": load.per_cpu,
                "source": None if load.per_cpu is None else load.source,
                "fallback": load.fallback or None,
                "free_mb": None if load.per_cpu is None else load.free_mb,
                "current": load.current,
            }
            for s, load in placed.candidates
        ],
        "detail": placed.describe(),
    }


def status_exit_code(statuses: Sequence[specs.StepStatus], manifest: Manifest) -> int:
    """0 when every step runs with the manifest's spec (a least-loaded program: ``count`` of
    its steps), else 2."""
    per_program: dict[str, list[specs.StepStatus]] = {}
    for st in statuses:
        per_program.setdefault(st.step.program, []).append(st)
    for program, mine in per_program.items():
        placement = manifest.program(program).placement
        needed = len(mine)
        if placement.strategy == "least-loaded" and placement.count is not None:
            needed = min(placement.count, needed)
        if sum(st.current for st in mine) < needed:
            return 2
    return 0


def _stop_timeout(step: Step) -> float:
    # the supervisor's grace, then the group's, then the tagged sweep's, each with KILL's 2 s
    return 3 * (step.stop_timeout + 2.0) + EXEC_SLACK


def stop_step(
    manifest: Manifest, step: Step, pool: TransportPool, *, force: bool
) -> specs.StopResult:
    """Stop one step through its host's agent, which finds the triple's record (also one of
    the layout before, named by the program)."""
    host = manifest.host(step.host)
    args = ["--stop", step.triple, f"{step.stop_timeout:g}", *(["force"] if force else [])]
    try:
        transport = pool.get(host, manifest.user(step.user))
        res = agent_run(transport, host.python, *args, timeout=_stop_timeout(step))
    except TransportError as exc:
        return specs.StopResult(step, UNREACHABLE, detail=str(exc))
    report = last_report(res.stdout)
    if report.get("ok") is not True:
        why = report.get("reason") or res.stderr.decode(errors="replace").strip()[-200:]
        return specs.StopResult(step, STOP_FAILED, detail=str(why or f"exit {res.exit_status}"))
    was = report.get("was")
    killed = tuple(p for p in report.get("killed", ()) if isinstance(p, int))
    outcome = ABSENT if was == ABSENT else STOPPED
    return specs.StopResult(step, outcome, str(was) if was is not None else None, killed)


def stop(
    manifest: Manifest,
    plan: Plan,
    pool: TransportPool,
    *,
    forks: int = 64,
    force: bool = False,
    on_result: Callable[[specs.StopResult], None] | None = None,
) -> list[specs.StopResult]:
    """Stop the plan's steps (selection.select narrows it): last wave first, each wave in
    parallel; results in the order they were stopped."""
    results: list[specs.StopResult] = []
    for wave in reversed(plan.waves):
        steps = list(wave)
        if not steps:
            continue
        with _workers(forks, len(steps)) as workers:
            for result in workers.map(lambda s: stop_step(manifest, s, pool, force=force), steps):
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results


def stop_exit_code(results: Sequence[specs.StopResult]) -> int:
    """2 if a stop failed, 3 if a host was unreachable, else 0."""
    outcomes = {r.outcome for r in results}
    if STOP_FAILED in outcomes:
        return 2
    if UNREACHABLE in outcomes:
        return 3
    return 0


def status_to_dict(
    statuses: Sequence[specs.StepStatus],
    manifest: Manifest,
    *,
    actions: bool = False,
    placed: Sequence[Placed] = (),
) -> dict[str, object]:
    """The stable JSON of ``rex status --json`` (and, with ``actions`` and the ``placed``
    programs, of ``apply --dry-run --json``), format 1."""
    counts: dict[str, int] = {}
    steps = []
    planned = dry_run_actions(statuses, placed, manifest.name) if actions else []
    for i, st in enumerate(statuses):
        counts[st.status] = counts.get(st.status, 0) + 1
        row: dict[str, object] = {
            "id": st.step.id,
            "wave": st.step.wave,
            "host": st.step.host,
            "program": st.step.program,
            "triple": st.step.triple,
            "status": st.status,
            "label": st.label,
            "code": st.code,
            "pid": st.pid,
            "uptime": st.uptime,
            "restarts": st.restarts,
            "run": st.run,
            "detail": st.detail,
            "owner": None if st.owner is None else {"name": st.owner[0], "path": st.owner[1]},
        }
        if st.step.become is not None:
            row["become"] = st.step.become  # the account it runs as (sudo -n)
        if actions:
            row["action"] = planned[i]
        steps.append(row)
    doc: dict[str, object] = {
        "format": 1,
        "manifest": manifest.path,
        "manifest_digest": manifest.digest,
        "exit": status_exit_code(statuses, manifest),
        "counts": counts,
        "steps": steps,
    }
    if actions:
        doc["placements"] = [placement_to_dict(p) for p in placed]
    return doc


# --- the command line ---------------------------------------------------------------------------


def pool_for(manifest: Manifest, plan: Plan, known_hosts: str | None) -> TransportPool:
    """One transport per host and login, with the plan's longest connect deadline; through
    the connection persistence daemon with the manifest's ``persist``."""
    connect = max((s.timeouts.connect for s in plan.steps), default=10.0)
    return mux.transport_pool(
        known_hosts=known_hosts, timeouts=Timeouts(connect=connect), persist=manifest.persist
    )


def _load(args: argparse.Namespace) -> tuple[Manifest, Plan, str | None, int]:
    from rexplan.core import manifest as manifests
    from rexplan.core import plan as plans

    if args.forks is not None and args.forks < 1:
        raise UsageError("--forks must be at least 1")
    loaded = mux.with_option(manifests.load(args.manifest), args)
    compiled = selection.from_args(args, loaded, plans.compile(loaded, limit=args.limit))
    known_hosts = default_known_hosts(KeyStore(args.keys), args.known_hosts)
    return loaded, compiled, known_hosts, args.forks or loaded.forks


def cmd_status(args: argparse.Namespace, out: Reporter) -> int:
    """``rex status MANIFEST``: every step's status on its host; 0 only if all run current."""
    loaded, compiled, known_hosts, forks = _load(args)
    with pool_for(loaded, compiled, known_hosts) as pool:
        statuses = survey(loaded, compiled.steps, pool, forks=forks)
    if args.json:
        out.text(json.dumps(status_to_dict(statuses, loaded), indent=2))
    else:
        out.status(statuses)
    return status_exit_code(statuses, loaded)


def dry_run(
    loaded: Manifest,
    compiled: Plan,
    known_hosts: str | None,
    out: Reporter,
    *,
    forks: int,
    as_json: bool,
    diff: bool = False,
) -> int:
    """``rex apply --dry-run``: what apply would do to each step, from the hosts' records
    and, for least-loaded programs, their candidate hosts' load now (the probe apply runs);
    nothing is started, stopped or written. 3 if a host was unreachable, else 0. ``diff``:
    also the fields in which each drifted step's host record differs (core/diff.py)."""
    with pool_for(loaded, compiled, known_hosts) as pool:
        statuses = survey(loaded, compiled.steps, pool, forks=forks)
        placed = placements(loaded, statuses, pool, forks=forks)
    actions = dry_run_actions(statuses, placed, loaded.name)
    if as_json:
        doc = status_to_dict(statuses, loaded, actions=True, placed=placed)
        doc["exit"] = 3 if UNREACHABLE in actions else 0
        if diff:
            rows = doc["steps"]
            assert isinstance(rows, list)
            for row, st in zip(rows, statuses, strict=True):
                found = _changes(loaded, st)
                row["diff"] = None if found is None else [c.to_dict() for c in found]
        out.text(json.dumps(doc, indent=2))
    else:
        out.dry_run(statuses, actions, [p.describe() for p in placed])
        for st in statuses if diff else ():
            if st.status == specs.DRIFTED:
                out.text(diffs.format_changes(st, _changes(loaded, st)))
    return 3 if UNREACHABLE in actions else 0


def _changes(manifest: Manifest, st: specs.StepStatus) -> list[diffs.Change] | None:
    """A drifted step's changed fields ([] for any other step); None when its host keeps no
    launched specification, or the program's files cannot be read here."""
    if st.status != specs.DRIFTED:
        return []
    try:
        files = [f.entry for f in local_files(manifest.program(st.step.program).files)]
    except OSError:
        return None
    return diffs.changes(st, files)


def cmd_stop(args: argparse.Namespace, out: Reporter) -> int:
    """``rex stop MANIFEST``: stop the steps, dependents first; a line per step, then totals."""
    loaded, compiled, known_hosts, forks = _load(args)
    with pool_for(loaded, compiled, known_hosts) as pool:
        results = stop(
            loaded,
            compiled,
            pool,
            forks=forks,
            force=args.force,
            on_result=out.stopped,
        )
        # the boot entries of the logins it stopped programs of: removed when no autostart
        # program is left there to resume
        stopped = [r.step for r in results if r.outcome == STOPPED]
        bootentry.sync_all(
            loaded, stopped, pool, lambda _host, text: _log.warning("%s", text), forks=forks
        )
    out.stop_summary(results)
    return stop_exit_code(results)
