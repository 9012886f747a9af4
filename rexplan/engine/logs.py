"""``rex logs``: the programs' output from their hosts, read through the agent's ``--logs``
mode (rexplan.remote.agent.logs) over the hosts' transports: one exec per host and login
(through the persistence daemon when it runs), or with ``follow`` one stream per host and
login (SSH channel or local pipe) until stopped; closing it ends the agent's follower there.

Each line comes back as ``PROGRAM SP TEXT``; the text is the host's bytes, decoded with
replacement and filtered by core.text.printable (tabs kept), at most LINE_LIMIT characters.

``--since`` is defined on the markers the supervisor writes before each start and restart of a
program (``--- rex: run RUN step STEP starting``): a run id begins with the launcher's local
time of that apply (YYYYMMDDTHHMMSS), so a line is shown when the last marker before it names
a run that began at or after the time asked for. Lines before the first marker in what was
read (the tail of a longer log) belong to no known run and are not shown with ``--since``.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rexplan.core.model import MAX_LOG_LINES, Manifest, Plan, Step
from rexplan.core.text import printable
from rexplan.engine.agentctl import EXEC_SLACK, agent_run
from rexplan.errors import TransportError, UsageError
from rexplan.transport.persist import Follower, follow_stream
from rexplan.transport.pool import TransportPool
from rexplan.transport.shipping import (
    bootstrap_argv,
    bootstrap_input,
    launch_argv,
)

#: characters of a log line shown (the agent sends at most 4096 bytes of one)
LINE_LIMIT = 4096
#: bytes read at most as one line of the agent's output: its name, a space, a line, a newline
_READ_LIMIT = 4096 + 512
#: lines asked for at most (-n, and what --since looks through)
MAX_LINES = MAX_LOG_LINES

_MARKER = re.compile(r"^--- rex: run (\d{8}T\d{6})-\S+ step ")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_STAMPS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")


def select_steps(plan: Plan, patterns: Sequence[str]) -> list[Step]:
    """The plan's steps matching any of ``patterns`` (globs on the step id PROGRAM@HOST or
    on the program name), every step without patterns; UsageError for a pattern that
    matches nothing."""
    if not patterns:
        return list(plan.steps)
    chosen: list[Step] = []
    for pattern in patterns:
        hits = [
            s
            for s in plan.steps
            if fnmatch.fnmatchcase(s.id, pattern) or fnmatch.fnmatchcase(s.program, pattern)
        ]
        if not hits:
            raise UsageError(
                f"{pattern!r} matches no step of the plan",
                hint="give a program name or a glob on PROGRAM@HOST ('rex plan' lists them)",
            )
        chosen += [s for s in hits if s not in chosen]
    return [s for s in plan.steps if s in chosen]


def parse_since(text: str, now: float | None = None) -> str:
    """``--since``'s time as a run id's prefix (YYYYMMDDTHHMMSS, local time): a duration back
    from now (``90``, ``30s``, ``10m``, ``2h``, ``1d``) or a local time stamp
    (``2026-12-06T14:30[:00]``, or a date); UsageError otherwise."""
    match = _DURATION.match(text.strip())
    if match:
        ago = float(match.group(1)) * _UNITS[match.group(2)]
        when = (time.time() if now is None else now) - ago
        return time.strftime("%Y%m%dT%H%M%S", time.localtime(when))
    for form in _STAMPS:
        try:
            return time.strftime("%Y%m%dT%H%M%S", time.strptime(text.strip(), form))
        except ValueError:
            continue
    raise UsageError(
        f"--since {text!r}: not a duration (30s, 10m, 2h, 1d) or a local time "
        "(YYYY-MM-DDTHH:MM[:SS])"
    )


def since_filter(lines: Iterable[str], since: str) -> list[str]:
    """The lines after the last start marker naming a run begun at or after ``since``."""
    keep, out = False, []
    for line in lines:
        match = _MARKER.match(line)
        if match:
            keep = match.group(1) >= since
        if keep:
            out.append(line)
    return out


def _text(raw: bytes) -> str:
    return printable(raw.decode("utf-8", errors="replace"), LINE_LIMIT, keep="\t")


@dataclass
class HostLogs:
    """What one host and login said: lines per program, programs without a log, a problem."""

    lines: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    problem: str | None = None


def parse_output(data: bytes) -> tuple[HostLogs, bool]:
    """The agent's ``--logs`` output, and whether it reached ``.end``."""
    got = HostLogs()
    for raw in data.split(b"\n"):
        if raw == b".end":
            return got, True
        _add(got, raw)
    return got, False


def _add(got: HostLogs, raw: bytes) -> str | None:
    """File one output line; the program it belongs to, or None for a meta line."""
    if raw.startswith(b".none "):
        got.missing.append(_text(raw[6:]))
        return None
    name, sep, text = raw.partition(b" ")
    if not sep:
        return None
    program = _text(name)
    got.lines.setdefault(program, []).append(_text(text.rstrip(b"\n")))
    return program


