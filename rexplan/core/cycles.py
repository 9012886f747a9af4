"""Cycles in the programs' graphs (``requires``, and ``restart_with`` over it), reported where
they can be broken."""

from __future__ import annotations

import graphlib

from rexplan.core.yamlpos import Report


def report_cycles(
    report: Report,
    graph: dict[str, list[str]],
    order: list[str],
    key: str,
    blame: dict[str, list[str]] | None = None,
) -> bool:
    """Report each cycle of ``graph`` at ``programs.NAME.KEY`` (a program of the cycle
    with ``blame`` edges when given); whether there was one."""
    remaining = dict(graph)
    found = False
    while True:
        try:
            graphlib.TopologicalSorter(remaining).prepare()
            return found
        except graphlib.CycleError as exc:
            # graphlib walks predecessors, so its cycle runs against `requires` edges
            found = True
            cycle = list(reversed(exc.args[1]))[:-1]
            start = min(range(len(cycle)), key=lambda i: order.index(cycle[i]))
            cycle = cycle[start:] + cycle[:start]
            at = cycle[0]
            if blame is not None:
                # the program whose restart_with edge closes the cycle
                ring = next(
                    (i for i, n in enumerate(cycle) if cycle[i - len(cycle) + 1] in blame[n]),
                    0,
                )
                at = cycle[ring]
                cycle = cycle[ring:] + cycle[:ring]
            report.value(
                ("programs", at, key),
                f"{key} cycle: " + " -> ".join([*cycle, cycle[0]]),
                "a program cannot wait for itself; remove one of these requires"
                + (" or restart_with" if blame is not None else ""),
            )
            for name in cycle:
                remaining.pop(name, None)
