"""`rex blame`: where a stored run spent its time, like systemd-analyze blame/critical-chain."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rexplan.cli import svg
from rexplan.core.text import printable
from rexplan.engine import events as ev
from rexplan.engine import runs
from rexplan.errors import UsageError

if TYPE_CHECKING:
    from rexplan.cli import ui

FORMAT = 1

#: the phase a step spends its time in while it is in a state, in the order it passes them
PHASE_OF = {
    ev.CONNECTING: "connect",
    ev.STARTING: "start",
    ev.AWAITING: "callback",
    ev.RUNNING: "run",
}
PHASES = ("connect", "start", "callback", "run")


@dataclass
class StepTiming:
    """One step's time line: when it began and ended, and its time per phase."""

    step: str
    host: str
    program: str
    wave: int | None
    state: str
    start: float
    end: float
    reason: str | None = None
    phase: str | None = None  # where a failure happened
    phases: dict[str, float] = field(default_factory=dict)
    #: (phase, start, end) for each time the step was in a phase, in order
    segments: list[tuple[str, float, float]] = field(default_factory=list)
    launched: bool = False  # False for steps skipped before they began

    @property
    def seconds(self) -> float:
        return self.end - self.start


def step_timings(events: Iterable[ev.Event]) -> list[StepTiming]:
    """Every step of the run, in the order it first appears, with its phase durations."""
    out: dict[str, StepTiming] = {}
    for e in events:
        if e.kind != ev.STEP or e.step is None or e.state is None:
            continue
        st = out.get(e.step)
        if st is None:
            st = out[e.step] = StepTiming(
                step=e.step,
                host=e.host or "?",
                program=e.program or "?",
                wave=e.wave,
                state=e.state,
                start=e.t,
                end=e.t,
            )
        else:
            phase = PHASE_OF.get(st.state)
            if phase is not None:
                st.phases[phase] = st.phases.get(phase, 0.0) + max(0.0, e.t - st.end)
                st.segments.append((phase, st.end, max(st.end, e.t)))
            st.state = e.state
            st.end = e.t
        if e.state in PHASE_OF:
            st.launched = True
        if e.state in ev.FINAL_STATES:
            st.reason, st.phase = e.reason, e.phase
    return list(out.values())


def slowest_steps(timings: Iterable[StepTiming]) -> list[StepTiming]:
    """Launched steps, longest first (ties by step id, so reports are deterministic)."""
    return sorted((t for t in timings if t.launched), key=lambda t: (-t.seconds, t.step))


@dataclass
class HostTiming:
    """A host's span: from its first step's start to its last step's end."""

    host: str
    start: float
    end: float
    steps: int
    slowest: StepTiming

    @property
    def seconds(self) -> float:
        return self.end - self.start


def host_timings(timings: Iterable[StepTiming]) -> list[HostTiming]:
    """One row per host that launched a step, longest span first."""
    by_host: dict[str, list[StepTiming]] = {}
    for t in slowest_steps(timings):
        by_host.setdefault(t.host, []).append(t)
    rows = [
        HostTiming(
            host=host,
            start=min(t.start for t in steps),
            end=max(t.end for t in steps),
            steps=len(steps),
            slowest=steps[0],
        )
        for host, steps in by_host.items()
    ]
    return sorted(rows, key=lambda h: (-h.seconds, h.host))


def slowest_phases(timings: Iterable[StepTiming]) -> dict[str, StepTiming]:
    """For each phase, the step that spent longest in it."""
    out: dict[str, StepTiming] = {}
    for t in slowest_steps(timings):
        for phase in PHASES:
            best = out.get(phase)
            if phase in t.phases and (best is None or t.phases[phase] > best.phases[phase]):
                out[phase] = t
    return out


@dataclass
class ChainLink:
    """A wave and the step it waited for (None when no step of the wave was launched)."""

    wave: int
    began: float
    step: StepTiming | None


