"""``become`` and ``become_method``: the account a program runs as, through ``sudo -n``,
instead of its user's SSH login. The program's own setting wins over its user's, which wins
over ``defaults``; ``sudo`` is the only method. Each level is checked once, where it is
written (file:line:column)."""

from __future__ import annotations

import re
from typing import Any

from rexplan.core.values import as_map
from rexplan.core.yamlpos import KeyPath, Report

#: the ways to become another account; ``sudo -n`` (never a password prompt) only
METHODS = ("sudo",)
_ACCOUNT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")


class Become:
    """Resolves and checks ``become`` for the programs of one manifest."""

    def __init__(self, doc: dict[str, Any], report: Report) -> None:
        self.doc = doc
        self.report = report
        self._levels: dict[KeyPath, tuple[bool, str | None]] = {}

    def _level(self, path: KeyPath, spec: dict[str, Any]) -> tuple[bool, str | None]:
        """(whether ``spec`` sets become, the account when it is valid), checked once."""
        if path in self._levels:
            return self._levels[path]
        method = spec.get("become_method")
        if "become_method" in spec and method not in METHODS:
            self.report.value(
                (*path, "become_method"),
                f"unknown become_method {method!r}",
                f"the only method is {', '.join(METHODS)} (it runs sudo -n, never a prompt)",
            )
        account = spec.get("become")
        found = "become" in spec and account is not None
        if found and (not isinstance(account, str) or not _ACCOUNT_RE.match(account)):
            self.report.value(
                (*path, "become"),
                f"invalid account {account!r} for become",
                "give a Unix account name, e.g. become: postgres",
            )
            account = None
        self._levels[path] = (found, account if found else None)
        return self._levels[path]

    def of(self, path: KeyPath, spec: dict[str, Any], user: str | None) -> str | None:
        """The account program ``spec`` (at ``path``) runs as; None: its user's login."""
        users = as_map(self.doc.get("users"))
        levels: list[tuple[KeyPath, dict[str, Any]]] = [(path, spec)]
        if user is not None:
            levels.append((("users", user), as_map(users.get(user))))
        levels.append((("defaults",), as_map(self.doc.get("defaults"))))
        for where, source in levels:
            found, account = self._level(where, source)
            if found:
                return account
        return None

    def check_all(self) -> None:
        """Check every user's and the defaults' setting, used by a program or not."""
        for name, value in as_map(self.doc.get("users")).items():
            self._level(("users", name), as_map(value))
        self._level(("defaults",), as_map(self.doc.get("defaults")))
