"""The front, the process SSH started: read the launch line (within ``--wait`` seconds), load
the key, claim the program, fork the supervisor and print its one-line JSON report (diagnostic
only: the launcher trusts only the callback); or run one of the modes that launch nothing.
Before ``ok`` any failure, deadline or signal kills the program's whole group."""

from __future__ import annotations

import gc
import os
import select
import sys
import time

from rexplan.remote.agent import become
from rexplan.remote.agent.boot import boot_modes
from rexplan.remote.agent.failure import (
    _POLL,
    EXIT_AGENT,
    EXIT_BAD_LAUNCH,
    EXIT_NO_LAUNCH,
    EXIT_OK,
    EXIT_START,
    Failure,
    _arm,
    _disarm,
    _print,
    _suppress,
    _trap_signals,
    rex_home,
)
from rexplan.remote.agent.groups import _tagged_groups, kill_group
from rexplan.remote.agent.keys import load_key
from rexplan.remote.agent.load import load_report
from rexplan.remote.agent.logs import logs_mode
from rexplan.remote.agent.records import (
    _claim,
    _prove_same,
    _Same,
    record_name,
    status_report,
    stop_program,
)
from rexplan.remote.agent.supervisor import _child
from rexplan.wire import chars, jsonstrict
from rexplan.wire.launch import KILL_WAIT, MAX_LAUNCH, Launch, LaunchError, parse_kill, parse_launch

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal


def _open_log(home: str, name: str) -> int:
    logs = os.path.join(home, "logs")
    try:
        os.makedirs(logs, mode=0o700, exist_ok=True)
        # readable too: a job's supervisor sends its output's tail from this descriptor
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(os.path.join(logs, f"{name}.log"), flags, 0o600)
    except OSError as exc:
        raise Failure(EXIT_START, f"cannot open the program log: {exc.strerror}") from None


def _await(child: int, fd: int, launch: Launch) -> dict[str, Any]:
    """Read the supervisor's reports until its outcome; clean up if it dies or we are told to."""
    bound = time.monotonic() + sum(v for _, v in launch.deadlines) + launch.deadline("stop") + 5
    pgid = 0
    buf = b""
    try:
        _arm()
        while True:
            remaining = bound - time.monotonic()
            if remaining <= 0:
                raise Failure(EXIT_AGENT, "agent supervisor gave no outcome in time")
            if not select.select([fd], [], [], remaining)[0]:
                continue
            data = os.read(fd, 4096)
            if not data:
                raise Failure(EXIT_AGENT, "agent supervisor died")
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                report = jsonstrict.loads(line.decode("ascii"))
                if "started" in report:
                    pgid = report["started"][1]
                else:
                    if not report["ok"]:
                        os.waitpid(child, 0)
                    return dict(report)
    except Failure as failure:
        _disarm()
        _end_supervisor(child, launch.deadline("stop") + 3)
        result = failure.result()
        if pgid > 1:
            kill_group(pgid, launch.deadline("stop"))
            result["pid"] = pgid
        return result


def _end_supervisor(child: int, within: float) -> None:
    """SIGTERM the supervisor (it kills the program's group first) and reap it; KILL if stuck."""
    try:
        os.kill(child, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + within
    while time.monotonic() < end:
        if os.waitpid(child, os.WNOHANG)[0]:
            return
        time.sleep(_POLL)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)


def _read_line(fd: int, within: float) -> bytes:
    """One line from ``fd`` (or what came before EOF, or MAX_LAUNCH + 1 bytes without a
    newline), which must be complete within ``within`` seconds. Read from the descriptor, not
    sys.stdin: its buffer would hide a partial line from select."""
    end = time.monotonic() + within
    buf = b""
    while b"\n" not in buf and len(buf) <= MAX_LAUNCH:
        remaining = end - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise Failure(EXIT_NO_LAUNCH, f"no launch message within {within:g}s")
        data = os.read(fd, 1 << 16)
        if not data:
            return buf
        buf += data
    return buf[: buf.find(b"\n") + 1 or MAX_LAUNCH + 1]


def _read_launch(wait: float | None = None) -> tuple[Launch, bytes]:
    """The launch and its line as it came (a ``become`` keeper passes it on)."""
    if wait is None:
        line = sys.stdin.buffer.readline(MAX_LAUNCH + 1)
    else:
        line = _read_line(sys.stdin.fileno(), wait)
    if not line.strip():
        raise Failure(EXIT_BAD_LAUNCH, "no launch message on stdin")
    try:
        return parse_launch(line), line
    except LaunchError as exc:
        raise Failure(EXIT_BAD_LAUNCH, f"bad launch message: {exc}") from None


