"""Terminal output, the only module that imports rich: format_* return text, print_* write."""

from __future__ import annotations

import shlex
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from rexplan.cli.failshow import failure_lines, failures_block
from rexplan.core.model import Manifest, Plan, Ready, Step
from rexplan.core.plan import least_loaded
from rexplan.core.spec import StepStatus, StopResult
from rexplan.core.text import LIMIT, format_columns, plural, printable
from rexplan.engine.events import Event
from rexplan.wire.probes import KINDS

__all__ = [
    "ApplyDisplay",
    "Console",
    "Screen",
    "format_command",
    "format_plan_lines",
    "format_plan_summary",
    "format_ready",
    "format_validate_ok",
    "make_console",
    "plan_table",
    "print_plan",
    "print_status",
    "print_stop",
    "print_text",
]


def make_console(*, stderr: bool = False) -> Console:
    """The stdout (or stderr) console; rich honours NO_COLOR, TERM=dumb and non-TTY output."""
    return Console(highlight=False, stderr=stderr)


#: characters of a command shown in a plan (a long shell: script is cut, with a note)
COMMAND_LIMIT = 2000


def format_ready(ready: Ready) -> str:
    """A probe in a few characters: ``tcp:5432``, the URL, ``alive:0.5s``."""
    kind = KINDS.get(ready.kind)
    if kind is None:
        return ready.kind
    return printable(kind.show(ready), COMMAND_LIMIT if kind.long else LIMIT)


def format_command(step: Step) -> str:
    """The step's argv as one shell-quoted line."""
    return printable(shlex.join(step.argv), COMMAND_LIMIT)


def format_plan_summary(plan: Plan) -> str:
    """``12 steps in 3 waves on 6 hosts``."""
    steps = plan.steps
    hosts = len({s.host for s in steps})
    waves = len(plan.waves)
    text = f"{plural(len(steps), 'step')} in {plural(waves, 'wave')} on {plural(hosts, 'host')}"
    return f"{text} (limit {plan.limit})" if plan.limit is not None else text


def plan_placements(plan: Plan, manifest: Manifest) -> dict[str, str]:
    """``least-loaded 2 of 5`` for each candidate step of a least-loaded program, by step id:
    the plan holds every candidate, ``rex apply`` starts that many at the wave."""
    marks: dict[str, str] = {}
    for program, steps in least_loaded(manifest, plan.steps).items():
        count = manifest.program(program).placement.count or len(steps)
        mark = f"least-loaded {min(count, len(steps))} of {len(steps)}"
        marks.update(dict.fromkeys((s.id for s in steps), mark))
    return marks


def format_plan_lines(plan: Plan, manifest: Manifest | None = None) -> str:
    """One line per step for pipes and logs; fields are separated by two spaces.

    ``wave 0  db@web1  web1.postgres.db  ready=tcp:5432  argv=postgres -D /data``

    With the manifest, a candidate step of a least-loaded program gets a field before argv
    (which stays last): ``placement=least-loaded 1 of 3 (chosen at apply)``; a step that
    restarts with other programs gets ``restart_with=store,cache``.
    """
    steps = plan.steps
    marks = plan_placements(plan, manifest) if manifest is not None else {}
    id_width = max((len(s.id) for s in steps), default=0)
    triple_width = max((len(s.triple) for s in steps), default=0)
    lines = [
        f"wave {s.wave}  {s.id:<{id_width}}  {s.triple:<{triple_width}}"
        f"  ready={format_ready(s.ready)}"
        + (f"  placement={marks[s.id]} (chosen at apply)" if s.id in marks else "")
        + (f"  restart_with={','.join(s.restart_with)}" if s.restart_with else "")
        + f"  argv={format_command(s)}"
        for s in steps
    ]
    lines.append(format_plan_summary(plan))
    return "\n".join(lines)


