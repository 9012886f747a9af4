"""StrictModes, as ssh has it: where rex keeps keys, host-key pins and run logs, no other user
may have put or be able to change what it reads or writes.

The key store (``./keys`` or ``$REX_KEYS``), its ``known_hosts`` and the run store
(``.rex/runs`` or ``$REX_STATE_DIR/runs``) are each refused when they are symbolic links,
owned by another user (root excepted), or writable by group or other; so is every directory
above them, on the path as given and on the real path (as ssh checks up the tree), except that
a directory writable by others is accepted above them when it has the sticky bit (``/tmp``):
others may add to it, not rename or remove what is in it. Each problem names the path and the
command that fixes it. Missing paths are no problem here (their creator makes them 0700).
"""

from __future__ import annotations

import os
import stat


def _owner_problem(st: os.stat_result, path: str) -> str | None:
    me = os.geteuid()
    if st.st_uid in (me, 0):
        return None
    return f"{path}: owned by uid {st.st_uid}, not {me} (chown {me} {path}, or use another place)"


def _mode_problem(st: os.stat_result, path: str) -> str | None:
    if not st.st_mode & 0o022:
        return None
    mode = stat.S_IMODE(st.st_mode)
    return f"{path}: mode {mode:04o} lets group or other write to it (chmod go-w {path})"


def parent_problems(path: str | os.PathLike[str]) -> list[str]:
    """What is wrong with the directories above ``path``: each, on the path as given (made
    absolute) and on the real path, owned by the user or root and not writable by group or
    other unless sticky. Directories that do not exist yet are skipped."""
    above = os.path.dirname(os.path.abspath(path))
    problems: list[str] = []
    seen: set[str] = set()
    for start in (above, os.path.realpath(above)):
        directory = start
        while directory not in seen:
            seen.add(directory)
            try:
                st = os.stat(directory)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                problems.append(f"{directory}: {exc.strerror}")
                st = None
            if st is not None:
                found = _owner_problem(st, directory)
                if found is None and not st.st_mode & stat.S_ISVTX:
                    found = _mode_problem(st, directory)
                if found is not None:
                    problems.append(found)
            directory = os.path.dirname(directory)
    return problems


def entry_problems(path: str | os.PathLike[str], *, directory: bool) -> list[str]:
    """What is wrong with ``path`` itself, never followed: a symbolic link, not a directory
    (``directory``) or not a regular file, owned by another user (root excepted), writable by
    group or other. Raises FileNotFoundError when it does not exist."""
    shown = os.fspath(path)
    st = os.lstat(path)
    kind = "directory" if directory else "regular file"
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        return [f"{shown}: is a symbolic link (to {target}); make it a {kind} of its own"]
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        return [f"{shown}: is not a {kind}"]
    return [p for p in (_owner_problem(st, shown), _mode_problem(st, shown)) if p is not None]
