"""`rex plan --simulate`: the launch-time model's exact numbers, its tree split, its
monotonicity, and the command line."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexplan.cli import rex as cli
from rexplan.core import simulate
from rexplan.core.simulate import CostModel, Subtree

ROOT = Path(__file__).resolve().parent.parent
MODEL = CostModel()  # 40 + 30 + 2 x 0.2 = 70.4 ms a launch, 64 in flight
LAUNCH = 70.4


def hosts_of(nodes: tuple[Subtree, ...]) -> list[str]:
    out: list[str] = []
    for node in nodes:
        out.append(node.host)
        out += hosts_of(node.children)
    return out


def all_nodes(nodes: tuple[Subtree, ...]) -> list[Subtree]:
    return [n for node in nodes for n in (node, *all_nodes(node.children))]


def min_depth(hosts: int, k: int) -> int:
    """The fewest levels of a k-ary tree (below a root that is not a host) holding ``hosts``."""
    depth, capacity = 0, 0
    while capacity < hosts:
        depth += 1
        capacity += k**depth
    return depth


# --- exact numbers ----------------------------------------------------------------------------


def test_the_launch_cost_is_connect_agent_and_two_round_trips() -> None:
    assert MODEL.launch == pytest.approx(LAUNCH)
    assert CostModel(conn_cost=10, latency=1, agent_cost=5).launch == 17


#: host counts at which tree launchers of other tools hang, and the depth of a k-ary tree there
BOUNDARIES = {
    "1": (lambda k: 1, 1),
    "k": (lambda k: k, 1),
    "k+1": (lambda k: k + 1, 2),
    "k^2+1": (lambda k: k * k + 1, 2),
    "k^2+k": (lambda k: k * k + k, 2),
    "k^2+k+1": (lambda k: k * k + k + 1, 3),
}


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_tree_depth_at_the_boundaries(k: int, boundary: str) -> None:
    size, depth = BOUNDARIES[boundary]
    count = size(k)
    estimate = simulate.tree(count, k, MODEL)
    assert (estimate.depth, estimate.rounds) == (depth, depth)
    assert estimate.ms == pytest.approx(depth * LAUNCH)
    names = [f"h{i}" for i in range(count)]
    nodes = simulate.split_tree(names, k)
    assert sorted(hosts_of(nodes)) == sorted(names)
    assert max(n.depth for n in nodes) == depth
    assert sum(n.size for n in nodes) == count


def test_split_of_ten_hosts_three_ways_is_the_lam_split() -> None:
    # the first k hosts are the relays; the 7 others go (M - N) / N each, the first relay
    # taking the one left over
    nodes = simulate.split_tree(list("abcdefghij"), 3)
    assert [(n.host, [c.host for c in n.children]) for n in nodes] == [
        ("a", ["d", "e", "f"]),
        ("b", ["g", "h"]),
        ("c", ["i", "j"]),
    ]


def test_shares() -> None:
    assert simulate.shares(0, 3) == []
    assert simulate.shares(2, 3) == [0, 0]
    assert simulate.shares(3, 3) == [0, 0, 0]
    assert simulate.shares(4, 3) == [1, 0, 0]
    assert simulate.shares(10, 3) == [3, 2, 2]
    with pytest.raises(ValueError):
        simulate.shares(1, 0)


def test_flat_and_ring() -> None:
    assert simulate.flat(1, MODEL).rounds == 1
    assert simulate.flat(64, MODEL).rounds == 1
    assert simulate.flat(65, MODEL).rounds == 2
    assert simulate.flat(147, MODEL).ms == pytest.approx(3 * LAUNCH)
    assert simulate.flat(0, MODEL).rounds == 0
    ring = simulate.ring(16, MODEL)
    assert (ring.depth, ring.rounds, ring.ms) == (16, 16, pytest.approx(16 * LAUNCH))


def test_a_node_with_fewer_forks_than_children_launches_them_in_rounds() -> None:
    one = CostModel(forks=1)
    # 3 hosts, k=2, one launch at a time: relay a (round 1) then b (round 2); a launches c
    # in round 2
    assert simulate.tree(3, 2, one).rounds == 2
    # 4 hosts, k=4, one at a time: four rounds, depth 1
    estimate = simulate.tree(4, 4, one)
    assert (estimate.depth, estimate.rounds) == (1, 4)


def test_the_lam_table_shape() -> None:
    """16/32/147 hosts: linear grows linearly, trees with their depth; 3 and 4 children give
    the same number of timesteps at 32 hosts, as the LAM notes observed."""
    rounds = {h: {e.label: e.rounds for e in simulate.simulate(h, MODEL)} for h in (16, 32, 147)}
    assert {
        h: [r["ring"], r["tree k=2"], r["tree k=3"], r["tree k=4"]] for h, r in rounds.items()
    } == {
        16: [16, 4, 3, 2],
        32: [32, 5, 3, 3],
        147: [147, 7, 5, 4],
    }
    speedups = [r["ring"] / r["tree k=3"] for r in rounds.values()]
    assert speedups == sorted(speedups)


def test_crossover() -> None:
    cross = simulate.crossover(MODEL)
    assert cross is not None
    assert (cross.hosts, cross.fanout, cross.rounds) == (257, 4, 4)
    assert simulate.flat(256, MODEL).rounds == 4
    assert simulate.crossover(CostModel(forks=simulate.CROSSOVER_LIMIT)) is None
    assert simulate.crossover(CostModel(forks=1), fanout_max=1) is None


@pytest.mark.parametrize("forks", [1, 2, 3, 5, 8])
def test_crossover_is_the_first_host_count_a_tree_wins(forks: int) -> None:
    model = CostModel(forks=forks)
    cross = simulate.crossover(model, 3)
    assert cross is not None
    first = next(
        h
        for h in range(1, 10_000)
        if min(simulate.tree(h, k, model).rounds for k in (2, 3)) < simulate.flat(h, model).rounds
    )
    assert cross.hosts == first


def test_costs_must_make_sense() -> None:
    with pytest.raises(ValueError):
        CostModel(latency=-1)
    with pytest.raises(ValueError):
        CostModel(conn_cost=float("nan"))
    with pytest.raises(ValueError):
        CostModel(forks=0)
    with pytest.raises(ValueError):
        simulate.tree(5, 1, MODEL)


def test_format_table() -> None:
    text = simulate.format_table(simulate.simulate(16, MODEL), MODEL, simulate.crossover(MODEL))
    assert text.splitlines() == [
        "a launch = 40 ms connect + 30 ms agent + 2 x 0.2 ms round trip = 70.4 ms; "
        "64 in flight per node",
        "  hosts  strategy    depth  rounds    expected",
        "     16  flat            1       1      0.07 s",
        "     16  ring           16      16      1.13 s",
        "     16  tree k=2        4       4      0.28 s",
        "     16  tree k=3        3       3      0.21 s",
        "     16  tree k=4        2       2      0.14 s",
        "fastest for 16: flat (0.07 s)",
        "crossover: flat is as fast as any tree up to 256 hosts; from 257, a tree k=4 is faster",
    ]


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(hosts=st.integers(0, 1500), k=st.integers(2, 6))
def test_split_gives_every_host_once_and_a_minimal_depth(hosts: int, k: int) -> None:
    names = [f"h{i}" for i in range(hosts)]
    nodes = simulate.split_tree(names, k)
    assert hosts_of(nodes) != [] or hosts == 0
    assert sorted(hosts_of(nodes)) == sorted(names)
    every = all_nodes(nodes)
    assert len(nodes) == min(k, hosts)
    assert all(len(n.children) <= k for n in every)
    # balanced: siblings' subtrees differ by at most one host
    for group in [nodes, *(n.children for n in every)]:
        sizes = [n.size for n in group]
        assert not sizes or max(sizes) - min(sizes) <= 1
    depth = max((n.depth for n in nodes), default=0)
    assert depth == min_depth(hosts, k) == simulate.tree(hosts, k, MODEL).depth


@settings(max_examples=100, deadline=None)
@given(
    a=st.integers(0, 5000),
    b=st.integers(0, 5000),
    k=st.integers(2, 6),
    forks=st.integers(1, 100),
)
def test_more_hosts_never_launch_faster(a: int, b: int, k: int, forks: int) -> None:
    small, large = sorted((a, b))
    model = CostModel(forks=forks)
    for strategy in (
        lambda h: simulate.flat(h, model),
        lambda h: simulate.ring(h, model),
        lambda h: simulate.tree(h, k, model),
    ):
        x, y = strategy(small), strategy(large)
        assert x.rounds <= y.rounds and x.depth <= y.depth and x.ms <= y.ms


@settings(max_examples=100, deadline=None)
@given(hosts=st.integers(1, 100_000), k=st.integers(2, 8), forks=st.integers(1, 100))
def test_trees_sit_between_flat_depth_and_the_ring(hosts: int, k: int, forks: int) -> None:
    model = CostModel(forks=forks)
    estimate = simulate.tree(hosts, k, model)
    assert estimate.depth <= estimate.rounds <= simulate.ring(hosts, model).rounds
    if forks >= k:
        assert estimate.rounds == estimate.depth
        assert simulate.tree(hosts, k + 1, model).depth <= estimate.depth


@settings(max_examples=50, deadline=None)
@given(
    hosts=st.integers(1, 2000),
    conn=st.floats(0, 1000),
    extra=st.floats(0, 1000),
    latency=st.floats(0, 100),
)
def test_dearer_connections_never_launch_faster(
    hosts: int, conn: float, extra: float, latency: float
) -> None:
    cheap = CostModel(conn_cost=conn, latency=latency)
    dear = CostModel(conn_cost=conn + extra, latency=latency)
    for x, y in zip(simulate.simulate(hosts, cheap), simulate.simulate(hosts, dear), strict=True):
        assert x.rounds == y.rounds and x.ms <= y.ms


# --- purity -------------------------------------------------------------------------------------


def test_the_model_imports_no_io_library() -> None:
    tree = ast.parse((ROOT / "rexplan" / "core" / "simulate.py").read_text())
    names = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert names <= {"__future__", "math", "collections", "dataclasses", "typing"}


# --- the command line ---------------------------------------------------------------------------

MANIFEST = """\
rex: 1
defaults: {forks: 8}
hosts:
  "node[01-20]": {address: "127.0.1.{n}", groups: [compute]}
