"""``rex run PATTERN -m MANIFEST -- CMD ARGS...``: an ad-hoc job on matching hosts (REX's rexecve).

The command becomes a ``kind: job`` program named ``run`` on every host of the manifest, the
plan keeps the hosts PATTERN matches (as ``--limit``), and the executor launches it like any
step: same keys (``host.user.run``, else the ``host.user`` key), same authorization (the
manifest must authorize ``host.user.run``), same callback proof. The agent keeps the verified
connection, sends the exit status and the tail of the output; if rex goes away the job is
killed. Output is folded like ``dshbak -c``: hosts with identical output and status are shown
once. The exit code is the worst of the hosts' statuses and the launch's own failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any

from rexplan.core.model import Manifest, Program, Ready
from rexplan.core.text import printable
from rexplan.engine import events as ev
from rexplan.engine.outcomes import AUTH_REASONS
from rexplan.engine.report import Reporter
from rexplan.errors import UsageError
from rexplan.transport import persist as mux
from rexplan.trust.keys import KeyStore, default_known_hosts

#: the program name of every ad-hoc job (its key: host/user/run.key, else host/user.key)
PROGRAM = "run"
#: rex stops an interrupted ad-hoc job this fast
STOP_GRACE = 2.0


def adhoc_manifest(manifest: Manifest, user: str | None, argv: Sequence[str]) -> Manifest:
    """``manifest`` with one job program, ``run``, on all its hosts as ``user``; without it,
    on each host as its ``hosts.*.user``, else defaults.user, else the only user."""
    if not argv:
        raise UsageError("no command to run", hint="rex run PATTERN -m MANIFEST -- CMD ARGS...")
    names = [u.name for u in manifest.users]
    # without --user, a host's own user (hosts.*.user) first, as for programs naming none
    own = {} if user else {h.name: h.user for h in manifest.hosts if h.user in names}
    chosen = user or manifest.default_user or (names[0] if len(names) == 1 else None)
    if chosen is None and own and len(own) == len(manifest.hosts):
        chosen = own[manifest.hosts[0].name]
    if chosen is None:
        raise UsageError(
            "which user? the manifest has no defaults.user", hint="--user " + " | ".join(names)
        )
    if chosen not in names:
        raise UsageError(f"unknown user {chosen!r}", hint="users: " + ", ".join(names))
    job = Program(
        name=PROGRAM,
        hosts=tuple(h.name for h in manifest.hosts),
        host_users=tuple((h, u) for h, u in own.items() if u != chosen),
        user=chosen,
        run=tuple(argv),
        kind="job",
        ready=Ready(kind="alive", settle=0.05),
        stop_timeout=STOP_GRACE,
    )
    return dataclasses.replace(manifest, programs=(job,))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One host's result: its exit status (None: the job did not run to its end)."""

    host: str
    status: int | None
    output: str
    problem: str | None = None  # why there is no status: unreachable, failed launch...
    code: int = 0  # rex's exit code for the problem: 2 failed, 3 unreachable, 6 authentication


def outcomes(final: Iterable[ev.Event]) -> list[Outcome]:
    """Each host's outcome from the steps' final events."""
    out = []
    for e in final:
        if e.status is not None:
            out.append(Outcome(e.host or "?", e.status, e.output or ""))
            continue
        problem = f"{e.state}: {e.reason or '-'}" + (f": {e.detail}" if e.detail else "")
        code = 2
        if e.state == ev.UNREACHABLE:
            code = 3
        elif e.reason in AUTH_REASONS:
            code = 6
        out.append(Outcome(e.host or "?", None, e.output or "", problem, code))
    return out


def fold(results: Sequence[Outcome]) -> list[tuple[list[str], Outcome]]:
    """dshbak -c: hosts with identical output, status and problem share one entry, in the
    order each first appears; the hosts of an entry keep their order."""
    groups: dict[tuple[str, int | None, str | None], list[str]] = {}
    first: dict[tuple[str, int | None, str | None], Outcome] = {}
    for r in results:
        key = (r.output, r.status, r.problem)
        groups.setdefault(key, []).append(r.host)
        first.setdefault(key, r)
    return [(hosts, first[key]) for key, hosts in groups.items()]


def format_folded(results: Sequence[Outcome]) -> str:
    """The folded output as text: a ruled header naming the hosts (and any non-zero status or
    problem), then the output they share."""
    blocks = []
    for hosts, r in fold(results):
        title = ",".join(hosts)
        if r.problem is not None:
            title += f" ({printable(r.problem)})"
        elif r.status:
            title += f" (exit {r.status})"
        rule = "-" * min(max(len(title), 16), 78)
        # the hosts' bytes: their lines and tabs, never a control sequence for the terminal
        output = printable(r.output, None, keep="\n\t")
        body = output if not output or output.endswith("\n") else output + "\n"
        blocks.append(f"{rule}\n{title}\n{rule}\n{body}")
    return "".join(blocks)


def results_to_dict(run: str, results: Sequence[Outcome]) -> dict[str, Any]:
    """``rex run --json``: format 1; every host once, and the dshbak-style groups."""
    return {
        "format": 1,
        "run": run,
        "exit": exit_code(results),
        "hosts": [
            {"host": r.host, "status": r.status, "output": r.output, "problem": r.problem}
            for r in results
        ],
        "groups": [
            {"hosts": hosts, "status": r.status, "output": r.output, "problem": r.problem}
            for hosts, r in fold(results)
        ],
    }


def exit_code(results: Sequence[Outcome]) -> int:
    """The worst of the hosts' exit statuses (killed by signal N: 128+N) and of the codes of
    hosts that gave none."""
    worst = 0
    for r in results:
        if r.status is None:
            worst = max(worst, r.code)
        else:
            worst = max(worst, r.status if r.status >= 0 else 128 - r.status)
    return worst


def cmd_run(args: argparse.Namespace, out: Reporter) -> int:
    """``rex run``: launch the job on the matching hosts, print the folded output."""
    from rexplan.core import manifest as manifests
    from rexplan.core import plan as plans
    from rexplan.engine import executor

    loaded = mux.with_option(manifests.load(args.manifest), args)
    loaded = adhoc_manifest(loaded, args.user, args.command)
    compiled = plans.compile(loaded, limit=args.pattern)
    store = KeyStore(args.keys, insecure_ok=args.insecure_keys)
    final: dict[str, ev.Event] = {}
    sinks: list[ev.Sink] = []

    def keep(event: ev.Event) -> None:
        if event.kind == ev.STEP and event.state in ev.FINAL_STATES and event.step:
            final[event.step] = event

    sinks.append(keep)
    events_file = None
    if args.events == "-":
        raise UsageError(
            "rex run prints the hosts' output on stdout", hint="give --events a file name"
        )
    if args.events:
        events_file = open(args.events, "w", encoding="utf-8")
        sinks.append(ev.JsonlWriter(events_file))
    try:
        result = executor.apply(
            loaded,
            compiled,
            keys=store,
            known_hosts=default_known_hosts(store, args.known_hosts),
            emit=ev.fan_out(*sinks),
            forks=args.forks,
        )
    finally:
        if events_file is not None:
            events_file.close()
    results = outcomes(final[s.id] for s in compiled.steps if s.id in final)
    if args.json:
        doc = results_to_dict(result.run_id, results)
        out.text(json.dumps(doc, indent=2, sort_keys=True))
    else:
        out.text(format_folded(results))
    return 130 if result.interrupted else exit_code(results)
