"""Stored runs: every ``rex apply`` keeps its events in ``.rex/runs/<run id>.jsonl``.

The state directory and its ``runs`` are checked as ssh's StrictModes would before a run log
is written or runs are listed (rexplan.trust.strictmodes): a symlink, another user's directory, or
one that group or other may write to (or a directory above them that others may write to)
raises InsecurePathError (exit 6), so nobody else can plant, swap or redirect a run log. The
log is opened through the checked directory's fd, never by following a link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from rexplan.engine import events as ev
from rexplan.errors import InsecurePathError, UsageError
from rexplan.trust import strictmodes

#: runs kept; older ones are removed when a new one starts
KEEP = 20

#: run ids as new_run_id() makes them; anything else is not a stored run's name
RUN_ID_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")

_SUFFIX = ".jsonl"
_EVENT_FIELDS = {f.name for f in dataclasses.fields(ev.Event)}


def new_run_id() -> str:
    """A fresh run id: time-ordered, then 128 random bits, so a stranger cannot guess one
    (the listener refuses a callback naming another run before any HMAC)."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(16)


def state_dir() -> Path:
    """``$REX_STATE_DIR`` when set, else ``.rex`` in the current directory (kept relative, so
    messages that name it stay short)."""
    return Path(os.environ.get("REX_STATE_DIR") or ".rex")


def runs_dir() -> Path:
    """Where the runs are: ``<state dir>/runs``."""
    return state_dir() / "runs"


def _checked_runs_dir(*, create: bool) -> bool:
    """Check (and with ``create`` make, 0700) the state directory and its runs/; False when
    runs/ does not exist. Raises InsecurePathError naming each problem and its fix."""
    state = state_dir()
    directory = runs_dir()
    if create:
        os.makedirs(state.parent, mode=0o700, exist_ok=True)
    problems = strictmodes.parent_problems(state)
    for path in (state, directory):
        if create and not problems:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        try:
            problems += strictmodes.entry_problems(path, directory=True)
        except FileNotFoundError:
            if not problems:
                return False
            break
    if problems:
        raise InsecurePathError(
            "; ".join(problems),
            hint="runs are kept in a directory only you can write to (as ssh's StrictModes); "
            "fix what is named, or set REX_STATE_DIR to such a place",
        )
    return True


def open_run_log(
    run_id: str, *, keep: int = KEEP, warn: Callable[[str], None] | None = None
) -> tuple[ev.Sink, Callable[[], None]]:
    """(sink, close) writing the run's events to ``runs/<run_id>.jsonl`` (0600 in a 0700
    directory), then prune to the newest ``keep`` runs, this one included. A run log that
    cannot be written costs a warning, never the run: the sink then drops events. An insecure
    one (see the module) raises InsecurePathError before anything runs."""
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    directory = runs_dir()
    try:
        _checked_runs_dir(create=True)
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # mkdir's mode is filtered by the umask, and the directory may predate rex
            if os.fstat(dirfd).st_uid == os.geteuid():
                os.fchmod(dirfd, 0o700)
            fd = os.open(
                f"{run_id}{_SUFFIX}",
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dirfd,
            )
        finally:
            os.close(dirfd)
    except OSError as exc:
        if warn is not None:
            warn(f"run events not stored ({directory}: {exc.strerror or exc})")
        return (lambda _event: None), (lambda: None)
    log = _RunLog(os.fdopen(fd, "w", encoding="utf-8"), warn)
    prune(keep)
    return log, log.close


class _RunLog:
    """A JSONL sink that stops writing, with one warning, at its first error (disk full)."""

    def __init__(self, stream: IO[str], warn: Callable[[str], None] | None) -> None:
        self._stream = stream
        self._writer: ev.Sink | None = ev.JsonlWriter(stream)
        self._warn = warn

    def __call__(self, event: ev.Event) -> None:
        if self._writer is None:
            return
        try:
            self._writer(event)
        except OSError as exc:
            self._writer = None
            if self._warn is not None:
                self._warn(f"run events no longer stored: {exc.strerror or exc}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.close()


def list_runs() -> list[str]:
    """Stored run ids, oldest first (ids sort by start time); InsecurePathError when the
    runs directory is not safe to read (see the module)."""
    if not _checked_runs_dir(create=False):
        return []
    try:
        names = os.listdir(runs_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    ids = (n[: -len(_SUFFIX)] for n in names if n.endswith(_SUFFIX))
    return sorted(i for i in ids if RUN_ID_RE.match(i))


def prune(keep: int = KEEP) -> list[str]:
    """Remove all but the newest ``keep`` runs; the ids removed."""
    stored = list_runs()
    gone = stored[: max(0, len(stored) - keep)]
    for run_id in gone:
        with contextlib.suppress(FileNotFoundError):
            (runs_dir() / f"{run_id}{_SUFFIX}").unlink()
    return gone


def resolve(ref: str | None) -> str:
    """The stored run ``ref`` names (a run id or a unique prefix); the newest for None."""
    stored = list_runs()
    where = runs_dir()
    if not stored:
        raise UsageError(
            f"no stored runs in {where}",
            hint="runs are stored by 'rex apply' in .rex/runs of the directory it ran in "
            "(or $REX_STATE_DIR/runs)",
        )
    if ref is None:
        return stored[-1]
    if ref in stored:
        return ref
    matches = [r for r in stored if r.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(
            f"no stored run {ref!r} in {where}", hint="'rex blame --list' shows the stored runs"
        )
    raise UsageError(
        f"run prefix {ref!r} is ambiguous: {', '.join(matches)}",
        hint="give more characters of the run id",
    )


def load_run(ref: str | None = None) -> tuple[str, list[ev.Event]]:
    """(run id, its events in the order they were written); see resolve() for ``ref``.

    Lines that do not parse (the tail of a run killed mid-write) are skipped.
    """
    run_id = resolve(ref)
    path = runs_dir() / f"{run_id}{_SUFFIX}"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read run {run_id}: {path}: {exc.strerror or exc}") from None
    return run_id, parse_events(text)


def parse_events(text: str) -> list[ev.Event]:
    """Events from JSONL text; fields this version does not know are ignored."""
    out = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            continue
        fields = {k: v for k, v in data.items() if k in _EVENT_FIELDS}
        fields.setdefault("run", "")
        if not isinstance(fields.get("t"), (int, float)):
            continue
        try:
            out.append(ev.Event(**fields))
        except TypeError:
            continue
    return out
