"""Compile a validated Manifest into launch waves of steps; pure: no sockets, files or clock.

Waves are the topological levels of the programs' ``requires`` DAG (graphlib; a ``restart_with``
edge orders as a ``requires`` does): wave 0 holds the programs that require nothing, wave N
those whose deepest requirement is in wave N-1. Inside a wave, programs keep manifest order and
each program's steps keep its hosts' manifest order, so the same manifest always gives the same
plan. A step is one program on one host as its user, with id ``program@host``.

``--limit PATTERN`` keeps only the steps on matching hosts. PATTERN is a comma-separated list of
host-name globs (``web*``, ``node0[0-4]?``) and ``group:NAME`` terms, like Ansible's ``--limit``.
Steps keep the wave numbers of the full plan, so a limited plan is a subset of the full one;
waves left without steps are dropped (``Plan.waves`` then has gaps in its wave numbers). A
limited plan does not start the requirements that live on other hosts: it trusts they run.

The JSON form (``rex plan --json``, ``plan_to_dict``), format 1; keys are always present, in
this order, and later formats only add keys::

    {
      "rex": "0.1.0",                   version of rex that compiled the plan
      "format": 1,
      "manifest": "playbooks/web.yaml", the path as given
      "manifest_digest": "<sha256 hex of the manifest bytes>",
      "limit": null,                    or the --limit pattern
      "waves": [{"wave": 0, "programs": ["db"], "steps": ["db@web1"]}, ...],
      "steps": [{
        "id": "db@web1", "wave": 0,
        "host": "web1", "address": "127.0.0.10", "port": 22, "transport": "ssh",
        "login": "postgres",            the Unix account the step runs as
        "user": "postgres",             the manifest user, part of the triple
        "program": "db", "triple": "web1.postgres.db",
        "argv": ["postgres", "-D", "/data"],  what the agent executes
        "shell": null,                  the shell string when argv is /bin/sh -c STRING
        "ready": {"kind": "tcp", "timeout": 30.0, "interval": 0.2, "settle": 0.5,
                  "port": 5432, "host": "127.0.0.1", "url": null, "argv": [], "path": null},
        "kind": "service", "env": {"PGDATA": "/data"}, "cwd": null, "python": "python3",
        "restart": "no", "stop_timeout": 10.0,
        "timeouts": {"connect": 10.0, "start": 20.0, "callback": 30.0, "ready": 30.0},
        "requires": [],                 program names this step waits for
        "tags": [],                     its program's tags (--tags selects by them)
        "restart_with": [],             programs whose restart restarts this step after them
        "autostart": false              its host starts it again at boot
      }, ...],
      "placements": [{                  one per least-loaded program with steps in the plan
        "program": "app", "strategy": "least-loaded",
        "count": 2,                     apply starts this many of the steps (all if fewer)
        "steps": ["app@web1", ...]      the candidates; apply picks the least loaded
      }, ...]
    }

``waves`` lists every non-empty wave in order; ``steps`` lists every step in launch order
(wave by wave), each exactly once. A least-loaded program's steps are all in the plan: which
of them start is decided by ``rex apply`` at their wave, from the hosts' load then.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import graphlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from json.encoder import encode_basestring_ascii

from rexplan import __version__
from rexplan.core.model import MAX_STEPS, Host, Manifest, Plan, Program, Ready, Step, User, triple
from rexplan.core.text import json_document
from rexplan.errors import Diagnostic, PlanError

#: json.dumps's encoder, without its check for circular values (a plan is a tree)
_ENCODER = json.JSONEncoder(check_circular=False)

FORMAT = 1

#: the top-level keys of the JSON form (plan_to_dict), in order; later formats only add keys
PLAN_KEYS = (
    "rex",
    "format",
    "manifest",
    "manifest_digest",
    "limit",
    "waves",
    "steps",
    "placements",
)

#: how many offending triples one unauthorized-program diagnostic names before "and N more"
_EXAMPLES = 5
#: the Step fields copied from the Host of the same name
_FROM_HOST = ("address", "port", "transport", "python")


def compile(manifest: Manifest, *, limit: str | None = None) -> Plan:
    """The launch plan of ``manifest``, optionally narrowed to the hosts ``limit`` matches.

    Raises PlanError for a ``requires`` cycle, a reference to something the manifest lacks,
    an unauthorized triple, more than MAX_STEPS steps, or a limit that leaves no step.
    """
    # counted before a step is made: checks.py refuses such a manifest, one built otherwise
    # (rex run's) must not make them either
    total = sum(len(p.hosts) for p in manifest.programs)
    if total > MAX_STEPS:
        message = f"the plan would have {total:,} steps, more than {MAX_STEPS:,}"
        raise PlanError([_diag(manifest, "programs", message)])
    levels = _levels(manifest)
    users = {u.name: u for u in manifest.users}
    keep = _limit_filter(manifest, limit) if limit is not None else None

    problems: list[Diagnostic] = []
    waves: list[tuple[Step, ...]] = []
    with _no_gc():
        hosts = {h.name: (h, _host_fields(h)) for h in manifest.hosts}
        for number, programs in enumerate(levels):
            steps: list[Step] = []
            for program in programs:
                steps.extend(_steps(manifest, program, number, hosts, users, keep, problems))
            if steps:
                waves.append(tuple(steps))
    if problems:
        raise PlanError(problems)
    if limit is not None and not waves:
        raise _limit_error(manifest, limit)
    return Plan(manifest_digest=manifest.digest, waves=tuple(waves), limit=limit)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects that form no cycles.

    Collections are triggered by allocation counts, and each full one walks every live object:
    at 250,000 steps the collector took 60% of compile time (Mercurial's util.nogc, same cause).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _levels(manifest: Manifest) -> list[list[Program]]:
    """Programs grouped by topological level of ``requires``, manifest order inside a level."""
    order = {p.name: i for i, p in enumerate(manifest.programs)}
    unknown = [
        _diag(manifest, f"programs.{p.name}.requires", f"unknown program {r!r}")
        for p in manifest.programs
        for r in p.requires
        if r not in order
    ]
    if unknown:
        raise PlanError(unknown)
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for p in manifest.programs:
        # restart_with also orders: a follower restarts after what it follows
        sorter.add(p.name, *p.requires, *(r for r in p.restart_with if r in order))
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        ring = _cycle(e.args[1], order)
        cycle = " -> ".join([*ring, ring[0]])
        raise PlanError(
            [
                _diag(
                    manifest,
                    f"programs.{ring[0]}.requires",
                    f"requires cycle: {cycle}",
                    hint="a program cannot wait for itself; remove one of these requires",
                )
            ]
        ) from None
    levels: list[list[Program]] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=order.__getitem__)
        levels.append([manifest.programs[order[name]] for name in ready])
        sorter.done(*ready)
    return levels


def _cycle(nodes: list[str], order: dict[str, int]) -> list[str]:
    """graphlib's cycle in ``requires`` order (a requires b), from its first program in the file."""
    # graphlib lists each node before the node that requires it, and repeats the first at the end
    ring = list(reversed(nodes))[:-1]
    start = min(range(len(ring)), key=lambda i: order[ring[i]])
    return ring[start:] + ring[:start]