users:
  u: {}
programs:
  d: {on: [group:compute], run: [sleep, "30"]}
authorize: ["*.u.d"]
"""


@pytest.fixture
def path(tmp_path: Path) -> str:
    file = tmp_path / "m.yaml"
    file.write_text(MANIFEST)
    return str(file)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_uses_the_manifest_forks(capsys: pytest.CaptureFixture[str], path: str) -> None:
    code, out, err = run(capsys, "plan", path, "--simulate")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].endswith("; 8 in flight per node")
    assert re.search(r"^\s+20  flat\s+1\s+3\s+0\.21 s$", out, re.MULTILINE)
    assert re.search(r"^\s+20  tree k=4\s+2\s+2\s+0\.14 s$", out, re.MULTILINE)
    assert "fastest for 20: tree k=4 (0.14 s)" in out


def test_cli_json_with_every_cost(capsys: pytest.CaptureFixture[str], path: str) -> None:
    code, out, _ = run(
        capsys,
        "plan",
        path,
        "--simulate",
        "--json",
        "--conn-cost",
        "100",
        "--latency",
        "5",
        "--agent-cost",
        "0",
        "--fanout-max",
        "3",
        "--forks",
        "64",
        "--limit",
        "node0*",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["hosts"] == 9
    assert doc["model"] == {
        "conn_cost_ms": 100.0,
        "latency_ms": 5.0,
        "agent_cost_ms": 0.0,
        "launch_ms": 110.0,
        "forks": 64,
    }
    assert [(e["strategy"], e["fanout"]) for e in doc["estimates"]] == [
        ("flat", None),
        ("ring", None),
        ("tree", 2),
        ("tree", 3),
    ]
    assert doc["estimates"][1] == {
        "hosts": 9,
        "strategy": "ring",
        "fanout": None,
        "depth": 9,
        "rounds": 9,
        "expected_ms": 990.0,
    }
    assert doc["fastest"]["strategy"] == "flat"
    assert doc["crossover"]["hosts"] == 321


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--latency", "1"], "--latency needs --simulate"),
        (["--forks", "2"], "--forks needs --simulate"),
        (["--simulate", "--dot"], "not --dot"),
        (["--simulate", "--fanout-max", "1"], "must be from 2 to 64"),
        (["--simulate", "--latency", "-1"], "0 or more"),
        (["--simulate", "--conn-cost", "fast"], "not a number"),
    ],
)
def test_cli_usage_errors(
    capsys: pytest.CaptureFixture[str], path: str, argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, "plan", path, *argv)
    assert code == 5
    assert message in err and out == ""


def test_the_json_keys_and_options_are_in_the_man_page(path: str) -> None:
    text = (ROOT / "man" / "rex.1").read_text().replace("\\-", "-")
    doc = simulate.to_dict(simulate.simulate(3, MODEL), MODEL, simulate.crossover(MODEL))
    keys = set(doc) | set(doc["model"]) | set(doc["estimates"][0])
    assert sorted(k for k in keys if f'"{k}"' not in text) == []
    for option in ("--simulate", "--conn-cost", "--latency", "--agent-cost", "--fanout-max"):
        assert option in text
