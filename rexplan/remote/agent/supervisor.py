"""The supervisor: forked by the front, it leaves the SSH session, starts the program in a
session of its own, probes it, runs the callback, reports to the front over a pipe, then stays
the program's parent: it restarts it per its ``restart`` policy (RESTART_FIRST seconds,
doubling to RESTART_CAP, at most RESTART_LIMIT in a row) and stops it on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import select
import sys
import time

from rexplan.remote.agent.account import login_env
from rexplan.remote.agent.cgroup import (
    _Cgroup,
    _drop_cgroup,
    _make_cgroup,
    _reap_watchdog,
    _release_watchdog,
    _start_watchdog,
    _tell_watchdog,
    cgroup_kill,
)
from rexplan.remote.agent.dialback import _Link, call_back, decline_back
from rexplan.remote.agent.failure import (
    EXIT_AGENT,
    EXIT_DECLINED,
    EXIT_EXITED,
    EXIT_START,
    RESTART_CAP,
    RESTART_FIRST,
    RESTART_LIMIT,
    RESTART_RESET,
    Failure,
    _arm,
    _disarm,
    _Forced,
    _grace,
    _print_exc,
    _Stop,
    _suppress,
)
from rexplan.remote.agent.files import _check_files, _declines, _workdir
from rexplan.remote.agent.groups import kill_group, start_time, sweep
from rexplan.remote.agent.logpump import LogPump, log_path
from rexplan.remote.agent.probes import _close_notify, _notify_socket, wait_ready
from rexplan.remote.agent.procs import _cloexec_inherited, _Proc, _SpawnError, _start
from rexplan.remote.agent.records import _write_state
from rexplan.wire import codes, frames, jobs, jsonstrict, messages
from rexplan.wire.launch import Launch

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from typing import Any
else:
    import _signal as signal
    import _socket as socket


def _program_env(launch: Launch, notify: str | None, uid: int | None = None) -> dict[str, str]:
    """The program's environment: the login environment of ``uid`` (default: the agent's
    own; none with ``env_clear``) under the manifest's ``env``, PATH, and the REX_* names."""
    env = {} if launch.env_clear else login_env(os.getuid() if uid is None else uid)
    env.update(launch.env)
    if "PATH" not in env and "PATH" in os.environ:
        env["PATH"] = os.environ["PATH"]
    env.update(launch.tags)
    env.update(REX_RUN=launch.run, REX_STEP=launch.step, REX_TRIPLE=launch.triple)
    env.update(
        REX_HOST=launch.triple.rsplit(".", 2)[0],
        REX_INDEX=str(launch.index),
        REX_COUNT=str(launch.count),
    )
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    return env


def _report(fd: int, obj: dict[str, Any]) -> None:
    # OSError: the front is gone; the outcome stands without it
    with _suppress(OSError):
        os.write(fd, jsonstrict.dumps(obj).encode("ascii") + b"\n")


def _spawn(launch: Launch, pump: LogPump, env: dict[str, str], restart: int = 0) -> _Proc:
    what = f"restart {restart}" if restart else "starting"
    pump.begin(f"run {launch.run} step {launch.step} {what}")
    log_fd = pump.write_fd
    # Joining the cgroup from the child, before exec, is the only way nothing the program
    # forks starts outside (from the supervisor, after the spawn, the cgroup write takes
    # effect milliseconds later, when a daemonizing program has long forked).
    try:
        if _Cgroup.procs >= 0:
            try:
                return _start(launch.argv, env, _workdir(launch), log_fd, _Cgroup.procs)
            except _SpawnError:  # nothing was started
                sys.stderr.write("rex: the program could not join its cgroup; it runs without\n")
                _drop_cgroup()
        return _start(launch.argv, env, _workdir(launch), log_fd)
    except OSError as exc:
        raise Failure(EXIT_START, f"cannot start {launch.argv[0]!r}: {exc.strerror}") from None


