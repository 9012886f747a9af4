"""What the engine's commands print through: implemented by the face (rexplan.cli.ui.Screen),
which chooses a table on a terminal or plain lines for pipes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from rexplan.core.spec import StepStatus, StopResult
from rexplan.trust.output import Output


class Reporter(Output, Protocol):
    def status(
        self,
        statuses: Sequence[StepStatus],
        *,
        actions: Sequence[str] | None = None,
        title: str = "rex status",
        notes: Iterable[str] = (),
    ) -> None:
        """The steps' statuses (and what ``apply --dry-run`` would do), then the totals."""

    def stopped(self, result: StopResult) -> None:
        """One step's stop, as it finishes."""

    def stop_summary(self, results: Sequence[StopResult]) -> None:
        """The totals of a ``rex stop``."""