def plan_table(plan: Plan, manifest: Manifest, width: int = 100) -> Table:
    """The plan as a rich table for a ``width``-column terminal, one section per wave.

    Every cell stays on one line; the command gets what the other columns leave and is cut
    with "…". A plan with least-loaded programs gets a placement column, which marks their
    candidate steps.
    """
    marks = plan_placements(plan, manifest)
    caption = format_plan_summary(plan)
    if marks:
        caption += "; least-loaded hosts are chosen at apply"
    table = Table(
        title=Text(manifest.path),
        caption=Text(caption),
        title_justify="left",
        caption_justify="left",
    )
    columns: tuple[str, ...] = ("wave", "program", "host", "user", "triple", "command", "ready")
    if marks:
        columns += ("placement",)
    follows = any(s.restart_with for s in plan.steps)
    if follows:
        columns += ("restart_with",)
    rows = [
        [
            str(s.wave),
            s.program,
            s.host,
            s.login if s.login == s.user else f"{s.user} ({s.login})",
            s.triple,
            format_command(s),
            format_ready(s.ready),
            *([marks.get(s.id, "")] if marks else []),
            *([",".join(s.restart_with)] if follows else []),
        ]
        for s in plan.steps
    ]
    command = columns.index("command")
    widths = [max([len(c), *(cell_len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    # each column costs its text, one space of padding on either side and a border
    others = sum(w + 3 for i, w in enumerate(widths) if i != command)
    budget = max(len("command"), width - 1 - others - 3)
    for i, column in enumerate(columns):
        table.add_column(
            column,
            no_wrap=True,
            overflow="ellipsis",
            max_width=budget if i == command else None,
        )
    wave = plan.steps[0].wave if plan.steps else 0
    for s, row in zip(plan.steps, rows, strict=True):
        if s.wave != wave:
            table.add_section()
            wave = s.wave
        # Text cells: manifest strings are data, never rich markup
        table.add_row(*(Text(cell) for cell in row))
    return table


def print_text(console: Console, text: str) -> None:
    """Write text as is: no markup, highlighting or wrapping (JSON, DOT, plain plans); a
    control character that got this far is still shown as an escape, never sent."""
    text = printable(text, None, keep="\n\t")
    console.file.write(text if text.endswith("\n") else text + "\n")


def print_plan(plan: Plan, manifest: Manifest, console: Console) -> None:
    """The plan as a table on a terminal, as plain lines otherwise."""
    if console.is_terminal:
        console.print(plan_table(plan, manifest, console.width))
    else:
        print_text(console, format_plan_lines(plan, manifest))


def format_validate_ok(path: str, manifest: Manifest, plan: Plan) -> str:
    """``ok: FILE (H hosts, P programs, S steps)``."""
    return (
        f"ok: {path} ({plural(len(manifest.hosts), 'host')}, "
        f"{plural(len(manifest.programs), 'program')}, {plural(len(plan.steps), 'step')})"
    )


# --- rex apply: live progress and the run summary ------------------------------------------

_STATE_STYLE = {
    "ready": "green",
    "unchanged": "green",
    "failed": "bold red",
    "unreachable": "bold magenta",
    "skipped": "yellow",
    "declined": "yellow",
    "unplaced": "dim",
}

#: states shown in the per-wave counts, in this order
_COUNTED = ("ready", "failed", "unreachable", "skipped")

#: the run summary's counts: a step that is up counts by its action, any other by its state
SUMMARY = ("unchanged", "started", "restarted", "failed", "unreachable", "skipped", "declined")


def format_step_line(event: Event) -> str:
    """One grep-friendly line for a step that reached a final state (non-TTY output)."""
    state = (event.state or "").upper()
    text = f"[{event.t:7.2f}s] {state:<11} {event.step} ({event.triple})"
    if event.pid is not None and event.state in ("ready", "unchanged"):
        text += f" pid={event.pid}"
    if event.action is not None and event.state == "ready":
        text += f" {event.action}"
    if event.state not in ("ready", "unchanged"):
        # a stored run (rex blame) may hold anything in any field
        if event.phase:
            text += f" phase={printable(event.phase)}"
        if event.reason:
            text += f" reason={printable(event.reason)}"
        if event.detail:
            text += f": {printable(event.detail)}"
    return text


def format_notice(event: Event) -> str:
    return f"[{event.t:7.2f}s] NOTICE      {printable(event.detail or '')}"


@dataclass
class HostSummary:
    """Per-host totals for the final summary; every host appears exactly once."""

    host: str
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def summarize(final: Iterable[Event]) -> list[HostSummary]:
    """Fold final step events into one row per host, in first-seen order."""
    rows: dict[str, HostSummary] = {}
    for e in final:
        row = rows.setdefault(e.host or "?", HostSummary(e.host or "?"))
        state = e.state or "?"
        key = e.action or state
        row.counts[key] = row.counts.get(key, 0) + 1
        if state not in ("ready", "unchanged"):
            why = e.reason or state
            row.problems.append(f"{e.program}: {why}" + (f" ({e.phase})" if e.phase else ""))
    return list(rows.values())


def format_summary_lines(
    rows: list[HostSummary], counts: dict[str, int], elapsed: float
) -> list[str]:
    """The plain-text summary: one line per host, then the totals."""
    lines = []
    width = max((len(r.host) for r in rows), default=4)
    for r in rows:
        parts = [f"{s}={r.counts[s]}" for s in SUMMARY if r.counts.get(s)]
        text = f"{r.host:<{width}}  {' '.join(parts)}"
        if r.problems:
            text += "  " + "; ".join(printable(p) for p in r.problems)
        lines.append(text)
    total = ", ".join(f"{counts.get(s, 0)} {s}" for s in SUMMARY)
    lines.append(f"{len(rows)} host(s), {sum(counts.values())} step(s): {total} in {elapsed:.2f}s")
    return lines


class ApplyDisplay:
    """The event sink for ``rex apply``: live per-wave bars on a TTY, plain lines otherwise."""

    def __init__(self, console: Console, *, quiet: bool = False, verbose: int = 0) -> None:
        self.console = console
        self.quiet = quiet
        # -v: a line for every state change of every step, not only the final ones
        self.verbose = verbose > 0 and not quiet
        self.live = console.is_terminal and not quiet
        self._lock = threading.Lock()
        self._final: dict[str, Event] = {}
        self._wave_counts: dict[int, dict[str, int]] = {}
        self._progress: Progress | None = None
        self._tasks: dict[int, TaskID] = {}
        self._elapsed = 0.0

    def __enter__(self) -> ApplyDisplay:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._handle(event)

    def _handle(self, e: Event) -> None:
        if e.kind == "notice":
            self._print(format_notice(e), style="cyan")
        elif e.kind == "wave_started" and e.wave is not None:
            self._wave_counts[e.wave] = {}
            if self._progress is not None:
                self._tasks[e.wave] = self._progress.add_task(
                    f"wave {e.wave}", total=e.total or 0, counts=""
                )
            elif not self.quiet:
                self._print(f"[{e.t:7.2f}s] WAVE {e.wave}     {e.total} step(s)")
        elif e.kind == "step" and e.state in _STATE_STYLE and e.step is not None:
            self._final[e.step] = e
            wave = e.wave if e.wave is not None else -1
            counts = self._wave_counts.setdefault(wave, {})
            counts[e.state] = counts.get(e.state, 0) + 1
            failed = e.state not in ("ready", "unchanged", "unplaced")
            if self._progress is not None and wave in self._tasks:
                shown = " ".join(f"{s}:{counts[s]}" for s in _COUNTED if counts.get(s))
                self._progress.update(self._tasks[wave], advance=1, counts=shown)
                if failed or self.verbose:
                    self._print(format_step_line(e), style=_STATE_STYLE[e.state])
            elif not self.quiet or failed:
                self._print(format_step_line(e))
            if failed:
                for line in failure_lines(e):
                    self._print(line, style="dim" if line.startswith("    |") else "yellow")
        elif e.kind == "step" and self.verbose:
            self._print(format_step_line(e), style="dim")
        elif e.kind == "run_done":
            self._elapsed = e.t

    def _print(self, text: str, style: str | None = None) -> None:
        # a terminal gets lines folded at words to its width (its own wrap cuts words); a pipe
        # gets one line per event, whatever its length, for grep
        self.console.print(Text(text, style=style or ""), soft_wrap=not self.console.is_terminal)

    def print_summary(self, counts: dict[str, int]) -> None:
        """Every host exactly once, then the totals; ``counts`` are keyed by SUMMARY."""
        rows = summarize(self._final.values())
        lines = format_summary_lines(rows, counts, self._elapsed)
        if self.console.is_terminal:
            # only the counts some host has, so 80 columns keep host names and problems whole
            shown = [s for s in SUMMARY if any(r.counts.get(s) for r in rows)]
            table = Table(title="rex apply", show_edge=False, pad_edge=False)
            table.add_column("host", no_wrap=True)
            for col in shown:
                table.add_column(col, justify="right", no_wrap=True)
            table.add_column("problems")
            for r in rows:
                table.add_row(
                    r.host,
                    *(str(r.counts.get(s, 0)) for s in shown),
                    Text("; ".join(printable(p) for p in r.problems), style="red"),
                )
            self.console.print(table)
            self.console.print(lines[-1])
        else:
            for line in lines:
                self.console.print(line, soft_wrap=True, highlight=False)
        for line in failures_block(self._final.values()):
            # folded to a terminal's width, as the lines above; one line each in a pipe
            self.console.print(Text(line), soft_wrap=not self.console.is_terminal)


# --- rex status, rex apply --dry-run, rex stop -------------------------------------------------

_STATUS_STYLE = {
    "running": "green",
    "unchanged": "green",
    "drifted": "yellow",
    "restarting": "yellow",
    "restarted": "yellow",
    "started": "cyan",
    "exited": "red",
    "failed": "bold red",
    "declined": "yellow",
    "unknown": "magenta",
    "unreachable": "bold magenta",
    "unplaced": "dim",
    "owned": "bold red",
}


def format_uptime(seconds: float | None) -> str:
    """``42s``, ``5m03s``, ``2h10m``, ``3d04h``; ``-`` when not running."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def status_rows(
    statuses: Iterable[StepStatus], actions: Iterable[str] | None = None
) -> list[list[str]]:
    """step, triple, status, pid, uptime, restarts, owner[, action], detail: one row per
    step; owner: the manifest that launched it, as its record names it (filtered)."""
    rows = []
    planned = list(actions) if actions is not None else None
    for i, st in enumerate(statuses):
        row = [
            st.step.id,
            st.step.triple,
            st.label,
            "-" if st.pid is None else str(st.pid),
            format_uptime(st.uptime),
            str(st.restarts),
            "-" if st.owner is None else printable(st.owner[0]),
        ]
        if planned is not None:
            row.append(planned[i])
        row.append(printable(st.detail or ""))
        rows.append(row)
    return rows


def _tally(values: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{n} {v}" for v, n in counts.items())


def print_status(
    console: Console,
    statuses: Sequence[StepStatus],
    *,
    actions: Sequence[str] | None = None,
    title: str = "rex status",
    notes: Iterable[str] = (),
) -> None:
    """A table on a terminal, aligned lines otherwise; then the totals (by action, if given)
    and a line per note (the least-loaded placements of ``apply --dry-run``)."""
    shown = [printable(n) for n in notes]
    header = ["step", "triple", "status", "pid", "uptime", "restarts", "owner"]
    if actions is not None:
        header.append("action")
    header.append("detail")
    rows = status_rows(statuses, actions)
    total = f"{plural(len(statuses), 'step')}: " + _tally(
        actions if actions is not None else (st.status for st in statuses)
    )
    if console.is_terminal:
        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        for col in header:
            table.add_column(col, no_wrap=col != "detail")
        status_col = header.index("status")
        for row in rows:
            cells = [Text(c) for c in row]
            style = _STATUS_STYLE.get(row[status_col].split("(")[0])
            cells[status_col].stylize(style or "")
            if actions is not None:
                cells[-2].stylize(_STATUS_STYLE.get(row[-2]) or "")
            table.add_row(*cells)
        console.print(table)
        console.print(Text(total))
        for note in shown:
            console.print(Text(note, style="cyan"))
    else:
        print_text(console, "\n".join([*format_columns(header, rows, cell_len), total, *shown]))


def format_stop_line(result: StopResult) -> str:
    """``STOPPED  app@h1 (h1.u.app) was=running killed=2`` and, on failure, why."""
    text = f"{result.outcome.upper():<11} {result.step.id} ({result.step.triple})"
    if result.was is not None and result.outcome != "absent":
        text += f" was={result.was}"
    if result.killed:
        text += f" killed={len(result.killed)}"
    if result.detail:
        text += f": {printable(result.detail)}"
    return text


def print_stop(console: Console, result: StopResult) -> None:
    """One line per stopped step, as it finishes."""
    console.print(
        Text(format_stop_line(result), style=_STATUS_STYLE.get(result.outcome) or ""),
        soft_wrap=True,
    )


def format_stop_summary(results: Sequence[StopResult]) -> str:
    return f"{plural(len(results), 'step')}: " + (_tally(r.outcome for r in results) or "none")


class HostProgress:
    """Host-by-host progress (``rex_key distribute``): a bar on a terminal, lines always."""

    def __init__(self, console: Console, total: int, label: str) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._total = total
        self._label = label

    def __enter__(self) -> HostProgress:
        if self.console.is_terminal and self._total:
            self._progress = Progress(
                TextColumn(self._label),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=self._total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def host_done(self, text: str) -> None:
        """Print one host's report above the bar and advance it."""
        self.console.print(Text(printable(text, None, keep="\n")), soft_wrap=True, highlight=False)
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)


class Screen:
    """The Reporter (rexplan.engine.report) on ``console``: what every command prints through."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def text(self, text: str) -> None:
        print_text(self.console, text)

    def status(self, statuses: Sequence[StepStatus]) -> None:
        print_status(self.console, statuses)

    def dry_run(
        self, statuses: Sequence[StepStatus], actions: Sequence[str], notes: Sequence[str]
    ) -> None:
        print_status(
            self.console, statuses, actions=actions, title="rex apply --dry-run", notes=notes
        )

    def stopped(self, result: StopResult) -> None:
        print_stop(self.console, result)

    def stop_summary(self, results: Sequence[StopResult]) -> None:
        print_text(self.console, format_stop_summary(results))


#: the colours of the steps' prefixes in ``rex logs`` on a terminal, in turn
LOG_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_cyan", "bright_magenta")


class LogPrinter:
    """``rex logs``' lines, ``STEP | text``: the prefixes padded to one width and coloured per
    step on a terminal, plain otherwise. The text is already filtered (engine.logs)."""

    def __init__(self, console: Console, steps: Sequence[str]) -> None:
        self.console = console
        self.width = max((len(s) for s in steps), default=0)
        self.colours = {s: LOG_COLOURS[i % len(LOG_COLOURS)] for i, s in enumerate(steps)}

    def line(self, step: str, text: str) -> None:
        head = printable(step).ljust(self.width)
        if self.console.is_terminal:
            out = Text(head + " | ", style=self.colours.get(step, ""))
            out.append(printable(text, None, keep="\t"))
            self.console.print(out, soft_wrap=True, highlight=False, markup=False)
        else:
            self.console.file.write(f"{head} | {printable(text, None, keep=chr(9))}\n")
            self.console.file.flush()
