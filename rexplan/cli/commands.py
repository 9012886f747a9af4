"""``rex validate``, ``rex plan``, ``rex apply``, ``rex restart`` and ``rex disconnect``: the
commands that read a manifest and launch its plan."""

from __future__ import annotations

import argparse
import json
import sys

from rexplan.cli import blame, svg, ui
from rexplan.cli.boundary import MESSAGE_LIMIT, format_error, write_stderr
from rexplan.core import manifest, selection, simulate
from rexplan.core import plan as planner
from rexplan.core.model import MAX_PERSIST, Manifest, Plan
from rexplan.core.text import plural, printable
from rexplan.errors import ManifestError, UsageError


def cmd_validate(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex validate MANIFEST...``: an ok line per good file, the diagnostics of bad ones."""
    failed = 0
    for path in args.manifests:
        try:
            loaded = manifest.load(path)
            compiled = planner.compile(loaded)
        except ManifestError as e:
            failed += 1
            write_stderr(format_error(e))
            continue
        if not args.quiet:
            screen.text(ui.format_validate_ok(path, loaded, compiled))
    return ManifestError.exit_code if failed else 0


def cmd_plan(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex plan MANIFEST``: the table, plain lines, ``--json`` or ``--dot``."""
    loaded = manifest.load(args.manifest)
    compiled = selection.from_args(args, loaded, planner.compile(loaded, limit=args.limit))
    if args.simulate:
        return _simulate(args, len({step.host for step in compiled.steps}), loaded.forks, screen)
    modelling = ("conn_cost", "latency", "agent_cost", "fanout_max", "forks")
    given = [name for name in modelling if getattr(args, name) is not None]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise UsageError(f"{option} needs --simulate", hint=f"rex plan --simulate {option} ...")
    if args.json:
        # ASCII by construction (json escapes every control and non-ASCII character), so it
        # skips print_text's filter: 30 MB for 10,000 hosts x 5 programs
        screen.console.file.write(planner.plan_json(compiled, loaded) + "\n")
    elif args.dot:
        screen.text(planner.plan_to_dot(compiled, loaded))
    elif args.svg:
        blame.write_picture(args.svg, svg.plan_svg(compiled, loaded), screen)
    else:
        ui.print_plan(compiled, loaded, screen.console)
    return 0


def _simulate(args: argparse.Namespace, hosts: int, forks: int, screen: ui.Screen) -> int:
    """``rex plan --simulate``: the launch-time model for the plan's host count."""
    if args.dot or args.svg:
        raise UsageError("--simulate prints a table or --json, not --dot or --svg")
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
        screen.text(json.dumps(doc, indent=2))
    else:
        screen.text(simulate.format_table(estimates, model, cross))
    return 0


def cmd_apply(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex apply MANIFEST``: launch, verify, summarize; the exit code says the worst outcome."""
    from rexplan.engine import retry
    from rexplan.transport import persist as mux  # the transports: only when connecting

    loaded = mux.with_option(manifest.load(args.manifest), args)
    compiled = selection.from_args(args, loaded, planner.compile(loaded, limit=args.limit))
    if args.retry:
        compiled = retry.narrow(loaded, compiled)
    return _launch(args, screen, loaded, compiled)


def cmd_restart(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex restart MANIFEST``: restart the selected steps in wave order, each verified by its
    callback again, and then the steps of the programs that ``restart_with`` them."""
    from rexplan.transport import persist as mux  # the transports: only when connecting

    loaded = mux.with_option(manifest.load(args.manifest), args)
    limited = planner.compile(loaded, limit=args.limit)
    chosen = selection.from_args(args, loaded, limited)
    compiled = selection.with_followers(loaded, chosen, limited)
    forced = frozenset(s.id for s in chosen.steps)
    return _launch(args, screen, loaded, compiled, restart=forced)


def _launch(
    args: argparse.Namespace,
    screen: ui.Screen,
    loaded: Manifest,
    compiled: Plan,
    *,
    restart: frozenset[str] | None = None,
) -> int:
    """apply's and restart's run: confirm, launch, summarize, keep the retry file (apply)."""
    # the engine, transports and keys: only for the commands that connect
    from rexplan.engine import events as ev
    from rexplan.engine import executor, lifecycle, outcomes, retry, runs
    from rexplan.trust.keys import KeyStore, default_known_hosts

    store = KeyStore(args.keys, insecure_ok=args.insecure_keys, warn=_warn)
    known_hosts = default_known_hosts(store, args.known_hosts)
    verb = "apply" if restart is None else "restart"
    if restart is None and args.diff and not args.dry_run:
        raise UsageError(
            "--diff needs --dry-run", hint=f"rex apply {args.manifest} --dry-run --diff"
        )
    if restart is None and args.dry_run:
        forks = args.forks or loaded.forks
        return lifecycle.dry_run(
            loaded, compiled, known_hosts, screen, forks=forks, as_json=args.json, diff=args.diff
        )
    display_console = (
        ui.make_console(stderr=True) if (args.json or args.events == "-") else screen.console
    )
    if not args.yes and sys.stdin.isatty() and display_console.is_terminal:
        ui.print_text(display_console, ui.format_plan_summary(compiled))
        answer = input(f"{verb} {len(compiled.steps)} step(s)? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            write_stderr("rex: nothing applied" if restart is None else "rex: nothing restarted")
            return 0
    sinks: list[ev.Sink] = []
    events_file = None
    if args.events == "-":
        sinks.append(ev.JsonlWriter(sys.stdout))
    elif args.events:
        events_file = open(args.events, "w", encoding="utf-8")
        sinks.append(ev.JsonlWriter(events_file))
    run_id = runs.new_run_id()
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
                tail=args.tail,
                take_over=args.take_over,
                restart=restart or frozenset(),
            )
        display.print_summary(result.actions())
    finally:
        close_run_log()
        if events_file is not None:
            events_file.close()
    unfinished = [r.step.id for r in result.results if r.state in retry.RETRY_STATES]
    retry_file, left = (None, 0)
    if restart is None:
        retry_file, left = retry.update(loaded, compiled, result.run_id, unfinished)
    if left:
        write_stderr(
            f"rex: {plural(left, 'step')} to retry ({retry_file}): "
            f"rex apply {args.manifest} --retry"
        )
    if args.json:
        screen.text(json.dumps(outcomes.result_to_dict(result, loaded), indent=2))
    return result.exit_code()


def cmd_disconnect(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex disconnect``: stop the persistence daemon, if one runs."""
    from rexplan.transport import persist as mux

    pid = mux.MuxClient(MAX_PERSIST).stop()
    if not args.quiet:
        if pid is None:
            screen.text("rex: no connections kept (no daemon in " + mux.mux_dir() + ")")
        else:
            screen.text(f"rex: closed the kept connections (daemon pid {pid})")
    return 0


def _warn(message: str) -> None:
    write_stderr(f"rex: warning: {printable(message, MESSAGE_LIMIT)}")