def critical_chain(events: Iterable[ev.Event], timings: Iterable[StepTiming]) -> list[ChainLink]:
    """For each wave in order, the launched step that ended last."""
    began: dict[int, float] = {}
    for e in events:
        if e.kind == ev.WAVE_STARTED and e.wave is not None:
            began.setdefault(e.wave, e.t)
    last: dict[int, StepTiming] = {}
    for t in timings:
        if t.wave is None:
            continue
        began.setdefault(t.wave, t.start)
        if t.launched:
            best = last.get(t.wave)
            if best is None or (t.end, best.step) > (best.end, t.step):
                last[t.wave] = t
    return [ChainLink(w, began[w], last.get(w)) for w in sorted(began)]


def analyze(run_id: str, events: Sequence[ev.Event], top: int = 10) -> dict[str, Any]:
    """The report of ``rex blame --json`` (format 1); ``top`` <= 0 keeps every row."""
    timings = step_timings(events)
    done = [e for e in events if e.kind == ev.RUN_DONE]
    counts: dict[str, int] = {}
    for t in timings:
        counts[t.state] = counts.get(t.state, 0) + 1

    def cut(rows: list[Any]) -> list[Any]:
        return rows if top <= 0 else rows[:top]

    return {
        "format": FORMAT,
        "run": run_id,
        "complete": bool(done),
        "seconds": _round(done[-1].t if done else max((e.t for e in events), default=0.0)),
        "counts": dict(sorted(counts.items())),
        "waves": len({t.wave for t in timings if t.wave is not None}),
        "steps": [_step_dict(t) for t in cut(slowest_steps(timings))],
        "hosts": [
            {
                "host": h.host,
                "start": _round(h.start),
                "end": _round(h.end),
                "seconds": _round(h.seconds),
                "steps": h.steps,
                "slowest_step": h.slowest.step,
            }
            for h in cut(host_timings(timings))
        ],
        "phases": {
            phase: {"seconds": _round(t.phases[phase]), "step": t.step}
            for phase, t in slowest_phases(timings).items()
        },
        "critical_chain": [
            {
                "wave": link.wave,
                "wave_start": _round(link.began),
                **(_step_dict(link.step) if link.step else {"step": None}),
            }
            for link in critical_chain(events, timings)
        ],
    }


def _round(seconds: float) -> float:
    return round(seconds, 3)


def _step_dict(t: StepTiming) -> dict[str, Any]:
    return {
        "step": t.step,
        "host": t.host,
        "program": t.program,
        "wave": t.wave,
        "state": t.state,
        "reason": t.reason,
        "phase": t.phase if t.state not in (ev.READY, ev.UNCHANGED) else None,
        "start": _round(t.start),
        "end": _round(t.end),
        "seconds": _round(t.seconds),
        "phases": {p: _round(t.phases[p]) for p in PHASES if p in t.phases},
    }


# --- text ---------------------------------------------------------------------------------


def _secs(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _phase_text(phases: dict[str, float]) -> str:
    text = ", ".join(f"{p} {phases[p]:.1f}s" for p in PHASES if p in phases)
    return f"({text})" if text else ""


def _outcome(row: dict[str, Any]) -> str:
    if row["state"] in (ev.READY, ev.UNCHANGED):
        return ""
    why = [row["reason"], f"in {row['phase']}" if row["phase"] else None]
    return f"  {row['state']}" + (f": {' '.join(w for w in why if w)}" if any(why) else "")


def _columns(rows: Sequence[tuple[str, ...]], indent: str = "  ", align: str = "") -> list[str]:
    """Columns two spaces apart; ``align`` has an ``r`` or ``l`` per column (default: the
    first, a duration, right-aligned and the rest left-aligned)."""
    if not rows:
        return [f"{indent}(none)"]
    align = align or "r" + "l" * (len(rows[0]) - 1)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align, strict=True)
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def format_blame(report: dict[str, Any]) -> str:
    """The plain-text report: header, slowest steps, hosts, phases, critical chain."""
    counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items()) or "no steps"
    head = (
        f"run {report['run']}: {sum(report['counts'].values())} step(s) in "
        f"{report['waves']} wave(s), {_secs(report['seconds'])} ({counts})"
    )
    if not report["complete"]:
        head += " (incomplete: the run did not finish writing its events)"
    lines = [head, "", "slowest steps:"]
    lines += _columns(
        [
            (
                _secs(r["seconds"]),
                r["step"],
                (_phase_text(r["phases"]) + _outcome(r)).strip(),
            )
            for r in report["steps"]
        ]
    )
    lines += ["", "slowest hosts:"]
    lines += _columns(
        [
            (_secs(h["seconds"]), h["host"], f"({h['steps']} step(s); slowest {h['slowest_step']})")
            for h in report["hosts"]
        ]
    )
    lines += ["", "slowest step in each phase:"]
    lines += _columns(
        [(_secs(v["seconds"]), phase, v["step"]) for phase, v in report["phases"].items()]
    )
    lines += ["", "critical chain (the step each wave waited for; @start +duration):"]
    chain = []
    for link in report["critical_chain"]:
        if link["step"] is None:
            chain.append((f"wave {link['wave']}", f"@{_secs(link['wave_start'])}", "", "-"))
        else:
            chain.append(
                (
                    f"wave {link['wave']}",
                    f"@{_secs(link['start'])}",
                    f"+{_secs(link['seconds'])}",
                    link["step"] + _outcome(link),
                )
            )
    chain.append(("done", f"@{_secs(report['seconds'])}", "", ""))
    lines += _columns(chain, align="lrrl")
    return "\n".join(printable(line) for line in lines)