def _groups(steps: Sequence[Step]) -> list[list[Step]]:
    groups: dict[tuple[str, str], list[Step]] = {}
    for s in steps:
        groups.setdefault((s.host, s.login), []).append(s)
    return list(groups.values())


def _args(lines: int, mode: str, group: Sequence[Step]) -> list[str]:
    return ["--logs", str(lines), mode, *dict.fromkeys(s.triple for s in group)]


def read(
    manifest: Manifest, steps: Sequence[Step], pool: TransportPool, *, lines: int, forks: int
) -> list[tuple[list[Step], HostLogs]]:
    """Each host and login's logs of ``steps``: their last ``lines`` lines, in parallel."""

    def one(group: list[Step]) -> HostLogs:
        first = group[0]
        host = manifest.host(first.host)
        try:
            transport = pool.get(host, manifest.user(first.user))
            res = agent_run(
                transport,
                host.python,
                *_args(lines, "once", group),
                timeout=first.timeouts.start + EXEC_SLACK,
            )
        except TransportError as exc:
            return HostLogs(problem=str(exc))
        data = res.stdout
        if res.stdout_cut:  # the head went: the first line may be a piece
            data = data.split(b"\n", 1)[-1]
        got, ended = parse_output(data)
        if not ended:
            why = res.stderr.decode(errors="replace").strip()[-200:] or f"exit {res.exit_status}"
            got.problem = f"the agent gave no logs ({_text(why.encode())})"
        return got

    groups = _groups(steps)
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(groups)))) as workers:
        return list(zip(groups, workers.map(one, groups), strict=True))


def _open(
    manifest: Manifest, group: Sequence[Step], pool: TransportPool, lines: int
) -> tuple[Follower, bytes]:
    """The follower of ``group``'s logs (transport.persist.follow_stream) and its first line:
    the agent copy a launch left on the host, else (the launch stub's report that there is
    none comes first) the bundle sent on stdin, which then stays open: its end is the
    follower's."""
    first = group[0]
    host = manifest.host(first.host)
    args = _args(lines, "follow", group)
    transport = pool.get(host, manifest.user(first.user))
    timeout = first.timeouts.start
    stream = follow_stream(transport, launch_argv(host.python, *args), stdin=b"", timeout=timeout)
    line = stream.readline(_READ_LIMIT)
    if line.startswith(b"{"):  # {"ok": false, "exit": 20, ...}: no agent copy there
        stream.close()
        argv = bootstrap_argv(host.python, *args)
        stream = follow_stream(transport, argv, stdin=bootstrap_input(b""), timeout=timeout)
        line = stream.readline(_READ_LIMIT)
    return stream, line


class Follow:
    """``rex logs -f``: a stream per host and login, each read by a thread that hands
    (step, line) to ``on_line`` (one at a time) and problems to ``on_problem``; ``stop()``
    closes every stream, which ends the followers on the hosts."""

    def __init__(
        self,
        manifest: Manifest,
        steps: Sequence[Step],
        pool: TransportPool,
        *,
        lines: int,
        since: str | None,
        on_line: Callable[[Step, str], None],
        on_problem: Callable[[str, str], None],
    ) -> None:
        self._manifest, self._pool, self._lines, self._since = manifest, pool, lines, since
        #: what the agent is asked for: with --since, all it has, filtered here
        self._ask = MAX_LINES if since is not None else lines
        self._on_line, self._on_problem = on_line, on_problem
        self._groups = _groups(steps)
        self._lock = threading.Lock()
        self._streams: list[Follower] = []
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(g,), daemon=True) for g in self._groups
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self, within: float = 10.0) -> None:
        self._stopped.set()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        end = time.monotonic() + within
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    def _run(self, group: list[Step]) -> None:
        where = f"{group[0].login}@{group[0].host}"
        try:
            stream, pending = _open(self._manifest, group, self._pool, self._ask)
        except (TransportError, OSError) as exc:
            self._on_problem(where, str(exc))
            return
        with self._lock:
            self._streams.append(stream)
            if self._stopped.is_set():
                stream.close()
                return
        by_program = {s.triple: s for s in group}  # logs are named by the triple
        head = HostLogs()
        ended = False
        while True:
            raw, pending = pending or stream.readline(_READ_LIMIT), b""
            if not raw:
                break
            raw = raw.rstrip(b"\n")
            if not ended:
                if raw == b".end":
                    ended = True
                    self._first(head, by_program, where)
                else:
                    _add(head, raw)
                continue
            got = HostLogs()
            program = _add(got, raw)
            if program in by_program:
                with self._lock:
                    self._on_line(by_program[program], got.lines[program][0])
        if not self._stopped.is_set():
            self._on_problem(where, "the follower ended (connection lost?)")

    def _first(self, head: HostLogs, by_program: dict[str, Step], where: str) -> None:
        with self._lock:
            for program, step in by_program.items():
                lines = head.lines.get(program, [])
                if self._since is not None:
                    lines = since_filter(lines, self._since)
                lines = lines[max(0, len(lines) - self._lines) :] if self._lines else []
                for line in lines:
                    self._on_line(step, line)
            for program in head.missing:
                self._on_problem(where, f"{program}: no log yet")
