"""What every part of the agent shares: exit codes, Failure, the front's JSON report, and the
signal handling that turns SIGTERM/SIGHUP/SIGINT into a Failure only while armed.

Exit codes of the front: 0 verified (ok), 10 key missing or insecure, 11 program could not be
started, 12 program exited before it was verified, 13 not ready by the ready deadline, 14 no
verdict by the callback deadline, 15 rejected (``no``, or a listener that could not prove it
holds the key), 16 bad launch message, 17 the supervisor died or failed, 18 the triple is
already running here, 19 the host declined (a ``when`` precondition failed, proved with
protocol ``decl``), 21 no launch line within ``--wait`` SECONDS, 22 ``sudo -n`` would not run
the supervisor as the ``become`` account, 23 the triple runs here for another manifest
(``owned``; a launch with ``take_over`` replaces it); 128+N: the front got signal N.
"""

from __future__ import annotations

import os
import sys

from rexplan.wire import jsonstrict

# Every agent run pays for its imports: tempfile and traceback come where used, typing never,
# and no subprocess (it imports threading and selectors): _Proc and _start do what the agent
# needs of it. The signal and socket modules are their C halves, _signal and _socket: the
# Python wrappers build enums of every constant and import selectors, together about a third
# of an agent start's CPU with subprocess.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from typing import Any
else:
    import _signal as signal
    import _socket as socket


EXIT_OK = 0
EXIT_KEY = 10
EXIT_START = 11
EXIT_EXITED = 12
EXIT_NOT_READY = 13
EXIT_NO_CALLBACK = 14
EXIT_REJECTED = 15
EXIT_BAD_LAUNCH = 16
EXIT_AGENT = 17
EXIT_RUNNING = 18
EXIT_DECLINED = 19
#: the launch line did not come within ``--wait`` seconds; shipping.EXIT_NO_LAUNCH
EXIT_NO_LAUNCH = 21
#: ``sudo -n -u ACCOUNT`` refused (a password asked, no rule, no sudo): see agent/become.py
EXIT_BECOME = 22
#: the triple runs here for another manifest (``owned``)
EXIT_OWNED = 23

RESTART_FIRST = 0.5  # seconds before the first restart; doubles for each restart in a row
RESTART_CAP = 30.0
RESTART_LIMIT = 10  # restarts in a row before the supervisor gives up
RESTART_RESET = 60.0  # a run this long counts as healthy: backoff and count start over

_POLL = 0.02  # seconds between checks while waiting for a process group to die
_Timeout = socket.timeout  # not TimeoutError: they are one class only from Python 3.10 on


class _suppress:
    """Ignore the given exceptions in a with block: contextlib.suppress, without contextlib
    (which imports functools and collections at every agent start)."""

    def __init__(self, *kinds: type[BaseException]) -> None:
        self.kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, self.kinds)


class Failure(Exception):
    """The launch failed: an exit code and a one-line reason that holds no secret; a refused
    callback names the key_id (public) of the key the agent holds, for the launcher to say
    whether it was the wrong one."""

    def __init__(
        self, code: int, reason: str, status: int | None = None, key_id: str | None = None
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status
        self.key_id = key_id

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "exit": self.code, "reason": self.reason}
        if self.status is not None:
            out["status"] = self.status
        if self.key_id is not None:
            out["key_id"] = self.key_id
        return out


class _Stop(Exception):
    """SIGTERM or SIGINT to the supervisor after ``ok``: stop the program."""


class _Forced:
    """A stop that kills at once (no grace): set in a ``become`` supervisor when its keeper
    (the login's half, see agent/become.py) is gone, as after ``rex stop --force``."""

    on = False


def _grace(seconds: float) -> float:
    """The grace a stop gives the program: none when forced."""
    return 0.0 if _Forced.on else seconds


class _Signals:
    """Handlers raise only while armed (never mid-fork, mid-spawn or in cleanup) and remember
    a signal that came while disarmed, so the next _arm() raises it."""

    armed = True
    pending = 0


def _on_signal(signum: int, frame: object) -> None:
    if _Signals.armed:
        _Signals.armed = False
        raise Failure(128 + signum, f"agent received signal {signum}")
    _Signals.pending = _Signals.pending or signum


def _disarm() -> None:
    _Signals.armed = False


def _arm() -> None:
    signum, _Signals.pending = _Signals.pending, 0
    _Signals.armed = not signum
    if signum:
        raise Failure(128 + signum, f"agent received signal {signum}")


def _trap_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _on_signal)


def rex_home() -> str:
    # absolute: the supervisor changes into the program's directory before it starts it
    home = os.environ.get("REX_HOME") or os.path.join(os.path.expanduser("~"), ".rex")
    return os.path.abspath(home)


def _print_exc() -> None:
    import traceback

    traceback.print_exc()


def _print(result: dict[str, Any]) -> int:
    # OSError: the launcher is gone; the exit code still tells
    with _suppress(OSError):
        sys.stdout.write(jsonstrict.dumps(result) + "\n")
        sys.stdout.flush()
        if not result["ok"]:
            sys.stderr.write(f"rex-agent: {result['reason']}\n")
            sys.stderr.flush()
    return EXIT_OK if result["ok"] else int(result["exit"])
