"""The descriptor budget: RLIMIT_NOFILE raised for a run's (or the daemon's) connections."""

from __future__ import annotations

import os
import resource

#: descriptors kept free above a run's own estimate: logs, pipes, the listener's sockets
FD_HEADROOM = 256
#: the highest soft limit ensure_fd_budget sets unasked: children inherit the limit, and
#: programs that close every possible descriptor before exec slow down with huge ones
FD_CAP = 65536


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own descriptor
    except OSError:
        return 0  # no /proc: the headroom has to do


def fd_target(soft: int, hard: int, want: int) -> int:
    """The soft limit to set for ``want`` descriptors: the hard limit, but no more than
    max(want, FD_CAP); never lower than ``soft``. RLIM_INFINITY counts as unbounded."""
    if soft == resource.RLIM_INFINITY or want <= soft:
        return soft
    ceiling = max(want, FD_CAP)
    return ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)


def ensure_fd_budget(needed: int) -> str | None:
    """Make room for ``needed`` more open descriptors (one per SSH connection and per callback
    connection a run holds at once, e.g. hosts + 2 * forks) than are open now, raising
    RLIMIT_NOFILE's soft limit toward the hard limit when it is too low.

    None when there is room; else a one-line notice for the user (the hard limit is too low,
    or the limit could not be changed); the soft limit is then as high as it could be set.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _open_fds() + needed + FD_HEADROOM
    target = fd_target(soft, hard, want)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            return (
                f"this run may need {want} open files but cannot raise the limit from "
                f"{soft} to {target} ({exc}); raise it with 'ulimit -n' or use fewer forks"
            )
    if target < want:
        return (
            f"this run may need {want} open files but the hard limit is {hard}; raise it "
            f"with 'ulimit -Hn' (as root) or use fewer forks"
        )
    return None
