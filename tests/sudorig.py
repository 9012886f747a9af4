"""sudo for the rig: the sudoers.d drop-in that lets a rig account become another without a
password (``become:`` tests), checked with ``visudo -cf`` and installed 0440."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

SUDOERS_D = Path("/etc/sudoers.d")


def sudo_unavailable_reason() -> str | None:
    """Why become tests cannot run here (tests/run installs sudo), or None."""
    for tool in ("sudo", "visudo"):
        if shutil.which(tool) is None:
            return f"become tests need {tool} (tests/run installs sudo with apt-get)"
    if not SUDOERS_D.is_dir():
        return f"become tests need {SUDOERS_D} (sudo's drop-in directory)"
    return None


def write_rules(name: str, rules: list[tuple[str, str]]) -> Path:
    """/etc/sudoers.d/NAME: each (login, target) may run anything as target, no password.
    The file is checked by visudo before it is put in place (atomically, 0440 root)."""
    text = "".join(f"{login} ALL=({target}) NOPASSWD: ALL\n" for login, target in rules)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=SUDOERS_D)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o440)
        os.close(fd)
        out = subprocess.run(["visudo", "-cf", tmp], capture_output=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"visudo refused the rig's sudoers: {out.stdout!r} {out.stderr!r}")
        path = SUDOERS_D / name
        os.replace(tmp, path)
        return path
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_rules(name: str) -> None:
    (SUDOERS_D / name).unlink(missing_ok=True)


def remove_stale(alive: Callable[[int], bool]) -> None:
    """Remove the drop-ins of rig sessions that are gone (crashed or killed): named
    rextest<pid>..., as the rig's accounts."""
    for path in SUDOERS_D.glob("rextest*"):
        match = re.match(r"rextest(\d+)", path.name)
        if match and not alive(int(match.group(1))):
            path.unlink(missing_ok=True)
