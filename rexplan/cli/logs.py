"""``rex logs``: the programs' output from their hosts, each line prefixed by its step
(rexplan.engine.logs reads it; ui.LogPrinter shows it)."""

from __future__ import annotations

import argparse
import textwrap
import threading
import time
from typing import Any

from rexplan.cli import ui
from rexplan.cli.boundary import MESSAGE_LIMIT, write_stderr
from rexplan.core import manifest
from rexplan.core import plan as planner
from rexplan.core.model import Step
from rexplan.core.text import printable
from rexplan.engine import lifecycle
from rexplan.engine import logs as hostlogs
from rexplan.errors import UsageError
from rexplan.transport import persist as mux
from rexplan.trust.keys import KeyStore, default_known_hosts

_EPILOG = """\
Each line is printed as 'STEP | text' (the step's prefix coloured on a terminal).
A program's output is kept on its host in logs/PROGRAM.log of the login's rex
home (~/.rex, or $REX_HOME); when that file holds fewer than N lines the newest
rotated file, PROGRAM.log.1, is read too. Host text is shown with control
characters escaped, at most 4096 characters a line.

--since WHEN: WHEN is a duration back from now (90, 30s, 10m, 2h, 1d) or a local
time (2026-12-06T14:30, 2026-12-06 14:30:00, 2026-12-06). Log lines carry no
time stamps; rex knows a line's time only from the marker the agent writes
before each start and restart ('--- rex: run RUN step STEP starting'), whose run
id begins with the launcher's local time of that apply. A line is shown when the
last marker before it names a run begun at or after WHEN: the output of the
applies since WHEN, restarts included.

exit codes:
  0    the logs were printed
  3    a host was unreachable, or its agent gave no logs (the others are printed)
  4    the manifest or the plan is invalid
  5    usage error: a pattern that matches no step, a bad -n or --since
  6    authentication or host key failure
  130  interrupted (the normal end of -f)
  141  the output pipe was closed early (rex logs -f ... | head)
"""


def _lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= hostlogs.MAX_LINES:
        raise argparse.ArgumentTypeError(f"must be from 0 to {hostlogs.MAX_LINES}")
    return value


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``rex logs`` on ``rex``'s subcommands."""
    parser = subparsers.add_parser(
        "logs",
        help="show the programs' output from their hosts, -f to follow it",
        description=textwrap.fill(
            "Print the last lines of what each step's program wrote (stdout and stderr), "
            "read from its host by the rex agent: one SSH exec per host and login, in "
            "parallel (through the persistence daemon when it runs). With -f, follow every "
            "host at once, one SSH channel per host and login (on the daemon's kept "
            "connection with persist), until Ctrl-C; closing the channel ends the follower "
            "on the host. Jobs, services and transport: local programs alike.",
            79,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", metavar="MANIFEST")
    parser.add_argument(
        "steps",
        nargs="*",
        metavar="STEP_OR_PATTERN",
        help="only these steps: a program name or a glob on PROGRAM@HOST (default: all)",
    )
    parser.add_argument(
        "-n",
        "--lines",
        type=_lines,
        default=10,
        metavar="N",
        help="the last N lines of each step (default 10; 0: none, e.g. with -f)",
    )
    parser.add_argument(
        "-f", "--follow", action="store_true", help="then print new lines as they come"
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only the output of the runs begun since WHEN (a duration back from now: 10m, "
        "2h, 1d; or a local time: 2026-12-06T14:30); see below",
    )
    parser.add_argument(
        "--limit",
        metavar="PATTERN",
        help="only steps on matching hosts: comma-separated host globs and group:NAME",
    )
    parser.add_argument(
        "--forks",
        type=_lines,
        metavar="N",
        help="hosts asked at once (default: the manifest's defaults.forks, 64)",
    )
    parser.add_argument(
        "--keys",
        metavar="DIR",
        help="the key store, for its known_hosts (default: $REX_KEYS, else ./keys)",
    )
    parser.add_argument(
        "--known-hosts",
        metavar="FILE",
        help="pinned SSH host keys (default: known_hosts in the key store if present, else "
        "~/.ssh/known_hosts); unknown or changed host keys are refused",
    )
    mux.add_option(parser)
    parser.set_defaults(func=cmd_logs, collect="steps")


def _problem(where: str, why: str) -> None:
    write_stderr(f"rex: {printable(where)}: {printable(why, MESSAGE_LIMIT)}")


def cmd_logs(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex logs MANIFEST [STEP_OR_PATTERN...]``: the last lines, or -f follows them."""
    if args.forks is not None and args.forks < 1:
        raise UsageError("--forks must be at least 1")
    since = hostlogs.parse_since(args.since) if args.since is not None else None
    loaded = mux.with_option(manifest.load(args.manifest), args)
    compiled = planner.compile(loaded, limit=args.limit)
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
            lines = got.lines.get(step.program, [])
            if since is not None:
                lines = hostlogs.since_filter(lines, since)
            for text in lines[max(0, len(lines) - args.lines) :] if args.lines else []:
                printer.line(step.id, text)
            if step.program in got.missing:
                _problem(step.id, f"no log on {where} yet")
    return 3 if failed else 0
