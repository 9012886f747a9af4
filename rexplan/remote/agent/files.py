"""The launch's preconditions (``when``: free disk) and files: a program's ``files`` are
uploaded to REX_HOME/files/<program>/ and must have the sha256 the launch names before it
starts; without a ``cwd`` the program starts in that directory."""

from __future__ import annotations

import os
import stat

from rexplan.remote.agent.failure import EXIT_START, Failure, rex_home
from rexplan.wire import crypto
from rexplan.wire.launch import Launch


def _free_mb(root: str = "") -> int | None:
    """MiB of memory available, from ``root``/proc/meminfo; None when it does not say."""
    try:
        with open(root + "/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _declines(launch: Launch) -> str | None:
    """Why this host will not run the launch now (its ``when``), or None."""
    when = dict(launch.when)
    if "max_load" in when:
        load = os.getloadavg()[0]
        if load > when["max_load"]:
            return f"load average {load:.2f} is above max_load {when['max_load']:g}"
    if "min_free_mb" in when:
        free = _free_mb()
        if free is not None and free < when["min_free_mb"]:
            return f"{free} MB available is below min_free_mb {int(when['min_free_mb'])}"
    return None


def files_dir(home: str, name: str) -> str:
    return os.path.join(home, "files", name)


def _workdir(launch: Launch) -> str | None:
    """The program's working directory: its cwd, else the directory of its files, if any."""
    if launch.cwd is not None or not launch.files:
        return launch.cwd
    return files_dir(rex_home(), launch.log)


def _sha256(path: str) -> str | None:
    """sha256 hex of a regular file (not followed if a symlink); None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = crypto.sha256()
        for block in iter(lambda: os.read(fd, 1 << 16), b""):
            digest.update(block)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _check_files(home: str, launch: Launch) -> None:
    base = files_dir(home, launch.log)
    for dest, sha, _mode in launch.files:
        if _sha256(os.path.join(base, dest)) != sha:
            raise Failure(EXIT_START, f"file {dest} is missing or not the declared content")


def file_hashes(home: str, name: str) -> dict[str, str]:
    """{relative path: sha256} of the regular files under REX_HOME/files/<name>/."""
    base = files_dir(home, name)
    out: dict[str, str] = {}
    for directory, dirs, names in os.walk(base):
        dirs.sort()
        for entry in sorted(names):
            path = os.path.join(directory, entry)
            sha = _sha256(path)
            uploading = entry.startswith(".") and ".rex-" in entry and entry.endswith(".tmp")
            if sha is not None and not uploading:
                out[os.path.relpath(path, base)] = sha
    return out
