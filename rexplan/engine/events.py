"""Run events emitted by the executor, and the JSONL writer for ``--events``."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import IO

from rexplan.core.text import LIMIT, printable

#: characters an event's ``detail`` keeps (its host-given words are cut and escaped here)
DETAIL_LIMIT = 4 * LIMIT
#: characters of ``reason`` and ``phase``: short words by design
WORD_LIMIT = 64
#: characters of a failed step's output tail (several lines) and of its log's host:path
TAIL_LIMIT = 4096
_BOUNDED = (
    ("detail", DETAIL_LIMIT),
    ("reason", WORD_LIMIT),
    ("phase", WORD_LIMIT),
    ("hint", DETAIL_LIMIT),
    ("log", LIMIT),
)

#: step states, in the order a healthy step passes through them
PENDING = "pending"
CONNECTING = "connecting"
STARTING = "starting"
AWAITING = "awaiting-callback"
RUNNING = "running"  # a verified job, until it exits
READY = "ready"
FAILED = "failed"
UNREACHABLE = "unreachable"
SKIPPED = "skipped"
UNCHANGED = "unchanged"
DECLINED = "declined"  # the host proved it would not run the step now (``when``)
UNPLACED = "unplaced"  # least-loaded placement chose other hosts for the program

FINAL_STATES = frozenset({READY, FAILED, UNREACHABLE, SKIPPED, UNCHANGED, DECLINED, UNPLACED})

#: event kinds
RUN_STARTED = "run_started"
WAVE_STARTED = "wave_started"
STEP = "step"  # a step changed state; ``state`` says to what
WAVE_DONE = "wave_done"
RUN_DONE = "run_done"
NOTICE = "notice"  # something the user should know (key created, warning)


@dataclass(frozen=True)
class Event:
    """One thing that happened in a run; ``t`` is seconds since the run started."""

    kind: str
    t: float
    run: str
    wave: int | None = None
    step: str | None = None
    host: str | None = None
    program: str | None = None
    triple: str | None = None
    state: str | None = None
    phase: str | None = None  # connect | start | callback | ready, for failures
    reason: str | None = None  # short machine-readable cause, e.g. no_callback
    detail: str | None = None  # one human line; never a secret
    pid: int | None = None
    action: str | None = None  # a step's final event: started | restarted | unchanged
    status: int | None = None  # a job's exit status
    output: str | None = None  # the tail of a job's output
    tail: str | None = None  # a failed step: the last lines its program wrote (--tail)
    log: str | None = None  # host:path of the program's log, for a failed step
    hint: str | None = None  # a failed step: what to run or change next
    total: int | None = None  # steps in the wave / run, for progress totals
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a host's words reach every sink (terminal, --events, the run log): bounded, one line
        for name, limit in _BOUNDED:
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, printable(value, limit))
        if isinstance(self.tail, str):
            object.__setattr__(self, "tail", printable(self.tail, TAIL_LIMIT, keep="\n"))

    def to_json(self) -> str:
        # a shallow read: asdict() deep-copies every value, once per event per sink
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data = {k: v for k, v in data.items() if v is not None and v != {}}
        return json.dumps(data, sort_keys=True)


Sink = Callable[[Event], None]


class JsonlWriter:
    """Writes one JSON object per event; thread-safe, flushed per line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()


def fan_out(*sinks: Sink) -> Sink:
    """One sink that forwards every event to each of ``sinks`` in order."""

    def emit(event: Event) -> None:
        for sink in sinks:
            sink(event)

    return emit
