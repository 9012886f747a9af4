"""Several manifests as one policy, for ``rex audit -m A -m B``: a key store shared by several
manifests audits clean against their union (their hosts, users, steps and authorize patterns).

A host name must mean one machine (address and port) and a user name one login in all of
them; else the union is refused, naming both manifests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from rexplan.core import plan as plans
from rexplan.core.model import Host, Manifest, Plan, Program, Step, User
from rexplan.errors import PlanError, UsageError


def union(manifests: Sequence[Manifest]) -> Manifest:
    """One Manifest holding every host, user, program and authorize pattern of
    ``manifests`` (the first one's settings otherwise); its path names them all."""
    if not manifests:
        raise UsageError("no manifest to audit", hint="give MANIFEST or -m MANIFEST")
    if len(manifests) == 1:
        return manifests[0]
    hosts: dict[str, tuple[Host, str]] = {}
    users: dict[str, tuple[User, str]] = {}
    programs: list[Program] = []
    for m in manifests:
        for h in m.hosts:
            seen = hosts.setdefault(h.name, (h, m.path))
            if (seen[0].address, seen[0].port) != (h.address, h.port):
                raise UsageError(
                    f"host {h.name!r} is {seen[0].address}:{seen[0].port} in {seen[1]} "
                    f"but {h.address}:{h.port} in {m.path}",
                    hint="a host name must mean one machine in the manifests audited together",
                )
        for u in m.users:
            known = users.setdefault(u.name, (u, m.path))
            if known[0].login != u.login:
                raise UsageError(
                    f"user {u.name!r} logs in as {known[0].login!r} in {known[1]} "
                    f"but as {u.login!r} in {m.path}",
                    hint="a user name must mean one login in the manifests audited together",
                )
        programs.extend(m.programs)
    return dataclasses.replace(
        manifests[0],
        path=", ".join(m.path for m in manifests),
        hosts=tuple(h for h, _ in hosts.values()),
        users=tuple(u for u, _ in users.values()),
        programs=tuple(programs),
        authorize=tuple(a for m in manifests for a in m.authorize),
        forks=min(m.forks for m in manifests),
    )


def union_plan(manifests: Sequence[Manifest], limit: str | None = None) -> Plan:
    """Every step of every manifest's plan (``limit``: of those with steps on its hosts), as
    one wave; PlanError when a manifest cannot be compiled, or ``limit`` matches none."""
    steps: dict[tuple[str, str, str], Step] = {}
    first_error: PlanError | None = None
    for m in manifests:
        try:
            compiled = plans.compile(m, limit=limit)
        except PlanError as exc:
            if limit is None:
                raise
            first_error = first_error or exc
            continue
        for s in compiled.steps:
            steps.setdefault((s.host, s.user, s.program), s)
    if not steps and first_error is not None:
        raise first_error
    digest = ",".join(m.digest for m in manifests)
    return Plan(manifest_digest=digest, waves=(tuple(steps.values()),), limit=limit)
