"""Where a command's text goes: implemented by the face (rexplan.cli.ui.Screen), so the layers
below it never import the face."""

from __future__ import annotations

from typing import Protocol


class Output(Protocol):
    def text(self, text: str) -> None:
        """Write ``text`` as is (JSON, tables for pipes), one line break at its end."""


class Stdout:
    """Output to ``sys.stdout`` of the moment, a line at a time: where a command writes when
    it is run without the face (embedders, the tests of one subcommand)."""

    def text(self, text: str) -> None:
        print(text, flush=True)


STDOUT = Stdout()
