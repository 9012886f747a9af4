"""The ``rex`` command line: argparse subcommands behind one error boundary."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from rexplan import __version__
from rexplan.cli import blame, completion, importer, ui
from rexplan.core import manifest, simulate
from rexplan.core import plan as planner
from rexplan.core.text import printable
from rexplan.engine import adhoc, lifecycle, retry, runs
from rexplan.engine import events as ev
from rexplan.errors import ManifestError, RexError, UsageError
from rexplan.transport import persist as mux
from rexplan.trust import audit, hostkeys
from rexplan.trust.keys import KeyStore, default_known_hosts

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

#: characters one error message (or one log record) may show
MESSAGE_LIMIT = 4000


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors go through the error boundary (exit 5)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"run '{self.prog} --help' for usage")


def build_parser() -> argparse.ArgumentParser:
    """The ``rex`` parser; each subcommand sets ``func`` to its ``cmd_<name>(args, console)``."""
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
    validate.set_defaults(func=cmd_validate)

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
    plan.add_argument(
        "--limit",
        metavar="PATTERN",
        help="only steps on matching hosts: comma-separated host globs and group:NAME",
    )
    plan.add_argument(
        "--simulate",
        action="store_true",
        help="print the expected launch time of the plan's hosts with flat, ring and k-ary "
        "tree fan-out instead of the plan (a model; nothing is measured)",
    )
    plan.add_argument(
        "--conn-cost",
        type=_milliseconds,
        metavar="MS",
        help=f"with --simulate: one SSH connection's cost (default {simulate.CONN_COST_MS:g})",
    )
    plan.add_argument(
        "--latency",
        type=_milliseconds,
        metavar="MS",
        help=f"with --simulate: a network round trip (default {simulate.LATENCY_MS:g}, loopback)",
    )
    plan.add_argument(
        "--agent-cost",
        type=_milliseconds,
        metavar="MS",
        help="with --simulate: the agent's start, probe and callback "
        f"(default {simulate.AGENT_COST_MS:g})",
    )
    plan.add_argument(
        "--fanout-max",
        type=_fanout,
        metavar="K",
        help=f"with --simulate: trees for k = 2..K (default {simulate.FANOUT_MAX})",
    )
    plan.add_argument(
        "--forks",
        type=_positive_int,
        metavar="N",
        help="with --simulate: launches in flight per node (default: the manifest's forks)",
    )
    plan.set_defaults(func=cmd_plan)

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
    apply.add_argument("manifest", metavar="MANIFEST")
    apply.add_argument(
        "--limit",
        metavar="PATTERN",
        help="only steps on matching hosts: comma-separated host globs and group:NAME",
    )
    apply.add_argument(
        "--forks",
        type=_positive_int,
        metavar="N",
        help="steps in flight at once (default: the manifest's defaults.forks, 64)",
    )
    apply.add_argument(
        "--strategy",
        choices=("flat", "tree"),
        help="fan-out: flat (connect to every host) or tree (connect to defaults.fanout relays, "
        "which launch the other hosts); default: the manifest's defaults.strategy, flat",
    )
    apply.add_argument(
        "--events",
        metavar="FILE",
        help="write every event as one JSON object per line to FILE ('-': stdout, and the "
        "progress display moves to stderr)",
    )
    apply.add_argument(
        "--json",
        action="store_true",
        help="print the run result as JSON on stdout (the progress display moves to stderr)",
    )
    apply.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask for confirmation (rex asks only when stdin and stdout are a terminal)",
    )
    apply.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        # SUPPRESS: an absent `apply -q` must not reset a global `rex -q`
        default=argparse.SUPPRESS,
        help="print only failures and the summary (as 'rex -q apply')",
    )
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="only read each host's records (and probe the load of least-loaded programs' "
        "hosts) and show what apply would do per step (unchanged, started, restarted, "
        "unplaced); nothing is started, stopped or written",
    )
    apply.add_argument(
        "--retry",
        action="store_true",
        help="launch only the steps the last apply of MANIFEST left failed, unreachable or "
        "skipped (kept in $REX_STATE_DIR/retry/<manifest name>.json, default ./.rex)",
    )
    _key_options(apply)
    mux.add_option(apply)
    apply.set_defaults(func=cmd_apply)

    hostkeys.add_parser(commands)
    completion.add_parser(commands)
    importer.add_parser(commands)
    audit.add_parser(commands)
    blame.add_parser(commands)
    lifecycle.add_parser(commands)
    disconnect = commands.add_parser(
        "disconnect",
        help="close the SSH connections kept open by persist",
        description="Stop your connection persistence daemon (started by runs with --persist "
        "or the manifest's defaults.persist): every SSH connection it keeps is closed. It "
        "stops by itself after that many seconds without use.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    disconnect.set_defaults(func=cmd_disconnect)
    adhoc.add_parser(commands)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError("must be a number of milliseconds, 0 or more")
    return value


def _fanout(text: str) -> int:
    value = _positive_int(text)
    if not 2 <= value <= 64:
        raise argparse.ArgumentTypeError("must be from 2 to 64")
    return value


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys", metavar="DIR", help="the key store (default: $REX_KEYS, else ./keys)"
    )
    parser.add_argument(
        "--known-hosts",
        metavar="FILE",
        help="pinned SSH host keys (default: known_hosts in the key store if present, else "
        "~/.ssh/known_hosts); unknown or changed host keys are refused",
    )
    parser.add_argument(
        "--insecure-keys",
        action="store_true",
        help="load keys with loose permissions anyway (warns every time)",
    )


def cmd_validate(args: argparse.Namespace, console: ui.Console) -> int:
    """``rex validate MANIFEST...``: an ok line per good file, the diagnostics of bad ones."""
    failed = 0
    for path in args.manifests:
        try:
            loaded = manifest.load(path)
            compiled = planner.compile(loaded)
        except ManifestError as e:
            failed += 1
            _write_stderr(format_error(e))
            continue
        if not args.quiet:
            ui.print_text(console, ui.format_validate_ok(path, loaded, compiled))
    return ManifestError.exit_code if failed else 0


def cmd_plan(args: argparse.Namespace, console: ui.Console) -> int:
    """``rex plan MANIFEST``: the table, plain lines, ``--json`` or ``--dot``."""
    loaded = manifest.load(args.manifest)
    compiled = planner.compile(loaded, limit=args.limit)
    if args.simulate:
        return _simulate(args, len({step.host for step in compiled.steps}), loaded.forks, console)
    modelling = ("conn_cost", "latency", "agent_cost", "fanout_max", "forks")
    given = [name for name in modelling if getattr(args, name) is not None]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise UsageError(f"{option} needs --simulate", hint=f"rex plan --simulate {option} ...")
    if args.json:
        ui.print_text(console, json.dumps(planner.plan_to_dict(compiled, loaded), indent=2))
    elif args.dot:
        ui.print_text(console, planner.plan_to_dot(compiled, loaded))
    else:
        ui.print_plan(compiled, loaded, console)
    return 0


def _simulate(args: argparse.Namespace, hosts: int, forks: int, console: ui.Console) -> int:
    """``rex plan --simulate``: the launch-time model for the plan's host count."""
    if args.dot:
        raise UsageError("--simulate prints a table or --json, not --dot")
    model = simulate.CostModel(
        conn_cost=simulate.CONN_COST_MS if args.conn_cost is None else args.conn_cost,
        latency=simulate.LATENCY_MS if args.latency is None else args.latency,
        agent_cost=simulate.AGENT_COST_MS if args.agent_cost is None else args.agent_cost,
        forks=args.forks or forks,
    )
    fanout_max = args.fanout_max or simulate.FANOUT_MAX
    estimates = simulate.simulate(hosts, model, fanout_max)
    cross = simulate.crossover(model, fanout_max)
    if args.json:
        doc = simulate.to_dict(estimates, model, cross)
        ui.print_text(console, json.dumps(doc, indent=2))
    else:
        ui.print_text(console, simulate.format_table(estimates, model, cross))
    return 0


