"""``rex logs``: the programs' output from their hosts, each line prefixed by its step
(rexplan.engine.logs reads it; ui.LogPrinter shows it)."""

from __future__ import annotations

import argparse
import threading
import time

from rexplan.cli import ui
from rexplan.cli.boundary import MESSAGE_LIMIT, write_stderr
from rexplan.core import manifest, selection
from rexplan.core import plan as planner
from rexplan.core.model import Step
from rexplan.core.text import printable
from rexplan.engine import lifecycle
from rexplan.engine import logs as hostlogs
from rexplan.errors import UsageError
from rexplan.transport import persist as mux
from rexplan.trust.keys import KeyStore, default_known_hosts


def _problem(where: str, why: str) -> None:
    write_stderr(f"rex: {printable(where)}: {printable(why, MESSAGE_LIMIT)}")


def cmd_logs(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex logs MANIFEST [STEP_OR_PATTERN...]``: the last lines, or -f follows them."""
    if args.forks is not None and args.forks < 1:
        raise UsageError("--forks must be at least 1")
    since = hostlogs.parse_since(args.since) if args.since is not None else None
    loaded = mux.with_option(manifest.load(args.manifest), args)
    compiled = selection.from_args(args, loaded, planner.compile(loaded, limit=args.limit))
    steps = hostlogs.select_steps(compiled, args.steps)
    known_hosts = default_known_hosts(KeyStore(args.keys), args.known_hosts)
    printer = ui.LogPrinter(screen.console, [s.id for s in steps])
    ask = hostlogs.MAX_LINES if since is not None else args.lines
    with lifecycle.pool_for(loaded, compiled, known_hosts) as pool:
        if args.follow:
            broken = threading.Event()  # stdout closed (rex logs -f | head): as plan's 141

            def show(step: Step, text: str) -> None:
                if not broken.is_set():
                    try:
                        printer.line(step.id, text)
                    except BrokenPipeError:
                        broken.set()

            follower = hostlogs.Follow(
                loaded,
                steps,
                pool,
                lines=args.lines,
                since=since,
                on_line=show,
                on_problem=_problem,
            )
            follower.start()
            try:
                while follower.running() and not broken.is_set():
                    time.sleep(0.2)
            finally:
                follower.stop()
            if broken.is_set():
                raise BrokenPipeError
            return 3  # every follower ended by itself: connections lost
        results = hostlogs.read(loaded, steps, pool, lines=ask, forks=args.forks or loaded.forks)
    failed = False
    for group, got in results:
        where = f"{group[0].login}@{group[0].host}"
        if got.problem is not None:
            failed = True
            _problem(where, got.problem)
            continue
        for step in group:
            lines = got.lines.get(step.triple, [])
            if since is not None:
                lines = hostlogs.since_filter(lines, since)
            for text in lines[max(0, len(lines) - args.lines) :] if args.lines else []:
                printer.line(step.id, text)
            if step.program in got.missing:
                _problem(step.id, f"no log on {where} yet")
    return 3 if failed else 0