def _steps(
    manifest: Manifest,
    program: Program,
    wave: int,
    hosts: dict[str, tuple[Host, dict[str, object]]],
    users: dict[str, User],
    keep: Callable[[Host], bool] | None,
    problems: list[Diagnostic],
) -> list[Step]:
    """The steps of one program, appending any problem found to ``problems``."""
    where = f"programs.{program.name}"
    user = users.get(program.user)
    if user is None:
        problems.append(_diag(manifest, f"{where}.user", f"unknown user {program.user!r}"))
        return []
    authorized = _host_matcher(manifest, program.user, program.name)
    # hosts whose own user (hosts.*.user) the program's steps there run as
    others: dict[str, tuple[str, str, Callable[[str], object] | None]] = {}
    for name, other in program.host_users:
        login = users[other].login if other in users else ""
        others[name] = (other, login, _host_matcher(manifest, other, program.name))
    # A frozen dataclass __init__ pays one object.__setattr__ per field (about 5 us for Step,
    # a quarter second for 50,000 steps). Each step's dict is filled from this template, which
    # __init__ built, then from its host: every field and default is kept, and the step compares
    # equal to what __init__ would make.
    template = Step(
        id="",
        wave=wave,
        host="",
        address="",
        port=0,
        transport="",
        login=user.login,
        user=program.user,
        program=program.name,
        triple="",
        argv=program.argv,
        shell=program.shell,
        ready=program.ready,
        kind=program.kind,
        env=program.env,
        cwd=program.cwd,
        timeouts=program.timeouts,
        restart=program.restart,
        stop_timeout=program.stop_timeout,
        requires=program.requires,
        become=program.become,
        files=program.files,
        count=len(program.hosts),
        env_clear=program.env_clear,
        tags=program.tags,
        restart_with=program.restart_with,
        autostart=program.autostart,
    )
    base = vars(template)
    rendered = program.rendered
    steps: list[Step] = []
    denied: list[str] = []
    for index, name in enumerate(program.hosts):
        entry = hosts.get(name)
        if entry is None:
            problems.append(_diag(manifest, f"{where}.on", f"unknown host {name!r}"))
            continue
        own = others.get(name)
        t = triple(name, own[0] if own else program.user, program.name)
        allows = own[2] if own else authorized
        # checked before the limit, so a limited plan never passes where the full one fails
        if allows is None or allows(name) is None:
            denied.append(t)
            continue
        if keep is not None and not keep(entry[0]):
            continue
        step = object.__new__(Step)
        fields = vars(step)
        fields.update(base)
        fields.update(entry[1])
        if own:
            fields["user"], fields["login"] = own[0], own[1]
        fields["id"] = f"{program.name}@{name}"
        fields["triple"] = t
        fields["index"] = index
        if rendered:
            fields.update(vars(rendered[index]))
        steps.append(step)
    if denied:
        more = len(denied) - _EXAMPLES
        names = ", ".join(denied[:_EXAMPLES]) + (f" and {more} more" if more > 0 else "")
        problems.append(
            _diag(
                manifest,
                where,
                f"not authorized: {names}",
                hint=f"add a matching host.user.program pattern to authorize, e.g. {denied[0]!r}",
            )
        )
    return steps


