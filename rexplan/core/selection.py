"""Which steps a command acts on: ``--limit`` (hosts, in plan.compile), ``--program`` and
``--tags`` (here); pure, no I/O. apply, status, stop, restart (and any command that acts on
steps) narrow their plan with ``select``, so one selection means the same steps everywhere.

``--program NAME`` is a program-name glob (``web*``), repeatable; ``--tags T`` is a comma-
separated list of tags, repeatable. A step is kept when its program matches one of the
``--program`` globs (if any were given) and has one of the ``--tags`` (if any were given).
Steps keep their wave numbers, as with ``--limit``: requirements left out are trusted to run.

``followers`` is the closure ``restart_with`` makes: the programs that restart after the
given ones, directly or through each other (systemd's PartOf=).
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Callable, Iterable, Sequence

from rexplan.core.model import Manifest, Plan, Step
from rexplan.errors import UsageError


def split_tags(values: Iterable[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: the tags of repeated, comma-separated
    ``--tags`` options."""
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def matching_programs(
    manifest: Manifest, programs: Sequence[str] = (), tags: Sequence[str] = ()
) -> set[str]:
    """The names of the programs that ``programs`` (globs) and ``tags`` select; UsageError
    for a glob or a tag that matches no program (a typo must not act on nothing)."""
    names = [p.name for p in manifest.programs]
    chosen = set(names)
    if programs:
        globbed: set[str] = set()
        for pattern in programs:
            hits = fnmatch.filter(names, pattern)
            if not hits:
                raise UsageError(
                    f"--program {pattern}: no such program in {manifest.path}",
                    hint="programs: " + ", ".join(names),
                )
            globbed.update(hits)
        chosen &= globbed
    if tags:
        known = {t for p in manifest.programs for t in p.tags}
        for tag in tags:
            if tag not in known:
                raise UsageError(
                    f"--tags {tag}: no program of {manifest.path} has this tag",
                    hint=("tags: " + ", ".join(sorted(known))) if known else "add tags: [..]",
                )
        wanted = set(tags)
        chosen &= {p.name for p in manifest.programs if wanted.intersection(p.tags)}
    return chosen


def narrow(plan: Plan, keep: set[str]) -> Plan:
    """``plan`` reduced to the steps of the programs named in ``keep`` (wave numbers kept)."""
    return _only(plan, lambda s: s.program in keep)


def _only(plan: Plan, keep: Callable[[Step], bool]) -> Plan:
    waves = tuple(w for w in (tuple(s for s in wave if keep(s)) for wave in plan.waves) if w)
    return Plan(manifest_digest=plan.manifest_digest, waves=waves, limit=plan.limit)


def select(
    manifest: Manifest, plan: Plan, *, programs: Sequence[str] = (), tags: Sequence[str] = ()
) -> Plan:
    """``plan`` (already narrowed by ``--limit``) narrowed to the steps of the programs that
    ``programs`` and ``tags`` select; the plan itself when neither is given. UsageError when
    nothing is left."""
    if not programs and not tags:
        return plan
    chosen = matching_programs(manifest, programs, tags)
    narrowed = narrow(plan, chosen)
    if not narrowed.waves:
        given = [*(f"--program {p}" for p in programs), *(f"--tags {t}" for t in tags)]
        where = f" on the hosts of --limit {plan.limit}" if plan.limit else ""
        raise UsageError(
            f"{' '.join(given)} select no step{where}",
            hint="rex plan shows the steps and their programs",
        )
    return narrowed


def followers(manifest: Manifest, names: Iterable[str]) -> set[str]:
    """The programs that ``restart_with`` one of ``names`` (directly or through another
    follower), ``names`` excluded."""
    start = set(names)
    found: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        for p in manifest.programs:
            if name in p.restart_with and p.name not in found:
                found.add(p.name)
                todo.append(p.name)
    return found - start


def with_followers(manifest: Manifest, selected: Plan, full: Plan) -> Plan:
    """``selected`` plus the steps of ``full`` whose programs follow a selected program
    (``restart_with``), in ``full``'s order."""
    ids = {s.id for s in selected.steps}
    extra = followers(manifest, {s.program for s in selected.steps})
    return _only(full, lambda s: s.id in ids or s.program in extra)


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--program NAME`` and ``--tags T`` on a command that acts on a manifest's steps."""
    parser.add_argument(
        "--program",
        action="append",
        default=[],
        metavar="NAME",
        help="only the steps of programs matching NAME (a glob; repeatable)",
    )
    parser.add_argument(
        "--tags",
        action="append",
        default=[],
        metavar="T",
        help="only the steps of programs with one of these tags (comma-separated; repeatable)",
    )


def from_args(args: argparse.Namespace, manifest: Manifest, plan: Plan) -> Plan:
    """``plan`` narrowed by the ``--program`` and ``--tags`` options of ``args``."""
    return select(
        manifest,
        plan,
        programs=list(getattr(args, "program", None) or ()),
        tags=split_tags(getattr(args, "tags", None) or ()),
    )
