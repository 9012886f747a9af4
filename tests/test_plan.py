"""Planner tests: golden plans from YAML, records built in Python, and hypothesis properties.

Golden cases live in tests/data/plans/<case>/: manifest.yaml, the expected plan.json, and an
optional ``limit`` file holding a --limit pattern. After an intended change to the plan
format, rewrite every plan.json with ``REX_REGEN_GOLDEN=1 python3 -m pytest tests/test_plan.py``
and review the diff.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexplan.core import plan as planner
from rexplan.core.model import (
    Authorization,
    Host,
    Manifest,
    Placement,
    Program,
    Ready,
    Step,
    User,
)
from rexplan.errors import PlanError

CASES = Path(__file__).parent / "data" / "plans"
REGEN = os.environ.get("REX_REGEN_GOLDEN") == "1"

# --------------------------------------------------------------------------- helpers


def allow(pattern: str) -> Authorization:
    host, user, program = pattern.rsplit(".", 2)
    return Authorization(pattern, host, user, program)


def make(
    programs: list[Program],
    hosts: list[Host] | None = None,
    users: list[User] | None = None,
    authorize: tuple[str, ...] = ("*.*.*",),
) -> Manifest:
    if hosts is None:
        names = dict.fromkeys(h for p in programs for h in p.hosts)
        hosts = [Host(name=n, address=f"127.0.0.{i + 10}") for i, n in enumerate(names)]
    if users is None:
        users = [User(name=u, login=u) for u in dict.fromkeys(p.user for p in programs)]
    return Manifest(
        path="test.yaml",
        digest="0" * 64,
        hosts=tuple(hosts),
        users=tuple(users),
        programs=tuple(programs),
        authorize=tuple(allow(a) for a in authorize),
    )


def prog(name: str, hosts: tuple[str, ...] = ("h1",), requires: tuple[str, ...] = ()) -> Program:
    return Program(name=name, hosts=hosts, user="app", run=("run", name), requires=requires)


def wave_of(plan: planner.Plan) -> dict[str, int]:
    return {s.program: s.wave for s in plan.steps}


# --------------------------------------------------------------------------- golden cases


def golden_cases() -> list[str]:
    return sorted(p.name for p in CASES.iterdir() if (p / "manifest.yaml").is_file())


@pytest.mark.parametrize("case", golden_cases())
def test_golden_plan(case: str) -> None:
    from rexplan.core import manifest as loader

    directory = CASES / case
    data = (directory / "manifest.yaml").read_bytes()
    m = loader.loads(data, "manifest.yaml")
    limit_file = directory / "limit"
    limit = limit_file.read_text().strip() if limit_file.exists() else None
    actual = planner.plan_to_dict(planner.compile(m, limit=limit), m)
    expected_file = directory / "plan.json"
    if REGEN:
        expected_file.write_text(json.dumps(actual, indent=2) + "\n")
    assert expected_file.exists(), f"run REX_REGEN_GOLDEN=1 pytest {__file__} to create it"
    expected = json.loads(expected_file.read_text())
    # the version changes with every release; everything else must stay put
    actual.pop("rex")
    expected.pop("rex")
    assert actual == expected


def test_golden_cases_exist() -> None:
    wanted = {"quickstart", "diamond", "webstack", "host-ranges", "limit", "placement"}
    assert wanted <= set(golden_cases())


# --------------------------------------------------------------------------- waves


def test_chain_gives_one_wave_per_program() -> None:
    m = make([prog("c", requires=("b",)), prog("a"), prog("b", requires=("a",))])
    plan = planner.compile(m)
    assert [[s.id for s in w] for w in plan.waves] == [["a@h1"], ["b@h1"], ["c@h1"]]
    assert [s.wave for s in plan.steps] == [0, 1, 2]


def test_diamond_keeps_manifest_order_inside_a_wave() -> None:
    m = make(
        [
            prog("a"),
            prog("c", requires=("a",)),
            prog("b", requires=("a",)),
            prog("d", requires=("b", "c")),
        ]
    )
    plan = planner.compile(m)
    assert [[s.program for s in w] for w in plan.waves] == [["a"], ["c", "b"], ["d"]]


def test_steps_follow_program_host_order() -> None:
    hosts = [Host(name=n, address="127.0.0.1") for n in ("z", "a", "m")]
    m = make([prog("p", hosts=("z", "a", "m"))], hosts=hosts)
    assert [s.id for s in planner.compile(m).steps] == ["p@z", "p@a", "p@m"]


def test_step_fields_come_from_program_host_and_user() -> None:
    host = Host(name="web1", address="127.0.0.10", port=2222, transport="ssh", python="python3.11")
    p = Program(
        name="app",
        hosts=("web1",),
        user="web",
        shell="exec serve --port 8000",
        requires=(),
        ready=Ready(kind="tcp", port=8000),
        env=(("A", "1"),),
        cwd="/srv",
        kind="job",
        restart="on-failure",
        stop_timeout=3.0,
    )
    m = make(
        [p], hosts=[host], users=[User(name="web", login="www-data")], authorize=("web1.web.app",)
    )
    (step,) = planner.compile(m).steps
    assert step == Step(
        id="app@web1",
        wave=0,
        host="web1",
        address="127.0.0.10",
        port=2222,
        transport="ssh",
        login="www-data",
        user="web",
        program="app",
        triple="web1.web.app",
        argv=("/bin/sh", "-c", "exec serve --port 8000"),
        shell="exec serve --port 8000",
        ready=Ready(kind="tcp", port=8000),
        kind="job",
        env=(("A", "1"),),
        cwd="/srv",
        python="python3.11",
        restart="on-failure",
        stop_timeout=3.0,
    )
    # steps are built without __init__ for speed; they must still behave as records
    assert hash(step) == hash(dataclasses.replace(step))
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.host = "other"  # type: ignore[misc]


def test_compile_restores_the_garbage_collector_state() -> None:
    m = make([prog("a")])
    assert gc.isenabled()
    planner.compile(m)
    assert gc.isenabled()
    gc.disable()
    try:
        planner.compile(m)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(PlanError):
        planner.compile(make([prog("a", hosts=("h1", "h2"))], users=[]))
    assert gc.isenabled()


def test_cycle_is_named_in_requires_order() -> None:
    m = make(
        [
            prog("x"),
            prog("a", requires=("b",)),
            prog("b", requires=("c",)),
            prog("c", requires=("a",)),
        ]
    )
    with pytest.raises(PlanError) as e:
        planner.compile(m)
    assert "requires cycle: a -> b -> c -> a" in str(e.value)
    assert e.value.diagnostics[0].path == "programs.a.requires"
    assert e.value.exit_code == 4


def test_self_requirement_is_a_cycle() -> None:
    with pytest.raises(PlanError, match=r"requires cycle: a -> a"):
        planner.compile(make([prog("a", requires=("a",))]))


def test_unknown_requirement_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match=r"programs\.a\.requires: unknown program 'nope'"):
        planner.compile(make([prog("a", requires=("nope",))]))


def test_unknown_host_and_user_are_plan_errors() -> None:
    m = make([prog("a", hosts=("h1", "ghost"))], hosts=[Host(name="h1", address="127.0.0.1")])
    with pytest.raises(PlanError, match="unknown host 'ghost'"):
        planner.compile(m)
    m = make([prog("a")], users=[User(name="other", login="other")])
    with pytest.raises(PlanError, match="unknown user 'app'"):
        planner.compile(m)


def test_unauthorized_triples_are_all_reported() -> None:
    hosts = tuple(f"h{i}" for i in range(8))
    m = make([prog("a", hosts=hosts), prog("b")], authorize=("h1.app.a",))
    with pytest.raises(PlanError) as e:
        planner.compile(m)
    text = str(e.value)
    assert "programs.a: not authorized: h0.app.a, h2.app.a" in text
    assert "and 2 more" in text
    assert "programs.b: not authorized: h1.app.b" in text
    assert len(e.value.diagnostics) == 2
    assert "authorize" in (e.value.diagnostics[0].hint or "")


# --------------------------------------------------------------------------- limit


def limited_manifest() -> Manifest:
    hosts = [
        Host(name="db1", address="127.0.0.10", groups=("db",)),
        Host(name="web1", address="127.0.0.11", groups=("web",)),
        Host(name="web2", address="127.0.0.12", groups=("web",)),
        Host(name="spare", address="127.0.0.13"),
    ]
    return make(
        [
            prog("db", hosts=("db1",)),
            prog("app", hosts=("web1", "web2"), requires=("db",)),
            prog("lb", hosts=("web1",), requires=("app",)),
        ],
        hosts=hosts,
    )


@pytest.mark.parametrize(
    ("limit", "ids"),
    [
        ("web2", ["app@web2"]),
        ("web*", ["app@web1", "app@web2", "lb@web1"]),
        ("group:db", ["db@db1"]),
        ("db1, web2", ["db@db1", "app@web2"]),
        ("group:web,group:nope", ["app@web1", "app@web2", "lb@web1"]),
        ("web[2-9]", ["app@web2"]),
    ],
)
def test_limit_keeps_matching_hosts(limit: str, ids: list[str]) -> None:
    plan = planner.compile(limited_manifest(), limit=limit)
    assert [s.id for s in plan.steps] == ids
    assert plan.limit == limit


def test_limit_keeps_full_plan_wave_numbers() -> None:
    full = planner.compile(limited_manifest())
    plan = planner.compile(limited_manifest(), limit="web2")
    assert [w[0].wave for w in plan.waves] == [1]
    assert set(plan.steps) <= set(full.steps)


def test_limit_matching_no_host_errors_with_hint() -> None:
    with pytest.raises(PlanError) as e:
        planner.compile(limited_manifest(), limit="nothing*")
    assert "--limit 'nothing*' matches no host" in str(e.value)
    assert "db1" in (e.value.diagnostics[0].hint or "")


def test_limit_matching_hosts_without_steps_says_so() -> None:
    with pytest.raises(PlanError, match=r"matches hosts \(spare\) but no program runs on them"):
        planner.compile(limited_manifest(), limit="spare")


def test_empty_limit_is_an_error() -> None:
    with pytest.raises(PlanError, match="--limit is empty"):
        planner.compile(limited_manifest(), limit=" , ")


def test_limit_still_checks_authorization_everywhere() -> None:
    m = dataclasses.replace(limited_manifest(), authorize=(allow("web*.*.*"),))
    with pytest.raises(PlanError, match=r"not authorized: db1\.app\.db"):
        planner.compile(m, limit="web1")


# --------------------------------------------------------------------------- JSON and DOT

STEP_KEYS = [
    "id",
    "wave",
    "host",
    "address",
    "port",
    "transport",
    "login",
    "user",
    "program",
    "triple",
    "argv",
    "shell",
    "ready",
    "kind",
    "env",
    "cwd",
    "python",
    "restart",
    "stop_timeout",
    "timeouts",
    "requires",
    "tags",
    "restart_with",
    "autostart",
]


def test_plan_to_dict_shape() -> None:
    m = limited_manifest()
    data = planner.plan_to_dict(planner.compile(m), m)
    assert list(data) == list(planner.PLAN_KEYS)
    # the keys the module's docstring documents, in its order (its top level is indented 6)
    assert re.findall(r'^ {6}"(\w+)":', planner.__doc__ or "", re.M) == list(planner.PLAN_KEYS)
    assert data["format"] == 1
    assert data["placements"] == []
    assert data["waves"] == [
        {"wave": 0, "programs": ["db"], "steps": ["db@db1"]},
        {"wave": 1, "programs": ["app"], "steps": ["app@web1", "app@web2"]},
        {"wave": 2, "programs": ["lb"], "steps": ["lb@web1"]},
    ]
    steps = data["steps"]
    assert isinstance(steps, list)
    assert [list(s) for s in steps] == [STEP_KEYS] * 4
    assert list(steps[0]["ready"]) == [
        "kind",
        "timeout",
        "interval",
        "settle",
        "port",
        "host",
        "url",
        "argv",
        "path",
    ]
    assert json.loads(json.dumps(data)) == data


def test_least_loaded_groups_candidates_in_plan_order() -> None:
    hosts = ("h1", "h2", "h3")
    m = make(
        [
            prog("db", hosts),
            dataclasses.replace(
                prog("app", hosts, requires=("db",)), placement=Placement("least-loaded", 2)
            ),
            dataclasses.replace(prog("one", ("h3", "h1")), placement=Placement("least-loaded", 1)),
        ]
    )
    plan = planner.compile(m)
    groups = planner.least_loaded(m, plan.steps)
    assert {p: [s.id for s in steps] for p, steps in groups.items()} == {
        "one": ["one@h3", "one@h1"],
        "app": ["app@h1", "app@h2", "app@h3"],
    }
    # every candidate stays a step of the plan: apply chooses among them at the wave
    assert len(plan.steps) == 8
    assert planner.plan_to_dict(plan, m)["placements"] == [
        {"program": "one", "strategy": "least-loaded", "count": 1, "steps": ["one@h3", "one@h1"]},
        {
            "program": "app",
            "strategy": "least-loaded",
            "count": 2,
            "steps": ["app@h1", "app@h2", "app@h3"],
        },
    ]
    limited = planner.compile(m, limit="h2")
    assert planner.plan_to_dict(limited, m)["placements"] == [
        {"program": "app", "strategy": "least-loaded", "count": 2, "steps": ["app@h2"]}
    ]
    assert planner.least_loaded(make([prog("db", hosts)]), plan.steps) == {}


def test_plan_to_dot() -> None:
    m = limited_manifest()
    dot = planner.plan_to_dot(planner.compile(m), m)
    assert dot.startswith("digraph rex {")
    assert 'subgraph "cluster_wave_1" {' in dot
    assert '"app" [label="app\\n2 steps"];' in dot
    assert '"db" [label="db\\n1 step"];' in dot
    assert '"db" -> "app";' in dot
    assert '"app" -> "lb";' in dot


def test_plan_to_dot_drops_edges_to_programs_outside_the_limit() -> None:
    m = limited_manifest()
    dot = planner.plan_to_dot(planner.compile(m, limit="web2"), m)
    assert '"app"' in dot
    assert "->" not in dot


def test_dot_quotes_ids() -> None:
    m = dataclasses.replace(limited_manifest(), path='we"ird\\name.yaml')
    dot = planner.plan_to_dot(planner.compile(m), m)
    assert 'label="we\\"ird\\\\name.yaml"' in dot


# --------------------------------------------------------------------------- properties

NAMES = [f"p{i}" for i in range(8)]
HOSTS = [f"n{i}" for i in range(6)]


@st.composite
def dag_manifests(draw: st.DrawFn) -> Manifest:
    """Random programs whose requires form a DAG, listed in a random (non-topological) order."""
    count = draw(st.integers(1, len(NAMES)))
    names = NAMES[:count]
    requires = {
        name: tuple(draw(st.lists(st.sampled_from(names[:i]), unique=True))) if i else ()
        for i, name in enumerate(names)
    }
    order = draw(st.permutations(names))
    hosts = draw(st.lists(st.sampled_from(HOSTS), min_size=1, unique=True))
    users = ["u0", "u1"]
    programs = [
        Program(
            name=name,
            hosts=tuple(h for h in hosts if h in draw(st.sets(st.sampled_from(hosts)))),
            user=draw(st.sampled_from(users)),
            run=("true",),
            requires=requires[name],
        )
        for name in order
    ]
    return make(
        programs,
        hosts=[Host(name=h, address="127.0.0.1", groups=("g",)) for h in hosts],
        users=[User(name=u, login=u) for u in users],
    )


def levels(m: Manifest) -> dict[str, int]:
    """Longest requires-path depth of each program, computed independently of graphlib."""
    depth: dict[str, int] = {}

    def visit(name: str) -> int:
        if name not in depth:
            reqs = m.program(name).requires
            depth[name] = 1 + max(map(visit, reqs)) if reqs else 0
        return depth[name]

    for p in m.programs:
        visit(p.name)
    return depth


@settings(max_examples=80, deadline=None)
@given(dag_manifests())
def test_waves_respect_requires(m: Manifest) -> None:
    plan = planner.compile(m)
    waves = wave_of(plan)
    for p in m.programs:
        for r in p.requires:
            if p.name in waves and r in waves:
                assert waves[r] < waves[p.name]
    depth = levels(m)
    assert all(waves[name] == depth[name] for name in waves)
    numbers = [w[0].wave for w in plan.waves]
    assert numbers == sorted(set(numbers))
    assert all(all(s.wave == w[0].wave for s in w) for w in plan.waves)


@settings(max_examples=80, deadline=None)
@given(dag_manifests())
def test_every_step_appears_exactly_once(m: Manifest) -> None:
    plan = planner.compile(m)
    pairs = [(s.program, s.host) for s in plan.steps]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {(p.name, h) for p in m.programs for h in p.hosts}
    assert all(s.id == f"{s.program}@{s.host}" for s in plan.steps)
    position = {p.name: i for i, p in enumerate(m.programs)}
    for wave in plan.waves:
        ranks = [position[s.program] for s in wave]
        assert ranks == sorted(ranks)


@settings(max_examples=50, deadline=None)
@given(dag_manifests())
def test_plan_is_deterministic(m: Manifest) -> None:
    first = planner.compile(m)
    again = planner.compile(dataclasses.replace(m))
    assert first == again
    assert planner.plan_to_dict(first, m) == planner.plan_to_dict(again, m)
    assert planner.plan_to_dot(first, m) == planner.plan_to_dot(again, m)


@settings(max_examples=50, deadline=None)
@given(dag_manifests(), st.data())
def test_a_back_edge_makes_a_named_cycle(m: Manifest, data: st.DataObject) -> None:
    # p0 is a source in every generated DAG; make it require something that reaches it
    reaching = [p.name for p in m.programs if p.name != "p0" and "p0" in _closure(m, p.name)]
    if not reaching:
        return
    target = data.draw(st.sampled_from(reaching))
    programs = tuple(
        dataclasses.replace(p, requires=(*p.requires, target)) if p.name == "p0" else p
        for p in m.programs
    )
    with pytest.raises(PlanError) as e:
        planner.compile(dataclasses.replace(m, programs=programs))
    (diag,) = e.value.diagnostics
    cycle = diag.message.removeprefix("requires cycle: ").split(" -> ")
    assert cycle[0] == cycle[-1]
    for a, b in itertools.pairwise(cycle):
        assert b in dict((p.name, p.requires) for p in programs)[a]


def _closure(m: Manifest, name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(m.program(name).requires)
    while todo:
        r = todo.pop()
        if r not in seen:
            seen.add(r)
            todo.extend(m.program(r).requires)
    return seen


GLOB = st.text(alphabet="ab*?", min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.text(alphabet="ab", min_size=1, max_size=4), min_size=1, max_size=5, unique=True),
    st.lists(st.tuples(GLOB, st.sampled_from(["app", "*", "x"]), GLOB), max_size=3),
)
def test_authorization_agrees_with_manifest_authorized(
    hosts: list[str], patterns: list[tuple[str, str, str]]
) -> None:
    program = Program(name="ab", hosts=tuple(hosts), user="app", run=("true",))
    m = make(
        [program],
        hosts=[Host(name=h, address="127.0.0.1") for h in hosts],
        authorize=tuple(".".join(p) for p in patterns),
    )
    denied = [h for h in hosts if not m.authorized(h, "app", "ab")]
    if denied:
        with pytest.raises(PlanError, match=f"not authorized: {denied[0]}.app.ab"):
            planner.compile(m)
    else:
        assert len(planner.compile(m).steps) == len(hosts)


def test_a_manifest_of_too_many_steps_is_refused_before_they_are_made() -> None:
    # a manifest not from manifest.py (rex run builds one): 11 programs on 100,000 hosts
    names = tuple(f"n{i}" for i in range(100_000))
    hosts = [Host(name=n, address=n) for n in names]
    programs = [Program(name=f"p{i}", hosts=names, user="u", run=("true",)) for i in range(11)]
    m = make(programs, hosts=hosts)
    with pytest.raises(PlanError, match=r"1,100,000 steps, more than 1,000,000"):
        planner.compile(m)


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir()))
def test_plan_json_is_the_plan_dict_line_for_line(case: str) -> None:
    # rex plan --json encodes what a program's steps share once (steps_json): the text must
    # be exactly what encoding plan_to_dict writes
    from rexplan.core import manifest as loader
    from rexplan.core.text import json_document

    directory = CASES / case
    m = loader.loads((directory / "manifest.yaml").read_bytes(), "manifest.yaml")
    limit_file = directory / "limit"
    limit = limit_file.read_text().strip() if limit_file.exists() else None
    plan = planner.compile(m, limit=limit)
    assert planner.plan_json(plan, m) == json_document(planner.plan_to_dict(plan, m))
    # every field is either the step's own (encoded per step) or in the shared tail's key
    head = ["id", "wave", "host", "address", "port", "transport", "login", "user"]
    for step in plan.steps:
        keys = list(planner.step_to_dict(step))
        assert keys[:10] == [*head, "program", "triple"]
        assert set(keys[10:]) <= set(planner._SHARED_FIELDS)