def _host_fields(host: Host) -> dict[str, object]:
    """The Step fields that come from the host: its name, and those Step and Host share."""
    fields = vars(host)
    return {"host": host.name, **{name: fields[name] for name in _FROM_HOST}}


def _host_matcher(manifest: Manifest, user: str, program: str) -> Callable[[str], object] | None:
    """One compiled regex over the host globs of the authorizations that fit user and program.

    Same answer as ``Manifest.authorized`` (fnmatchcase per component), but one regex match per
    step instead of a glob per pattern, which matters at 10,000 hosts.
    """
    globs = [
        a.host
        for a in manifest.authorize
        if fnmatch.fnmatchcase(user, a.user) and fnmatch.fnmatchcase(program, a.program)
    ]
    if not globs:
        return None
    return _globs_regex(globs).match


def _globs_regex(globs: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


def _limit_filter(manifest: Manifest, limit: str) -> Callable[[Host], bool]:
    """A predicate for the hosts ``limit`` keeps: host-name globs and ``group:NAME`` terms."""
    terms = [t.strip() for t in limit.split(",") if t.strip()]
    if not terms:
        raise PlanError(
            [_diag(manifest, "", "--limit is empty", hint="give host names, globs or group:NAME")]
        )
    groups = {t[len("group:") :] for t in terms if t.startswith("group:")}
    globs = [t for t in terms if not t.startswith("group:")]
    match = _globs_regex(globs).match if globs else None

    def keep(host: Host) -> bool:
        if match is not None and match(host.name):
            return True
        return not groups.isdisjoint(host.groups)

    return keep


def limit_filter(manifest: Manifest, limit: str) -> Callable[[Host], bool]:
    """The hosts ``--limit`` keeps, as a predicate (PlanError for an empty pattern)."""
    return _limit_filter(manifest, limit)


def _limit_error(manifest: Manifest, limit: str) -> PlanError:
    keep = _limit_filter(manifest, limit)
    matched = [h.name for h in manifest.hosts if keep(h)]
    if matched:
        shown = ", ".join(matched[:_EXAMPLES]) + (" ..." if len(matched) > _EXAMPLES else "")
        message = f"--limit {limit!r} matches hosts ({shown}) but no program runs on them"
    else:
        message = f"--limit {limit!r} matches no host in the manifest"
    known = ", ".join(h.name for h in manifest.hosts[:_EXAMPLES])
    hint = f"use host names, globs like 'web*' or group:NAME; hosts include {known}"
    return PlanError([_diag(manifest, "", message, hint=hint)])


def _diag(manifest: Manifest, path: str, message: str, hint: str | None = None) -> Diagnostic:
    # the plan has no YAML positions; line 0 makes Diagnostic print just the file
    return Diagnostic(manifest.path, 0, 0, path, message, hint)


def ready_to_dict(ready: Ready) -> dict[str, object]:
    """A readiness probe as JSON: every field of Ready, in its order, always present."""
    fields = dict(vars(ready))
    fields["argv"] = list(ready.argv)
    return fields


def step_to_dict(
    step: Step, shared: dict[int, dict[str, object]] | None = None
) -> dict[str, object]:
    """One step as JSON, keys in the documented order (``become`` only when set). ``shared``
    maps id() of a step's probe and timeouts to their JSON, for a whole plan: the steps of a
    program share those objects, so the plan converts (and holds) each once."""
    if shared is None:
        shared = {}
    ready = shared.get(id(step.ready))
    if ready is None:
        ready = shared[id(step.ready)] = ready_to_dict(step.ready)
    timeouts = shared.get(id(step.timeouts))
    if timeouts is None:
        timeouts = shared[id(step.timeouts)] = dict(vars(step.timeouts))
    out: dict[str, object] = {
        "id": step.id,
        "wave": step.wave,
        "host": step.host,
        "address": step.address,
        "port": step.port,
        "transport": step.transport,
        "login": step.login,
        "user": step.user,
        "program": step.program,
        "triple": step.triple,
        "argv": list(step.argv),
        "shell": step.shell,
        "ready": ready,
        "kind": step.kind,
        "env": dict(step.env),
        "cwd": step.cwd,
        "python": step.python,
        "restart": step.restart,
        "stop_timeout": step.stop_timeout,
        "timeouts": timeouts,
        "requires": list(step.requires),
        "tags": list(step.tags),
        "restart_with": list(step.restart_with),
        "autostart": step.autostart,
    }
    if step.become is not None:
        out["become"] = step.become
    return out


def least_loaded(manifest: Manifest, steps: Iterable[Step]) -> dict[str, list[Step]]:
    """The steps of each least-loaded program among ``steps``, programs and steps in the order
    given: ``rex apply`` starts ``placement.count`` of each program's, on the least-loaded hosts."""
    counted = {
        p.name
        for p in manifest.programs
        if p.placement.strategy == "least-loaded" and p.placement.count is not None
    }
    groups: dict[str, list[Step]] = {}
    if counted:
        for s in steps:
            if s.program in counted:
                groups.setdefault(s.program, []).append(s)
    return groups


def placement_to_dict(manifest: Manifest, program: str, steps: Iterable[Step]) -> dict[str, object]:
    """One least-loaded program's candidates as JSON."""
    placement = manifest.program(program).placement
    return {
        "program": program,
        "strategy": placement.strategy,
        "count": placement.count,
        "steps": [s.id for s in steps],
    }


def wave_programs(wave: tuple[Step, ...]) -> list[str]:
    """The programs with steps in a wave, in plan order."""
    return list(dict.fromkeys(s.program for s in wave))


#: the fields of step_to_dict that a program's steps usually share (encoded once: steps_json)
_SHARED_FIELDS = (
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
    "become",
)


def steps_json(steps: Iterable[Step]) -> list[str]:
    """Each step's step_to_dict as json.dumps writes it, for ``rex plan --json``: the fields a
    host's steps share, and those a program's steps share (the same objects, or equal values),
    are encoded once each rather than once per step."""
    escape = encode_basestring_ascii
    encode = _ENCODER.encode
    shared: dict[int, dict[str, object]] = {}
    hosts: dict[tuple[str, str, int, str, str, str], str] = {}
    tails: dict[tuple[object, ...], str] = {}
    lines = []
    for s in steps:
        where = (s.host, s.address, s.port, s.transport, s.login, s.user)
        host = hosts.get(where)
        if host is None:
            host = hosts[where] = (
                f', "host": {escape(s.host)}, "address": {escape(s.address)}, "port": {s.port}'
                f', "transport": {escape(s.transport)}, "login": {escape(s.login)}'
                f', "user": {escape(s.user)}, "program": '
            )
        # the objects stay alive in the plan meanwhile: their ids name them
        same = (
            *(id(getattr(s, f)) for f in ("argv", "ready", "env", "timeouts", "requires")),
            *(id(getattr(s, f)) for f in ("tags", "restart_with")),
            *(getattr(s, f) for f in ("shell", "kind", "cwd", "python", "restart")),
            *(getattr(s, f) for f in ("stop_timeout", "autostart", "become")),
        )
        tail = tails.get(same)
        if tail is None:
            whole = step_to_dict(s, shared)
            rest = {k: whole[k] for k in _SHARED_FIELDS if k in whole}
            tail = tails[same] = ", " + encode(rest)[1:]
        lines.append(
            f'{{"id": {escape(s.id)}, "wave": {s.wave}{host}{escape(s.program)}'
            f', "triple": {escape(s.triple)}{tail}'
        )
    return lines


def plan_json(plan: Plan, manifest: Manifest) -> str:
    """plan_to_dict as ``rex plan --json`` prints it: core.text.json_document's layout, a line
    per step (steps_json)."""
    doc = plan_to_dict(plan, manifest, steps=False)
    doc["steps"] = []
    return json_document(doc, {"steps": steps_json(plan.steps)})


def plan_to_dict(plan: Plan, manifest: Manifest, steps: bool = True) -> dict[str, object]:
    """The stable JSON form documented in this module's docstring (``steps``: False leaves
    them out, for plan_json)."""
    shared: dict[int, dict[str, object]] = {}  # the objects stay alive in the plan meanwhile
    return {
        "rex": __version__,
        "format": FORMAT,
        "manifest": manifest.path,
        "manifest_digest": plan.manifest_digest,
        "limit": plan.limit,
        "waves": [
            {"wave": w[0].wave, "programs": wave_programs(w), "steps": [s.id for s in w]}
            for w in plan.waves
        ],
        "steps": [step_to_dict(s, shared) for s in plan.steps] if steps else [],
        "placements": [
            placement_to_dict(manifest, program, steps)
            for program, steps in least_loaded(manifest, plan.steps).items()
        ],
    }


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def plan_to_dot(plan: Plan, manifest: Manifest) -> str:
    """A Graphviz digraph: one node per program (with its step count), clustered by wave.

    Edges point from a requirement to the program that waits for it, the order of launch.
    """
    lines = [
        "digraph rex {",
        f"  graph [rankdir=LR, labelloc=t, label={_dot_id(manifest.path)}];",
        "  node [shape=box];",
    ]
    present: set[str] = set()
    for wave in plan.waves:
        number = wave[0].wave
        lines.append(f"  subgraph {_dot_id(f'cluster_wave_{number}')} {{")
        lines.append(f"    label={_dot_id(f'wave {number}')};")
        counts: dict[str, int] = {}
        for s in wave:
            counts[s.program] = counts.get(s.program, 0) + 1
        for name, count in counts.items():
            label = _dot_id(f"{name}\n{count} step{'s' if count != 1 else ''}")
            lines.append(f"    {_dot_id(name)} [label={label}];")
            present.add(name)
        lines.append("  }")
    for program in manifest.programs:
        if program.name not in present:
            continue
        for required in program.requires:
            if required in present:
                lines.append(f"  {_dot_id(required)} -> {_dot_id(program.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
