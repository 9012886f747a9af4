"""Least-loaded placement: probe each candidate host's load, choose a program's ``count``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rexplan.core.model import Host, Manifest, Step
from rexplan.core.plan import least_loaded
from rexplan.core.text import printable
from rexplan.engine.agentctl import agent_run
from rexplan.errors import TransportError
from rexplan.transport.base import Transport

#: seconds over which a ``load: cgroup`` host's probe samples its cgroup's CPU time
CGROUP_SAMPLE = 0.2


@dataclass(frozen=True)
class Load:
    """A placement candidate: its load per CPU it may use (None: could not be probed),
    available memory, and whether the program already runs there with the manifest's spec.
    ``source`` says what ``per_cpu`` is: ``loadavg`` (the 1-minute load average per CPU) or
    ``cgroup`` (CPUs its cgroup kept busy over the sample, per CPU it may use); ``fallback``
    says why a ``load: cgroup`` host was measured by its load average instead."""

    per_cpu: float | None
    free_mb: int
    current: bool
    source: str = "loadavg"
    fallback: str = ""

    def describe(self) -> str:
        if self.per_cpu is None:
            return "no probe"
        measure = "cgroup load" if self.source == "cgroup" else "load"
        text = f"{measure} {self.per_cpu:.2f}/cpu"
        if self.fallback:
            text += f" (load average: its cgroup could not be read: {self.fallback})"
        return f"{text}, {self.free_mb} MB free" + (", running" if self.current else "")


def parse_load(output: str, current: bool) -> Load:
    """A candidate's Load from the output of the agent's ``--load`` mode (its last line
    counts); ValueError when that is not the probe's JSON or its figures make no sense."""
    lines = output.strip().splitlines()
    try:
        # json raises RecursionError on a deeply nested value: a host's words, like any
        data: Any = json.loads(lines[-1]) if lines else None
        load, cpus, free = float(data["load"]), float(data["cpus"]), int(data["free_mb"])
        source, fallback = data.get("source", "loadavg"), data.get("fallback", "")
    except (KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"not the load probe's output: {output[-200:]!r}") from exc
    if not (math.isfinite(load) and math.isfinite(cpus)) or load < 0 or cpus <= 0:
        raise ValueError(f"implausible load {load} on {cpus} CPUs")
    if source not in ("loadavg", "cgroup") or not isinstance(fallback, str):
        raise ValueError(f"unknown load source {source!r}")
    # the host's words go into events and the terminal: one short printable line
    fallback = printable(fallback, 160)
    return Load(load / cpus, free, current, source, fallback)


def choose(candidates: Sequence[tuple[str, Load]], count: int) -> set[str]:
    """The ``count`` candidates to place on: those already running current first (so a
    re-apply changes nothing), then the least loaded per CPU, then the most free memory, then
    manifest order; hosts that could not be probed come last."""
    order = sorted(
        range(len(candidates)),
        key=lambda i: (
            not candidates[i][1].current,
            candidates[i][1].per_cpu is None,
            candidates[i][1].per_cpu or 0.0,
            -candidates[i][1].free_mb,
            i,
        ),
    )
    return {candidates[i][0] for i in order[:count]}


def probe_candidate(
    connect: Callable[[], Transport],
    host: Host,
    timeout: float,
    current: Callable[[Transport], bool],
) -> Load:
    """A placement candidate's Load: the agent's ``--load`` mode once on the host's
    connection (agent_run), then whether the program already runs there current;
    ``Load(None, 0, False)`` when either fails."""
    try:
        transport = connect()
        res = agent_run(
            transport, host.python, "--load", host.load, f"{CGROUP_SAMPLE:g}", timeout=timeout
        )
        return parse_load(res.stdout.decode("ascii", "replace"), current(transport))
    except (TransportError, OSError, ValueError, KeyError, IndexError, TypeError):
        return Load(None, 0, False)


@dataclass(frozen=True)
class Placed:
    """Least-loaded placement of one program: its candidate steps with their Loads, in plan
    order, and the ids of the steps chosen to run."""

    program: str
    candidates: tuple[tuple[Step, Load], ...]
    chosen: frozenset[str]

    def picked(self) -> str:
        """The chosen hosts, in plan order: ``h1, h3``."""
        return ", ".join(s.host for s, _ in self.candidates if s.id in self.chosen)

    def unplaced(self) -> list[Step]:
        """The candidate steps not chosen: apply starts nothing for them."""
        return [s for s, _ in self.candidates if s.id not in self.chosen]

    def describe(self) -> str:
        """``least-loaded placement of P: h1 (of h1 (load 0.10/cpu, 900 MB free), h2 (...))``."""
        shown = ", ".join(f"{s.host} ({load.describe()})" for s, load in self.candidates)
        return f"least-loaded placement of {self.program}: {self.picked()} (of {shown})"


def place(
    manifest: Manifest, steps: Sequence[Step], probe: Callable[[Step], Load], *, forks: int
) -> list[Placed]:
    """Least-loaded placement among ``steps``: ``probe`` every candidate of every least-loaded
    program at once (at most ``forks`` in flight), then choose each program's ``count``.
    ``rex apply`` calls it at each wave, ``apply --dry-run`` once for the plan."""
    groups = least_loaded(manifest, steps)
    candidates = [s for group in groups.values() for s in group]
    if not candidates:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(candidates)))) as probes:
        probed = list(probes.map(probe, candidates))
    loads = {s.id: load for s, load in zip(candidates, probed, strict=True)}
    placed = []
    for program, group in groups.items():
        count = manifest.program(program).placement.count or len(group)
        chosen = choose([(s.id, loads[s.id]) for s in group], count)
        placed.append(Placed(program, tuple((s, loads[s.id]) for s in group), frozenset(chosen)))
    return placed