def cmd_apply(args: argparse.Namespace, console: ui.Console) -> int:
    """``rex apply MANIFEST``: launch, verify, summarize; the exit code says the worst outcome."""
    from rexplan.engine import executor  # imports the transport stack only when launching

    loaded = mux.with_option(manifest.load(args.manifest), args)
    compiled = planner.compile(loaded, limit=args.limit)
    if args.retry:
        compiled = retry.narrow(loaded, compiled)
    store = KeyStore(args.keys, insecure_ok=args.insecure_keys, warn=_warn)
    known_hosts = default_known_hosts(store, args.known_hosts)
    if args.dry_run:
        forks = args.forks or loaded.forks
        return lifecycle.dry_run(
            loaded, compiled, known_hosts, console, forks=forks, as_json=args.json
        )
    display_console = ui.make_console(stderr=True) if (args.json or args.events == "-") else console
    if not args.yes and sys.stdin.isatty() and display_console.is_terminal:
        ui.print_text(display_console, ui.format_plan_summary(compiled))
        answer = input(f"apply {len(compiled.steps)} step(s)? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            _write_stderr("rex: nothing applied")
            return 0
    sinks: list[ev.Sink] = []
    events_file = None
    if args.events == "-":
        sinks.append(ev.JsonlWriter(sys.stdout))
    elif args.events:
        events_file = open(args.events, "w", encoding="utf-8")
        sinks.append(ev.JsonlWriter(events_file))
    run_id = executor.new_run_id()
    run_log, close_run_log = runs.open_run_log(run_id, warn=_warn)
    sinks.append(run_log)
    try:
        with ui.ApplyDisplay(display_console, quiet=args.quiet, verbose=args.verbose) as display:
            result = executor.apply(
                loaded,
                compiled,
                keys=store,
                known_hosts=known_hosts,
                emit=ev.fan_out(display, *sinks),
                forks=args.forks,
                run_id=run_id,
                strategy=args.strategy,
            )
        display.print_summary(result.actions())
    finally:
        close_run_log()
        if events_file is not None:
            events_file.close()
    unfinished = [r.step.id for r in result.results if r.state in retry.RETRY_STATES]
    retry_file, left = retry.update(loaded, compiled, result.run_id, unfinished)
    if left:
        _write_stderr(
            f"rex: {_plural(left, 'step')} to retry ({retry_file}): "
            f"rex apply {args.manifest} --retry"
        )
    if args.json:
        ui.print_text(console, json.dumps(executor.result_to_dict(result, loaded), indent=2))
    return result.exit_code()


def cmd_disconnect(args: argparse.Namespace, console: ui.Console) -> int:
    """``rex disconnect``: stop the persistence daemon, if one runs."""
    pid = mux.MuxClient(mux.MAX_PERSIST).stop()
    if not args.quiet:
        if pid is None:
            ui.print_text(console, "rex: no connections kept (no daemon in " + mux.mux_dir() + ")")
        else:
            ui.print_text(console, f"rex: closed the kept connections (daemon pid {pid})")
    return 0


def _warn(message: str) -> None:
    _write_stderr(f"rex: warning: {printable(message, MESSAGE_LIMIT)}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_error(error: RexError) -> str:
    """What the user sees for an expected error: no traceback, a hint when one is known.

    A ManifestError shows every diagnostic, then a count per file. Every message goes through
    rexplan.core.text.printable: it may quote a host or a manifest.
    """
    diagnostics = error.diagnostics if isinstance(error, ManifestError) else ()
    if diagnostics:
        lines = [printable(d.format(), MESSAGE_LIMIT, keep="\n") for d in diagnostics]
        per_file: dict[str, int] = {}
        for d in diagnostics:
            per_file[d.file] = per_file.get(d.file, 0) + 1
        lines += [
            f"rex: error: {_plural(n, 'error')} in {printable(f)}" for f, n in per_file.items()
        ]
    else:
        # an error may quote a host (an SSH failure, the persistence daemon's log)
        message = printable(str(error), MESSAGE_LIMIT, keep="\n")
        lines = [f"rex: error: {message}"]
    if error.hint:
        lines.append(f"  hint: {printable(error.hint, MESSAGE_LIMIT)}")
    return "\n".join(lines)


def _write_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _log_internal_error(error: BaseException, argv: Sequence[str]) -> str:
    """Write the traceback to a new log file; its path, or a reason it could not be written."""
    text = f"rex {__version__}\nargv: {list(argv)}\n\n" + "".join(
        traceback.format_exception(type(error), error, error.__traceback__)
    )
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    for directory in (Path(state) / "rex", Path(tempfile.gettempdir())):
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="rex-internal-error-", suffix=".log", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            continue
        return path
    return "no log file could be written"


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (tests and embedders swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # records may quote a peer or a host: escaped and cut, as every host's words are
            _write_stderr(printable(self.format(record), MESSAGE_LIMIT, keep="\n"))
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


def main(argv: list[str] | None = None) -> int:
    """Run ``rex`` with ``argv`` (default: the process's) and return the exit code."""
    args_list = sys.argv[1:] if argv is None else argv
    try:
        try:
            args = build_parser().parse_args(args_list)
        except SystemExit as e:
            # --help and --version print, then exit through argparse; usage errors never do
            return e.code if isinstance(e.code, int) else 0
        with _logging_to_stderr(args.verbose, args.quiet):
            code: int = args.func(args, ui.make_console())
        return code
    except RexError as e:
        _write_stderr(format_error(e))
        return e.exit_code
    except KeyboardInterrupt:
        _write_stderr("rex: interrupted")
        return 130
    except BrokenPipeError:
        # the reader went away (`rex plan ... | head`); silence the flush at exit, as cat does
        _silence_stdout()
        return 141
    except Exception as e:
        where = _log_internal_error(e, args_list)
        what = printable(f"{type(e).__name__}: {e}")
        _write_stderr(f"rex: internal error: {what} (traceback in {where})")
        return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        # stdout is not a real file (tests, embedding): nothing will flush into a closed pipe
        return
