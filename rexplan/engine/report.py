"""What the engine's commands print through: implemented by the face (rexplan.cli.ui.Screen),
which chooses a table on a terminal or plain lines for pipes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rexplan.core.spec import StepStatus, StopResult
from rexplan.trust.output import Output


class Reporter(Output, Protocol):
    def status(self, statuses: Sequence[StepStatus]) -> None:
        """``rex status``: the steps' statuses, then the totals."""

    def dry_run(
        self, statuses: Sequence[StepStatus], actions: Sequence[str], notes: Sequence[str]
    ) -> None:
        """``rex apply --dry-run``: the statuses, what apply would do to each step (totals by
        action), then a line per note (the least-loaded placements)."""

    def stopped(self, result: StopResult) -> None:
        """One step's stop, as it finishes."""

    def stop_summary(self, results: Sequence[StopResult]) -> None:
        """The totals of a ``rex stop``."""
