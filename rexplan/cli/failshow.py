"""The lines under a failed step in ``rex apply``'s output: the last lines of its program's
output, where its whole log is, and what to run next. They are shown under the FAILED line as
it comes and again after the summary, so the reason is on the screen when the run ends."""

from __future__ import annotations

from collections.abc import Iterable

from rexplan.core.text import printable
from rexplan.engine.events import Event

#: what starts each line of a program's output, under its step's FAILED line
OUTPUT_PREFIX = "    | "


def failure_lines(event: Event) -> list[str]:
    """``    | LINE`` per output line, ``    log: host:path``, ``    hint: ...``: escaped
    (a stored run, read by rex blame, may hold anything)."""
    lines = [OUTPUT_PREFIX + printable(line) for line in (event.tail or "").split("\n") if line]
    if event.log:
        lines.append(f"    log: {printable(event.log)}")
    if event.hint:
        lines.append(f"    hint: {printable(event.hint, None)}")
    return lines


def failures_block(final: Iterable[Event]) -> list[str]:
    """After the summary: each failed step that has output, a log or a hint, with them."""
    out: list[str] = []
    for e in final:
        if e.state in ("ready", "unchanged", "unplaced"):
            continue
        lines = failure_lines(e)
        if not lines:
            continue
        head = f"{e.step} ({e.triple}) {e.state}"
        if e.detail:
            head += f": {printable(e.detail)}"
        out += [head, *lines]
    return out