def format_run_list(rows: list[dict[str, Any]]) -> str:
    """``rex blame --list``: one line per stored run, oldest first."""
    if not rows:
        return "no stored runs"
    return "\n".join(
        _columns(
            [
                (
                    r["run"],
                    f"{sum(r['counts'].values())} step(s)",
                    _secs(r["seconds"]),
                    " ".join(f"{s}={n}" for s, n in r["counts"].items()),
                )
                for r in rows
            ],
            indent="",
            align="lrrl",
        )
    )


# --- picture ------------------------------------------------------------------------------

#: the end states drawn as failures (a cross, the label in red)
FAILED_STATES = frozenset({ev.FAILED, ev.UNREACHABLE})


def run_svg(run_id: str, events: Sequence[ev.Event]) -> str:
    """``rex blame --svg``: every step of the run as a row, grouped by wave, with a bar per
    phase, failures marked and the critical chain outlined (see rexplan.cli.svg)."""
    timings = step_timings(events)
    chain = {link.step.step for link in critical_chain(events, timings) if link.step}
    done = [e.t for e in events if e.kind == ev.RUN_DONE]
    total = done[-1] if done else max((e.t for e in events), default=0.0)
    rows = [
        svg.Row(
            label=t.step,
            group=t.wave,
            start=t.start,
            end=t.end,
            bars=tuple(svg.Bar(p, a, b) for p, a, b in t.segments),
            state=t.state,
            note=" ".join(w for w in (t.reason, f"in {t.phase}" if t.phase else None) if w)
            if t.state in FAILED_STATES
            else (t.reason or ""),
            failed=t.state in FAILED_STATES,
            critical=t.step in chain,
        )
        for t in timings
    ]
    return svg.timeline(f"rex run {run_id}", rows, total, PHASES)


def write_picture(path: str, text: str, screen: ui.Screen) -> None:
    """Write an SVG to ``path`` ('-': stdout); UsageError naming the path if it cannot."""
    if path == "-":
        screen.text(text.rstrip("\n"))
        return
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


# --- command line -------------------------------------------------------------------------


def cmd_blame(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex blame [RUN]``: the report of one stored run, or ``--list`` of them all."""
    if args.list:
        if args.svg:
            raise UsageError("--svg draws one run; it does not go with --list")
        rows = []
        for run_id in runs.list_runs():
            _, events = runs.load_run(run_id)
            report = analyze(run_id, events, top=1)
            rows.append({k: report[k] for k in ("run", "complete", "seconds", "counts")})
        text = json.dumps({"format": FORMAT, "runs": rows}, indent=2) if args.json else None
        screen.text(text or format_run_list(rows))
        return 0
    run_id, events = runs.load_run(args.run)
    if args.svg:
        if args.json:
            raise UsageError("--svg draws a picture; it does not go with --json")
        write_picture(args.svg, run_svg(run_id, events), screen)
        return 0
    report = analyze(run_id, events, top=args.top)
    screen.text(json.dumps(report, indent=2) if args.json else format_blame(report))
    return 0