def _supervise(launch: Launch, home: str, secret: bytes, pump: LogPump, out: int) -> int:
    """The supervisor's life; returns its exit code. ``out`` is the report pipe to the front."""
    began = time.monotonic()
    proc: _Proc | None = None
    notify: socket.socket | None = None
    notify_path: str | None = None
    try:
        declined = _declines(launch)
        if declined is not None:
            _arm()
            decline_back(launch, secret, declined, began + launch.deadline("callback"))
            raise Failure(EXIT_DECLINED, f"declined: {declined}")
        _check_files(home, launch)
        if launch.ready.kind == "notify":
            notify, notify_path = _notify_socket(home)
        env = _program_env(launch, notify_path)
        began_wall = time.time()
        _start_watchdog(launch)
        cgroup = _make_cgroup(launch)
        if cgroup is not None:
            _tell_watchdog("cgroup", cgroup)
        proc = _spawn(launch, pump, env)
        start = start_time(proc.pid)
        _tell_watchdog("pid", str(proc.pid), start)
        _report(out, {"started": [proc.pid, proc.pid]})
        _arm()
        if time.monotonic() - began > launch.deadline("start"):
            raise Failure(EXIT_START, "program did not start by the start deadline")
        if launch.kind != "job":  # a job is ready once started: it may well end at once
            ready_by = time.monotonic() + launch.deadline("ready")
            ready_in = launch.deadline("ready")
            wait_ready(proc, launch.ready, ready_by, _workdir(launch), env, notify, ready_in)
        link = call_back(
            launch, secret, proc, start, time.monotonic() + launch.deadline("callback")
        )
        _release_watchdog()
        # Verified: from here SIGTERM/SIGINT ask for a stop, as after ok (_after_ok and _job
        # take the request at their first wait), instead of failing a verified launch and
        # leaving the program without its supervisor.
        signal.signal(signal.SIGTERM, _on_stop)
        signal.signal(signal.SIGINT, _on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    except BaseException as exc:
        _disarm()
        if not isinstance(exc, Failure):
            _print_exc()  # into the program log
        failure = exc if isinstance(exc, Failure) else Failure(EXIT_AGENT, "agent failed")
        result = failure.result()
        fields: dict[str, Any] = {"state": "failed", "reason": failure.reason, "restarts": 0}
        if proc is not None:
            kill_group(proc.pid, _grace(launch.deadline("stop")), proc)
            result["pid"] = proc.pid
            fields.update(pid=proc.pid, pgid=proc.pid, status=proc.returncode)
            if failure.code == EXIT_EXITED:
                fields["state"] = "exited"
            # what the program said last, for the launcher to show under FAILED
            result["tail"] = pump.tail(jobs.FAIL_TAIL).decode("utf-8", "replace")
            result["log"] = pump.path
            pump.note(f"failed: {failure.reason}")
        if _Cgroup.path is not None:  # what left the group before ok goes too
            cgroup_kill(_Cgroup.path)
            _drop_cgroup()
        if failure.code == EXIT_DECLINED:
            fields["state"] = "declined"
        _write_state(home, launch, **fields)
        _report(out, result)
        return failure.code
    finally:
        _close_notify(notify, notify_path)
    pid = proc.pid
    _write_state(
        home,
        launch,
        pid=pid,
        pgid=pid,
        start=start,
        started=began_wall,
        state="running",
        status=None,
        restarts=0,
    )
    _report(out, {"ok": True, "pid": pid, "pgid": pid, "agent": os.getpid(), "log": pump.path})
    os.close(out)
    _reap_watchdog()
    if link is not None:
        return _job(launch, home, _Run(proc, start, began_wall), link, pump)
    env.pop("NOTIFY_SOCKET", None)  # that socket served the first readiness only
    return _after_ok(launch, home, _Run(proc, start, began_wall), env, pump)


def _heard(link: _Link, seq: int) -> int:
    """Take the launcher's pending heartbeats; the last seq, or raise: closed (EOFError),
    forged or out of sequence (FrameError), or a broken connection (OSError)."""
    data = link.sock.recv(link.reader.wanted())
    if not data:
        raise EOFError()
    for msg in link.reader.feed(data):
        beat = messages.check_message(msg, "hb")
        if beat["seq"] != seq + 1 or not link.session.verify(link.session.k_l, beat, b""):
            raise codes.FrameError(codes.BAD_PROOF, "heartbeat forged or out of sequence")
        seq = beat["seq"]
    return seq


def _job(launch: Launch, home: str, run: _Run, link: _Link, pump: LogPump) -> int:
    """Keep the launcher's connection while the job runs; then send the tail of its output
    and its exit status. The job is killed when the launcher goes: the connection ends or
    fails, a heartbeat does not verify, or none came for jobs.JOB_SILENCE seconds.
    SIGTERM/SIGINT to the supervisor stop it too."""
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    grace = launch.deadline("stop")
    heard = time.monotonic()
    seq = 0
    why = ""
    try:
        while run.proc.poll() is None:
            if time.monotonic() - heard > jobs.JOB_SILENCE:
                why = "no heartbeat from the launcher"
                break
            with _stoppable():
                readable = select.select([link.sock], [], [], 0.05)[0]
            if readable:
                try:
                    seq = _heard(link, seq)
                except EOFError:
                    why = "the launcher closed the connection"
                    break
                except (OSError, codes.FrameError) as exc:
                    why = f"the launcher's connection failed: {exc}"
                    break
                heard = time.monotonic()
    except _Stop:
        why = "stopped"
    if why:
        link.sock.close()
        kill_group(run.proc.pid, _grace(grace), run.proc)
        run.proc.wait()
        sweep(launch.triple, _grace(grace), _Forced.on)
        state = "stopped" if why == "stopped" else "failed"
        pump.note(f"{state}: {why}")
        fields = run.fields(state=state, status=run.proc.returncode, reason=why, restarts=0)
        _write_state(home, launch, **fields)
        return 0
    status = run.proc.wait()
    _write_state(home, launch, **run.fields(state="exited", status=status, restarts=0))
    output = pump.tail(jobs.OUT_TAIL)
    pump.note(f"exited with status {status}")
    _finish_job(link, output, status)
    return 0


def _finish_job(link: _Link, output: bytes, status: int) -> None:
    """Send the output's tail and the exit status, then wait (briefly) for the launcher to
    close first: closing with its heartbeats unread would reset the connection and could
    lose the last frames."""
    out = [
        jobs.make_out(link.session, i + 1, output[k : k + jobs.OUT_CHUNK])
        for i, k in enumerate(range(0, len(output), jobs.OUT_CHUNK))
    ]
    out.append(jobs.make_exit(link.session, len(out) + 1, status))
    try:
        # OSError: the launcher went away; the record still holds the status
        with _suppress(OSError):
            link.sock.settimeout(jobs.JOB_SILENCE)
            for frame in out:
                link.sock.sendall(frames.encode_frame(frame))
            link.sock.shutdown(socket.SHUT_WR)
            while link.sock.recv(4096):
                continue
    finally:
        link.sock.close()


class _Stopping:
    """A stop request (SIGTERM/SIGINT) after ``ok``: raised as _Stop only while armed, at
    points where unwinding is safe (waiting, sleeping), remembered otherwise."""

    requested = False
    armed = False


def _on_stop(signum: int, frame: object) -> None:
    _Stopping.requested = True
    if _Stopping.armed:
        _Stopping.armed = False
        raise _Stop()


class _stoppable:
    """A block a stop request may interrupt (raising _Stop): a wait or a sleep."""

    def __enter__(self) -> None:
        if _Stopping.requested:
            raise _Stop()
        _Stopping.armed = True

    def __exit__(self, *exc: object) -> None:
        _Stopping.armed = False


class _Run:
    """One run of the program under the supervisor."""

    def __init__(self, proc: _Proc, start: str, started: float) -> None:
        self.proc = proc
        self.start = start
        self.started = started
        self.began = time.monotonic()

    def fields(self, **more: Any) -> dict[str, Any]:
        pid = self.proc.pid
        out = {"pid": pid, "pgid": pid, "start": self.start, "started": self.started}
        out.update(more)
        return out


def _restart_due(policy: str, status: int) -> bool:
    return policy == "always" or (policy == "on-failure" and status != 0)


def _after_ok(launch: Launch, home: str, run: _Run, env: dict[str, str], pump: LogPump) -> int:
    """Stay the program's parent: record how each run ends and restart it by policy.
    SIGTERM/SIGINT stop it for good; SIGHUP is ignored."""
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    grace = launch.deadline("stop")
    restarts = in_a_row = 0
    delay = RESTART_FIRST
    try:
        while True:
            with _stoppable():
                status = run.proc.wait()
            pump.note(f"exited with status {status}")
            if not _restart_due(launch.restart, status):
                _write_state(
                    home, launch, **run.fields(state="exited", status=status, restarts=restarts)
                )
                return 0
            if time.monotonic() - run.began >= RESTART_RESET:
                delay, in_a_row = RESTART_FIRST, 0
            if in_a_row >= RESTART_LIMIT:
                reason = f"gave up after {in_a_row} restarts in a row"
                fields = run.fields(state="exited", status=status, restarts=restarts, reason=reason)
                _write_state(home, launch, **fields)
                return 0
            in_a_row += 1
            restarts += 1
            fields = run.fields(state="restarting", status=status, restarts=restarts, delay=delay)
            _write_state(home, launch, **fields)
            # what the ended run left in its group goes first: one instance at a time
            kill_group(run.proc.pid, grace, run.proc)
            with _stoppable():
                time.sleep(delay)
            delay = min(delay * 2, RESTART_CAP)
            proc = _spawn(launch, pump, env, restarts)
            run = _Run(proc, start_time(proc.pid), time.time())
            _write_state(
                home, launch, **run.fields(state="running", status=status, restarts=restarts)
            )
    except _Stop:
        kill_group(run.proc.pid, _grace(grace), run.proc)
        status = run.proc.wait()
        sweep(launch.triple, _grace(grace), _Forced.on)
        pump.note(f"stopped (status {status})")
        _write_state(home, launch, **run.fields(state="stopped", status=status, restarts=restarts))
    except Failure as failure:  # a restart that could not start
        _write_state(home, launch, state="failed", reason=failure.reason, restarts=restarts)
    return 0


def _child(
    launch: Launch, home: str, secret: bytes, log_fd: int, out: int, relay: bool = False
) -> int:
    """The supervisor, from the front's fork (or become.inner's): ``relay``: ``log_fd`` is
    the pipe to the keeper's pump, which owns the login's log and rotates it (become.keep)."""
    os.setsid()
    pump = LogPump(log_path(home, launch.log), log_fd, *launch.logs, relay=relay)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(pump.write_fd, 2)  # the supervisor's own errors land in the program log
    os.close(null)
    _cloexec_inherited()  # what sshd or a login shell left open stays out of the program
    pump.run()
    # Signals stay deferred (see main) until the program exists, so one arriving mid-Popen
    # cannot lose the child being created; _supervise arms them right after the spawn.
    try:
        return _supervise(launch, home, secret, pump, out)
    except BaseException:
        _print_exc()
        return EXIT_AGENT
    finally:
        _drop_cgroup()  # when the program ended with nothing left in it: a stop removes it else
        with _suppress(OSError):  # the supervisor's stderr lets go of the pipe
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        pump.finish()
