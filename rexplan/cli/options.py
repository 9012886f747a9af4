"""The options several commands share, each defined once, so they mean the same everywhere."""

from __future__ import annotations

import argparse
import importlib
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from rexplan.core.model import MAX_PERSIST

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[Any]
Parser = argparse.ArgumentParser
N = TypeVar("N", int, float)

LIMIT = "only steps on matching hosts: comma-separated host globs and group:NAME"
LIMIT_HOSTS = "only hosts matching PATTERN: comma-separated host globs and group:NAME terms"
STORE = "the key store (default: $REX_KEYS, else ./keys)"
KNOWN_HOSTS = (
    "pinned SSH host keys (default: known_hosts in the key store if present, else "
    "~/.ssh/known_hosts); unknown or changed host keys are refused"
)
JSON_DOC = "print a JSON document (format 1, stable keys)"


class Lazy:
    """A command's function, imported when the command runs: building the parser (and
    --help, --version, the commands that never connect) imports no transport or engine."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> int:
        code: int = getattr(importlib.import_module(self.module), self.name)(*args)
        return code


def command(
    sub: Subparsers,
    name: str,
    summary: str,
    about: str,
    epilog: str | None = None,
    func: Callable[..., int] | None = None,
) -> Parser:
    """Add subcommand ``name``: ``summary`` in the list of commands, ``about`` (wrapped at 79
    columns) atop its --help, ``epilog`` (as written) below it, ``func`` what it runs."""
    parser: Parser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(about, 79),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def flag(parser: Parser, name: str, text: str, **more: Any) -> None:
    """An on/off option."""
    parser.add_argument(name, action="store_true", help=text, **more)


def manifest_flag(parser: Parser, text: str = "the manifest (required)") -> None:
    """``-m/--manifest MANIFEST``, required: for commands whose positional is something else."""
    parser.add_argument("-m", "--manifest", metavar="MANIFEST", required=True, help=text)


def limit(parser: Parser, text: str = LIMIT) -> None:
    parser.add_argument("--limit", metavar="PATTERN", help=text)


def forks(parser: Parser, text: str, kind: Callable[[str], int] = int) -> None:
    parser.add_argument("--forks", type=kind, metavar="N", help=text)


def keys(
    parser: Parser,
    store: str = STORE,
    known_hosts: str | None = KNOWN_HOSTS,
    insecure: str | None = None,
) -> None:
    """``--keys DIR``, and ``--known-hosts FILE`` and ``--insecure-keys`` unless None."""
    parser.add_argument("--keys", metavar="DIR", help=store)
    if known_hosts is not None:
        parser.add_argument("--known-hosts", metavar="FILE", help=known_hosts)
    if insecure is not None:
        flag(parser, "--insecure-keys", insecure)


def number(
    convert: Callable[[str], N], what: str, low: float, high: float, rule: str
) -> Callable[[str], N]:
    """An argparse type: ``convert`` of the text (else "'TEXT' is not WHAT"), from ``low`` to
    ``high`` (else ``rule``)."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:  # also false for nan
            raise argparse.ArgumentTypeError(rule)
        return value

    return parse


POSITIVE = number(int, "a whole number", 1, float("inf"), "must be at least 1")
MILLISECONDS = number(
    float, "a number of milliseconds", 0, 1e9 - 1e-6, "must be a number of milliseconds, 0 or more"
)
FANOUT = number(int, "a whole number", 2, 64, "must be from 2 to 64")
_SECONDS = number(
    float, "a number of seconds", 0, MAX_PERSIST, f"must be from 0 to {MAX_PERSIST:g}"
)


def persist(parser: Parser) -> None:
    """``--persist SECONDS`` of the commands that connect to the manifest's hosts."""
    parser.add_argument(
        "--persist",
        type=_SECONDS,
        metavar="SECONDS",
        help="keep the SSH connections open for SECONDS after their last use, in a daemon "
        "of yours, so the next run skips connecting (default: the manifest's "
        "defaults.persist, 0 = off); 'rex disconnect' closes them",
    )
