"""The login environment of the account a program runs as: what a login shell (or systemd's
``User=``) gives it, from the password database on the host.

``login_env(uid)`` is computed from the uid the program runs as, not from the agent's own
environment, so a program started as another account gets that account's HOME and SHELL.
"""

from __future__ import annotations

import os
import pwd

#: names the login environment sets (unless the manifest's ``env`` does)
NAMES = ("HOME", "USER", "LOGNAME", "SHELL", "LANG")


def login_env(uid: int) -> dict[str, str]:
    """HOME, USER, LOGNAME and SHELL of ``uid`` (none if it has no passwd entry), and LANG
    when the agent's environment has it."""
    env: dict[str, str] = {}
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        entry = None
    if entry is not None:
        env.update(
            HOME=entry.pw_dir or "/",
            USER=entry.pw_name,
            LOGNAME=entry.pw_name,
            SHELL=entry.pw_shell or "/bin/sh",
        )
    lang = os.environ.get("LANG")
    if lang:
        env["LANG"] = lang
    return env
