"""The ``rex`` command line: its argparse parser, and ``main`` behind the error boundary."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from rexplan import __version__
from rexplan.cli import options, subcommands
from rexplan.cli.boundary import MESSAGE_LIMIT, run_main, write_stderr
from rexplan.core import selection, simulate
from rexplan.core.text import printable
from rexplan.engine.failout import DEFAULT_TAIL
from rexplan.errors import UsageError

EXIT_CODES = """\
exit codes:
  0    success
  1    internal error (the traceback is kept in a log file under $XDG_STATE_HOME/rex)
  2    a step failed
  3    a host was unreachable
  4    the manifest or the plan is invalid
  5    usage error
  6    authentication or host key failure
  130  interrupted
  141  the output pipe was closed early (rex plan ... | head)
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors go through the error boundary (exit 5)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"run '{self.prog} --help' for usage")


def build_parser() -> argparse.ArgumentParser:
    """The ``rex`` parser; each subcommand sets ``func`` to its ``cmd_<name>(args, screen)``."""
    parser = _Parser(
        prog="rex",
        description="Launch programs on many hosts from one YAML manifest; every launch is "
        "verified by an authenticated callback.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rex {__version__}")
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more detail: -v a line for every state change of every step, -vv also the "
        "callback listener's handshake lines (stderr), -vvv debug logging",
    )
    chatter.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only failures, errors and summaries",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    validate = commands.add_parser(
        "validate",
        help="check manifests and report every problem",
        description="Check each manifest (YAML, schema, names, references, cycles, "
        "authorization) and that it compiles into a plan. No host is contacted.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("manifests", nargs="+", metavar="MANIFEST")
    validate.set_defaults(func=options.Lazy("rexplan.cli.commands", "cmd_validate"))

    plan = commands.add_parser(
        "plan",
        help="show the launch waves and steps of a manifest",
        description="Show the waves of steps (program x host, as its user) rex would launch. "
        "A table on a terminal, one line per step otherwise. No host is contacted.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("manifest", metavar="MANIFEST")
    output = plan.add_mutually_exclusive_group()
    output.add_argument(
        "--json", action="store_true", help="print the plan as JSON (format 1, stable)"
    )
    output.add_argument("--dot", action="store_true", help="print a Graphviz graph of programs")
    output.add_argument(
        "--svg",
        metavar="FILE",
        help="draw the waves and the requires arrows as an SVG picture in FILE ('-': stdout)",
    )
    plan.add_argument(
        "--limit",
        metavar="PATTERN",
        help="only steps on matching hosts: comma-separated host globs and group:NAME",
    )
    selection.add_options(plan)
    plan.add_argument(
        "--simulate",
        action="store_true",
        help="print the expected launch time of the plan's hosts with flat, ring and k-ary "
        "tree fan-out instead of the plan (a model; nothing is measured)",
    )
    plan.add_argument(
        "--conn-cost",
        type=options.MILLISECONDS,
        metavar="MS",
        help=f"with --simulate: one SSH connection's cost (default {simulate.CONN_COST_MS:g})",
    )
    plan.add_argument(
        "--latency",
        type=options.MILLISECONDS,
        metavar="MS",
        help=f"with --simulate: a network round trip (default {simulate.LATENCY_MS:g}, loopback)",
    )
    plan.add_argument(
        "--agent-cost",
        type=options.MILLISECONDS,
        metavar="MS",
        help="with --simulate: the agent's start, probe and callback "
        f"(default {simulate.AGENT_COST_MS:g})",
    )
    plan.add_argument(
        "--fanout-max",
        type=options.FANOUT,
        metavar="K",
        help=f"with --simulate: trees for k = 2..K (default {simulate.FANOUT_MAX})",
    )
    plan.add_argument(
        "--forks",
        type=options.POSITIVE,
        metavar="N",
        help="with --simulate: launches in flight per node (default: the manifest's forks)",
    )
    plan.set_defaults(func=options.Lazy("rexplan.cli.commands", "cmd_plan"))

    apply = commands.add_parser(
        "apply",
        help="launch every step of a manifest, each verified by its callback",
        description="Launch the plan wave by wave over SSH (or locally for transport: local). "
        "A step counts as ready only when its program is up, passed its readiness probe, and "
        "its agent called back proving the triple's key; SSH's exit status is not trusted. "
        "A step whose requirement failed is skipped; independent programs go on. Keys of "
        "transport: local triples are created on first use. The run's events are kept in "
        ".rex/runs/RUN.jsonl under the current directory ($REX_STATE_DIR/runs when set; the "
        "last 20 runs) for 'rex blame'.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _launch_options(apply)
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="only read each host's records (and probe the load of least-loaded programs' "
        "hosts) and show what apply would do per step (unchanged, started, restarted, "
        "unplaced); nothing is started, stopped or written",
    )
    apply.add_argument(
        "--diff",
        action="store_true",
        help="with --dry-run: per changed (drifted) step, the fields in which the host's "
        "record of its launch differs from the manifest (run, env, cwd, ready, kind, restart, "
        "files by name and hash); with --json, a diff list per step",
    )
    apply.add_argument(
        "--retry",
        action="store_true",
        help="launch only the steps the last apply of MANIFEST left failed, unreachable or "
        "skipped (kept in $REX_STATE_DIR/retry/<manifest name>.json, default ./.rex)",
    )
    apply.set_defaults(func=options.Lazy("rexplan.cli.commands", "cmd_apply"))

    restart = commands.add_parser(
        "restart",
        help="restart steps of a manifest in wave order, each verified by its callback",
        description="Restart the selected steps (--limit, --program, --tags; default: all) "
        "in wave order, a program after those it requires: each running instance is "
        "replaced, even one that runs the manifest's spec, and every step is verified by its "
        "callback again, as in apply. Programs with restart_with: [P] are restarted after P "
        "whenever P was. A step not running is started.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _launch_options(restart)
    restart.set_defaults(func=options.Lazy("rexplan.cli.commands", "cmd_restart"))

    subcommands.add_hostkeys(commands)
    subcommands.add_completion(commands, parsers)
    subcommands.add_import(commands)
    subcommands.add_audit(commands)
    subcommands.add_blame(commands)
    subcommands.add_lifecycle(commands)
    subcommands.add_logs(commands)
    disconnect = commands.add_parser(
        "disconnect",
        help="close the SSH connections kept open by persist",
        description="Stop your connection persistence daemon (started by runs with --persist "
        "or the manifest's defaults.persist): every SSH connection it keeps is closed. It "
        "stops by itself after that many seconds without use.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    disconnect.set_defaults(func=options.Lazy("rexplan.cli.commands", "cmd_disconnect"))
    subcommands.add_run(commands)
    return parser


def _launch_options(parser: argparse.ArgumentParser) -> None:
    """The options ``rex apply`` and ``rex restart`` share."""
    parser.add_argument("manifest", metavar="MANIFEST")
    options.limit(parser)
    options.forks(
        parser,
        "steps in flight at once (default: the manifest's defaults.forks, 64)",
        options.POSITIVE,
    )
    parser.add_argument(
        "--strategy",
        choices=("flat", "tree"),
        help="fan-out: flat (connect to every host) or tree (connect to defaults.fanout relays, "
        "which launch the other hosts); default: the manifest's defaults.strategy, flat",
    )
    parser.add_argument(
        "--events",
        metavar="FILE",
        help="write every event as one JSON object per line to FILE ('-': stdout, and the "
        "progress display moves to stderr)",
    )
    options.flag(
        parser,
        "--json",
        "print the run result as JSON on stdout (the progress display moves to stderr)",
    )
    parser.add_argument(
        "--tail",
        type=options.number(int, "a whole number", 0, 10000, "must be from 0 to 10000"),
        default=DEFAULT_TAIL,
        metavar="N",
        help="a failed step shows the last N lines of its program's output (at most 4 KiB; "
        f"default {DEFAULT_TAIL}, 0: none) and where its whole log is (host:path)",
    )
    parser.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask for confirmation (rex asks only when stdin and stdout are a terminal)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        # SUPPRESS: an absent `apply -q` must not reset a global `rex -q`
        default=argparse.SUPPRESS,
        help="print only failures and the summary (as 'rex -q apply')",
    )
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="replace the programs another manifest launched on the same host.user.program "
        "triples (their records name it: see 'rex status'), instead of failing those steps "
        "'owned'",
    )
    selection.add_options(parser)
    options.keys(parser, insecure="load keys with loose permissions anyway (warns every time)")
    options.persist(parser)


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (tests and embedders swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # records may quote a peer or a host: escaped and cut, as every host's words are
            write_stderr(printable(self.format(record), MESSAGE_LIMIT, keep="\n"))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _logging_to_stderr(verbose: int, quiet: bool) -> Iterator[None]:
    """``rexplan.*`` log records on stderr for one command: warnings by default, errors only
    with -q, info with -vv (the callback listener's handshake lines), debug with -vvv."""
    if quiet:
        level = logging.ERROR
    elif verbose >= 3:
        level = logging.DEBUG
    else:
        level = logging.INFO if verbose == 2 else logging.WARNING
    logger = logging.getLogger("rexplan")
    handler = _StderrHandler(level)
    handler.setFormatter(logging.Formatter("rex: %(name)s: %(message)s"))
    saved = logger.level
    logger.addHandler(handler)
    if level < logger.getEffectiveLevel():
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """``rex``'s and ``rex_key``'s parsers, by command name: what shell completion walks."""
    from rexplan.cli import rex_key

    return [("rex", build_parser()), ("rex_key", rex_key.build_parser())]


def _run(argv: Sequence[str]) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # argparse takes a command's positionals in one run: those of a command that
        # collects them (``rex logs M -n 5 PATTERN``) may also come after its options
        collect = getattr(args, "collect", None)
        if extra and collect and not any(e.startswith("-") for e in extra):
            setattr(args, collect, [*getattr(args, collect), *extra])
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:
        # --help and --version print, then exit through argparse; usage errors never do
        return e.code if isinstance(e.code, int) else 0
    from rexplan.cli import ui  # rich: only once a command runs

    with _logging_to_stderr(args.verbose, args.quiet):
        code: int = args.func(args, ui.Screen(ui.make_console()))
    return code


def main(argv: list[str] | None = None) -> int:
    """Run ``rex`` with ``argv`` (default: the process's) and return the exit code."""
    return run_main("rex", _run, sys.argv[1:] if argv is None else argv)