def _kill_request() -> int:
    """``--kill``: read the request line (run, step, grace) from stdin, then kill_tagged."""
    try:
        line = _read_line(sys.stdin.fileno(), KILL_WAIT)
        run, step, grace = parse_kill(line)
    except (Failure, LaunchError) as exc:
        reason = f"--kill needs its request (run, step, grace) on stdin: {exc}"
        return _print(Failure(EXIT_BAD_LAUNCH, reason).result())
    return kill_tagged(run, step, grace)


def kill_tagged(run: str, step: str, grace: float) -> int:
    """End every group run ``run`` started for ``step`` (SIGTERM, ``grace`` s, SIGKILL)."""
    if not chars.RUN_RE.match(run) or not chars.STEP_RE.match(step):
        return _print(Failure(EXIT_BAD_LAUNCH, "--kill needs a run id and a step id").result())
    groups = sorted(g for g in _tagged_groups(run, step) if g > 1 and g != os.getpgrp())
    for pgid in groups:
        kill_group(pgid, grace)
    sys.stdout.write(jsonstrict.dumps({"ok": True, "killed": groups}) + "\n")
    return EXIT_OK


_USAGE = (
    "usage: agent [--wait SECONDS | --status | --stop TRIPLE|PROGRAM [GRACE [force]]"
    " | --kill (request on stdin) | --load loadavg|cgroup SECONDS"
    " | --logs LINES once|follow NAME... | --boot | --boot-entry]"
)


def _modes(args: list[str]) -> int:
    """The modes that launch nothing: read or end what runs (--status, --stop, --kill), or
    measure what the host has to spare (--load); one JSON line on stdout each; or the
    programs' output (--logs, see its module)."""
    if args[:1] == ["--load"] and len(args) == 3 and args[1] in ("loadavg", "cgroup"):
        try:
            sample = float(args[2])
        except ValueError:
            sample = -1.0
        if 0 <= sample <= 60:
            sys.stdout.write(jsonstrict.dumps(load_report(args[1], sample)) + "\n")
            return EXIT_OK
    if args == ["--kill"]:
        return _kill_request()
    if args[:1] == ["--logs"]:
        code = logs_mode(rex_home(), args[1:])
        if code is not None:
            return code
    booted = boot_modes(args, rex_home())
    if booted is not None:
        return booted
    if args == ["--status"]:
        return _print(status_report(rex_home()))
    if (
        args[:1] == ["--stop"]
        and 2 <= len(args) <= 4
        and (chars.NAME_RE.match(args[1]) or chars.is_triple(args[1]))
        and args[3:] in ([], ["force"])
    ):
        try:
            grace = float(args[2]) if len(args) > 2 else 10.0
        except ValueError:
            grace = -1.0
        if 0 < grace <= 86400:
            home = rex_home()
            # a triple's record, or the one the layout before named by its program
            name = record_name(home, args[1]) if "." in args[1] else args[1]
            return _print(stop_program(home, name, grace, force=args[3:] == ["force"]))
    return _print(Failure(EXIT_BAD_LAUNCH, _USAGE).result())


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the launch line on stdin (within ``--wait`` seconds), or one of the
    modes (see _USAGE)."""
    args = sys.argv[1:] if argv is None else argv
    wait = None
    if len(args) == 2 and args[0] == "--wait":
        with _suppress(ValueError):
            wait = float(args[1])
        if wait is None or not 0 < wait <= 86400:
            return _print(Failure(EXIT_BAD_LAUNCH, _USAGE).result())
    elif args:
        return _modes(args)
    _trap_signals()
    try:
        launch, line = _read_launch(wait)
        home = rex_home()
        secret = load_key(home, launch)
        lock_fd, replaced = _claim(home, launch)
        log_fd = _open_log(home, launch.log)
    except Failure as failure:
        return _print(failure.result())
    except _Same as same:
        return _prove_same(launch, secret, same)
    read_end, write_end = os.pipe()
    _disarm()  # until _await, which owns the child and kills it on a signal
    gc.freeze()  # a collection would otherwise copy every page the two processes share
    child = os.fork()
    if child == 0:
        os.close(read_end)
        code = EXIT_AGENT
        try:
            if become.needs_sudo(launch):
                code = become.keep(launch, line, home, secret, log_fd, write_end)
            else:
                code = _child(launch, home, secret, log_fd, write_end)
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(log_fd)
    os.close(lock_fd)  # the supervisor holds the lock from here on
    result = _await(child, read_end, launch)
    if replaced:
        result["replaced"] = True
    code = _print(result)
    # the report is out and the supervisor owns the program: skip the interpreter's teardown
    with _suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
