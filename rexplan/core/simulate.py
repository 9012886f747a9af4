"""Launch-time model of flat, ring and k-ary tree fan-out (``rex plan --simulate``, the model
in rex(7), TREE FAN-OUT); pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: defaults: the paramiko + sshd handshake measured on this machine; a loopback round trip
CONN_COST_MS = 40.0
LATENCY_MS = 0.2
AGENT_COST_MS = 30.0
FORKS = 64
FANOUT_MAX = 4
#: the largest host count searched for the flat/tree crossover
CROSSOVER_LIMIT = 10_000_000

FLAT, RING, TREE = "flat", "ring", "tree"


@dataclass(frozen=True)
class CostModel:
    """Costs in milliseconds, and the launches a node has in flight at once."""

    conn_cost: float = CONN_COST_MS
    latency: float = LATENCY_MS
    agent_cost: float = AGENT_COST_MS
    forks: int = FORKS

    def __post_init__(self) -> None:
        costs = (self.conn_cost, self.latency, self.agent_cost)
        if not all(math.isfinite(c) and c >= 0 for c in costs):
            raise ValueError("costs must be finite and not negative")
        if self.forks < 1:
            raise ValueError("forks must be at least 1")

    @property
    def launch(self) -> float:
        """One launch: connect (cost + a round trip), exec and callback (a round trip + agent)."""
        return self.conn_cost + self.latency + self.latency + self.agent_cost


@dataclass(frozen=True)
class Estimate:
    """One strategy for one host count: its depth, rounds and expected time."""

    hosts: int
    strategy: str
    fanout: int | None  # a tree's k
    depth: int  # hops from the launcher to the farthest host
    rounds: int  # launches one after another on the slowest path
    ms: float

    @property
    def label(self) -> str:
        return f"tree k={self.fanout}" if self.strategy == TREE else self.strategy


@dataclass(frozen=True)
class Subtree:
    """A host and the hosts it launches (a relay), or none (a leaf)."""

    host: str
    children: tuple[Subtree, ...] = ()

    @property
    def size(self) -> int:
        return 1 + sum(child.size for child in self.children)

    @property
    def depth(self) -> int:
        return 1 + max((child.depth for child in self.children), default=0)


def shares(m: int, k: int) -> list[int]:
    """How many hosts each of a node's min(k, m) children gets below it, largest first."""
    if k < 1 or m < 0:
        raise ValueError("k must be at least 1 and m not negative")
    n = min(k, m)
    if n == 0:
        return []
    base, extra = divmod(m - n, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def split_tree(hosts: Sequence[str], k: int) -> tuple[Subtree, ...]:
    """The launcher's children: the first min(k, M) hosts, each with a contiguous slice of the
    rest as its subtree. Every host appears exactly once; no relay gets an empty slice."""
    if k < 2:
        raise ValueError("a tree needs k >= 2")
    sizes = shares(len(hosts), k)
    rest = len(sizes)
    out = []
    for i, size in enumerate(sizes):
        out.append(Subtree(hosts[i], split_tree(hosts[rest : rest + size], k)))
        rest += size
    return tuple(out)


def flat(hosts: int, model: CostModel) -> Estimate:
    rounds = -(-hosts // model.forks)
    return Estimate(hosts, FLAT, None, min(hosts, 1), rounds, rounds * model.launch)


def ring(hosts: int, model: CostModel) -> Estimate:
    return Estimate(hosts, RING, None, hosts, hosts, hosts * model.launch)


def tree(hosts: int, k: int, model: CostModel) -> Estimate:
    if k < 2:
        raise ValueError("a tree needs k >= 2")
    # A balanced split has at most two sizes per level, so the memo stays tiny.
    depths: dict[int, int] = {0: 0}
    rounds: dict[int, int] = {0: 0}

    def measure(m: int) -> None:
        if m in rounds:
            return
        sizes = shares(m, k)
        for size in set(sizes):
            measure(size)
        depths[m] = 1 + depths[sizes[0]]
        rounds[m] = max(i // model.forks + 1 + rounds[size] for i, size in enumerate(sizes))

    measure(hosts)
    return Estimate(hosts, TREE, k, depths[hosts], rounds[hosts], rounds[hosts] * model.launch)


def simulate(hosts: int, model: CostModel, fanout_max: int = FANOUT_MAX) -> tuple[Estimate, ...]:
    """flat, ring, then trees for k = 2 .. fanout_max."""
    if hosts < 0:
        raise ValueError("hosts must not be negative")
    trees = (tree(hosts, k, model) for k in range(2, fanout_max + 1))
    return (flat(hosts, model), ring(hosts, model), *trees)


def fastest(estimates: Sequence[Estimate]) -> Estimate:
    """The quickest; on a tie the first listed (flat before ring before smaller k)."""
    return min(estimates, key=lambda e: e.rounds)


def crossover(model: CostModel, fanout_max: int = FANOUT_MAX) -> Estimate | None:
    """The first tree to beat flat: the smallest host count where some k <= fanout_max takes
    fewer rounds (the smallest such k), or None below CROSSOVER_LIMIT hosts."""
    # flat only slows down at H = r * forks + 1 and a tree never speeds up with more hosts,
    # so the first host count a tree wins at starts one of flat's steps
    hosts = model.forks + 1
    while fanout_max >= 2 and hosts <= CROSSOVER_LIMIT:
        need = flat(hosts, model).rounds
        for k in range(2, fanout_max + 1):
            candidate = tree(hosts, k, model)
            if candidate.rounds < need:
                return candidate
        hosts += model.forks
    return None


def _seconds(ms: float) -> str:
    return f"{ms / 1000:.2f} s"


def format_table(estimates: Sequence[Estimate], model: CostModel, cross: Estimate | None) -> str:
    """The estimates as aligned lines, the model above them and the verdict below."""
    hosts = estimates[0].hosts if estimates else 0
    lines = [
        f"a launch = {model.conn_cost:g} ms connect + {model.agent_cost:g} ms agent + 2 x "
        f"{model.latency:g} ms round trip = {model.launch:g} ms; {model.forks} in flight per node",
        f"{'hosts':>7}  {'strategy':<10}  {'depth':>5}  {'rounds':>6}  {'expected':>10}",
    ]
    for e in estimates:
        lines.append(
            f"{e.hosts:>7}  {e.label:<10}  {e.depth:>5}  {e.rounds:>6}  {_seconds(e.ms):>10}"
        )
    if estimates:
        best = fastest(estimates)
        lines.append(f"fastest for {hosts}: {best.label} ({_seconds(best.ms)})")
    if cross is None:
        lines.append(f"no tree beats flat below {CROSSOVER_LIMIT} hosts")
    else:
        lines.append(
            f"crossover: flat is as fast as any tree up to {cross.hosts - 1} hosts; from "
            f"{cross.hosts}, a {cross.label} is faster"
        )
    return "\n".join(lines)


def to_dict(
    estimates: Sequence[Estimate], model: CostModel, cross: Estimate | None
) -> dict[str, Any]:
    """The JSON document of ``rex plan --simulate --json`` (format 1)."""

    def row(e: Estimate) -> dict[str, Any]:
        fields = dict(vars(e))  # Estimate's fields in order, ms (last) renamed and rounded
        fields["expected_ms"] = round(fields.pop("ms"), 3)
        return fields

    return {
        "format": 1,
        "hosts": estimates[0].hosts if estimates else 0,
        "model": {
            "conn_cost_ms": model.conn_cost,
            "latency_ms": model.latency,
            "agent_cost_ms": model.agent_cost,
            "launch_ms": round(model.launch, 3),
            "forks": model.forks,
        },
        "estimates": [row(e) for e in estimates],
        "fastest": row(fastest(estimates)) if estimates else None,
        "crossover": None if cross is None else row(cross),
    }
