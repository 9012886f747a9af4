"""A program's record, REX_HOME/run/<host.user.program>.json (replaced atomically at each
change), its lock (one supervisor per triple and REX_HOME: a second launch fails
``already_running`` unless it asks to ``replace``; one of another manifest fails ``owned``
unless it asks to ``take_over``), and the modes that read or end what runs (--status, --stop).

Records, locks, logs and files are named by the launch's ``log``: the whole triple, so that
two hosts of a manifest that share a machine and login do not collide. Records written by the
layout before (named by program) are still found for their triple (``record_name``): a launch
replaces such an instance under the new name, a ``--stop TRIPLE`` stops it."""

from __future__ import annotations

import fcntl
import os
import time

from rexplan.remote.agent.cgroup import _Cgroup, _recorded_cgroup, cgroup_kill, remove_cgroup
from rexplan.remote.agent.dialback import same_back
from rexplan.remote.agent.failure import (
    _POLL,
    EXIT_OWNED,
    EXIT_RUNNING,
    EXIT_START,
    Failure,
    _print,
    _print_exc,
    _suppress,
)
from rexplan.remote.agent.files import file_hashes
from rexplan.remote.agent.groups import (
    _pid,
    _signal_all,
    kill_group,
    same_process,
    start_time,
    sweep,
)
from rexplan.wire import crypto, jsonstrict
from rexplan.wire.launch import Launch, recorded_launch, spec_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal


def _run_dir(home: str) -> str:
    run = os.path.join(home, "run")
    os.makedirs(run, mode=0o700, exist_ok=True)
    return run


def _store(home: str, name: str, record: dict[str, Any]) -> None:
    """Atomically replace REX_HOME/run/<name>.json, and <name>.id: the line ``PID START SPEC
    TRIPLE [OWNER]`` the launcher's shell check reads (shipping.CHECK_SH), removed when the
    record has no program pid."""
    run = _run_dir(home)
    _replace(run, name, ".json", jsonstrict.dumps(record, sort_keys=True).encode("ascii"))
    pid = record.get("pid")
    keys = (
        ("start", "spec", "triple", "manifest")
        if record.get("manifest")
        else ("start", "spec", "triple")
    )
    words = [str(pid)] + [record.get(k) for k in keys]
    line = " ".join(w for w in words if type(w) is str and w.isprintable() and w.isascii())
    if type(pid) is int and pid > 1 and line.split(" ") == words and "" not in words:
        _replace(run, name, ".id", (line + "\n").encode("ascii"))
        return
    with _suppress(FileNotFoundError):
        os.unlink(os.path.join(run, f"{name}.id"))


def _replace(run: str, name: str, suffix: str, data: bytes) -> None:
    """Write run/<name><suffix> atomically: a temp file in the same directory, renamed."""
    tmp = os.path.join(run, f".{name}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(run, f"{name}{suffix}"))
    except BaseException:
        os.unlink(tmp)
        raise


def read_state(home: str, name: str) -> dict[str, Any] | None:
    """The record REX_HOME/run/<name>.json; None when there is none or it is unreadable."""
    try:
        with open(os.path.join(home, "run", f"{name}.json"), "rb") as f:
            data = jsonstrict.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Sink:
    """Where a ``become`` supervisor sends its records (one ``{"record": ...}`` line each):
    the pipe to its keeper, which writes them into the login's REX_HOME (agent/become.py).
    -1: written here."""

    fd = -1


class _Resumed:
    """When this supervisor started its program again at boot (agent --boot), else None."""

    at: float | None = None


def _write_state(home: str, launch: Launch, **fields: Any) -> None:
    """Record the program's state; a failure only goes to the log, since the state is a
    record and must not cost a verified program its life."""
    record = {
        "run": launch.run,
        "step": launch.step,
        "triple": launch.triple,
        "kind": launch.kind,
        "spec": spec_digest(launch),
        "launched": recorded_launch(launch),  # minus the nonce: for --diff and --boot
        "restart": launch.restart,
        "stop_timeout": launch.deadline("stop"),
        "agent": os.getpid(),
        "agent_start": start_time(os.getpid()),
        "updated": time.time(),
    }
    if launch.owner[0]:
        record["manifest"], record["manifest_path"] = launch.owner  # who owns the triple
    if _Resumed.at is not None:
        record["resumed"] = _Resumed.at  # rex status: running (resumed at boot)
    if _Cgroup.path is not None:
        record["cgroup"] = _Cgroup.path  # for a stop: what left group and tags is still in it
    record.update(fields)
    try:
        if _Sink.fd >= 0:
            os.write(_Sink.fd, jsonstrict.dumps({"record": record}).encode("ascii") + b"\n")
        else:
            _store(home, launch.log, record)
    except OSError:
        _print_exc()


def _lock(home: str, name: str, wait: float = 0.0) -> int | None:
    """An fd holding the exclusive flock on REX_HOME/run/<name>.lock, or None when another
    process still holds it after ``wait`` seconds. The kernel drops it when its holder dies."""
    path = os.path.join(_run_dir(home), f"{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    end = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= end:
                os.close(fd)
                return None
            time.sleep(_POLL)
        except OSError:
            os.close(fd)
            raise


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "another launch holds its lock"
    return f"pid {record.get('pid')}, run {record.get('run')}, state {record.get('state')}"


class _Same(Exception):
    """The launch's program runs already with its spec (a launch asking ``unchanged``)."""

    def __init__(self, pid: int, start: str) -> None:
        super().__init__(pid, start)
        self.pid = pid
        self.start = start


def _prove_same(launch: Launch, secret: bytes, same: _Same) -> int:
    """Prove to the listener that the program runs unchanged and report it: only that proof
    makes the step unchanged (a relay passing this report on cannot)."""
    deadline = time.monotonic() + launch.deadline("callback")
    try:
        same_back(launch, secret, same.pid, same.start, deadline)
    except Failure as failure:
        return _print(failure.result())
    return _print({"ok": True, "same": True, "pid": same.pid})


def record_name(home: str, triple: str) -> str:
    """The name of ``triple``'s record in REX_HOME/run: the triple, unless only a record of
    the layout before (named by the program, the triple's last part) names this triple."""
    legacy = triple.rsplit(".", 1)[-1]
    if legacy == triple or os.path.lexists(os.path.join(home, "run", f"{triple}.json")):
        return triple
    record = read_state(home, legacy)
    return legacy if record is not None and record.get("triple") == triple else triple


def _owner_of(record: dict[str, Any] | None) -> str | None:
    """The manifest a record names as its owner, shown as ``name (path)``; None: none."""
    name = record.get("manifest") if record is not None else None
    if not isinstance(name, str) or not name:
        return None
    path = record.get("manifest_path") if record is not None else None
    return f"{name} ({path})" if isinstance(path, str) and path else name


def _check_owner(launch: Launch, record: dict[str, Any] | None) -> None:
    """Refuse (EXIT_OWNED) a launch onto a live instance another manifest owns, unless it
    takes it over. A record naming no manifest (an older launcher's) is anyone's."""
    owner = record.get("manifest") if record is not None else None
    if launch.take_over or not launch.owner[0] or not isinstance(owner, str) or not owner:
        return
    if owner != launch.owner[0]:
        raise Failure(
            EXIT_OWNED,
            f"{launch.triple} is owned by manifest {_owner_of(record)}"
            " (rex apply --take-over replaces it)",
        )


def _claim(home: str, launch: Launch) -> tuple[int, bool]:
    """(the lock fd this launch's supervisor will hold, whether a running instance was
    stopped for it). Only an established instance is replaced, and only when the launch asks;
    a launch still in progress, or an instance of the same spec (unless the launch asks to
    ``renew`` it: rex restart), refuses it (EXIT_RUNNING): two launchers racing on a triple
    never run it twice. A launch asking ``unchanged`` finds an instance of the same spec
    alive: _Same, to be proven. An instance another manifest owns is refused (EXIT_OWNED)
    unless the launch takes it over, which replaces it. An instance recorded by the layout
    before (by program) is that triple's too."""
    name = launch.log
    legacy = record_name(home, launch.triple) if name == launch.triple else name
    try:
        if legacy != name:
            replaced = _claim_legacy(home, launch, legacy)
            fd = _lock(home, name)
            if fd is not None:
                return fd, replaced
            raise Failure(EXIT_RUNNING, f"{launch.triple} is already running (another launch)")
        fd = _lock(home, name)
        record = read_state(home, name)
        # a program whose supervisor was killed still runs: the lock alone does not tell
        alive = record is not None and same_process(record.get("pid"), record.get("start"))
        if fd is not None and not alive:
            return fd, False
        if fd is not None:
            os.close(fd)
        established = record is not None and (
            alive or same_process(record.get("agent"), record.get("agent_start"))
        )
        _check_owner(launch, record)
        same = _same_spec(launch, record, alive)
        if same and launch.unchanged:
            assert record is not None
            raise _Same(record["pid"], record["start"])
        if not launch.replace or not established or (same and not launch.renew):
            raise Failure(EXIT_RUNNING, f"{launch.triple} is already running ({_describe(record)})")
        stop_program(home, name, launch.deadline("stop"))
        fd = _lock(home, name, wait=2.0)
    except OSError as exc:
        raise Failure(EXIT_START, f"cannot lock the program's state: {exc.strerror}") from None
    if fd is None:
        raise Failure(EXIT_RUNNING, f"{launch.triple} is still running after it was stopped")
    return fd, True


def _same_spec(launch: Launch, record: dict[str, Any] | None, alive: bool) -> bool:
    """The same spec alive is a concurrent launch that won (files aside: the launcher
    replaces those when their content on the host drifted from it); one taken over from
    another manifest is replaced all the same."""
    recorded = record.get("spec") if record is not None else None
    return (
        alive
        and not launch.files
        and not (launch.take_over and _owner_of(record) is not None)
        and isinstance(recorded, str)
        and recorded.isascii()
        and crypto.compare_digest(recorded, spec_digest(launch))
    )


def _claim_legacy(home: str, launch: Launch, legacy: str) -> bool:
    """The triple's instance recorded under its program name (the layout before): a live one
    is proven unchanged, refused or stopped as _claim does; then its record goes, so that
    the triple has one record, under its new name. Whether an instance was stopped."""
    fd = _lock(home, legacy)
    record = read_state(home, legacy)
    alive = record is not None and same_process(record.get("pid"), record.get("start"))
    established = record is not None and (
        alive or same_process(record.get("agent"), record.get("agent_start"))
    )
    if fd is not None:
        os.close(fd)
    stopped = False
    if established or fd is None:
        same = _same_spec(launch, record, alive)
        if same and launch.unchanged:
            assert record is not None
            raise _Same(record["pid"], record["start"])
        if not launch.replace or (fd is None and not established):
            raise Failure(EXIT_RUNNING, f"{launch.triple} is already running ({_describe(record)})")
        stop_program(home, legacy, launch.deadline("stop"))
        stopped = True
    fd = _lock(home, legacy, wait=2.0)
    if fd is None:
        raise Failure(EXIT_RUNNING, f"{launch.triple} is still running after it was stopped")
    try:
        for suffix in (".json", ".id"):
            with _suppress(FileNotFoundError):
                os.unlink(os.path.join(home, "run", f"{legacy}{suffix}"))
    finally:
        os.close(fd)
    return stopped


def stop_program(home: str, name: str, grace: float, force: bool = False) -> dict[str, Any]:
    """``--stop NAME``: end program NAME of this REX_HOME and keep it ended.

    Its supervisor is told first (SIGTERM: it stops the group, TERM then KILL after the grace,
    and records ``stopped`` instead of restarting); a program whose supervisor is gone is
    stopped here. ``force`` SIGKILLs the supervisor, the group and every tagged process at once.
    Either way no process tagged with the program's triple is left. When the program has a
    cgroup of its own (see delegated_cgroup), what is in it goes too, also what left both its
    group and its environment (``force``: cgroup.kill, first), and the cgroup is removed.
    """
    record = read_state(home, name)
    if record is None:
        return {"ok": True, "program": name, "was": "absent", "killed": []}
    agent, agent_start = _pid(record.get("agent")), record.get("agent_start")
    pid, start = _pid(record.get("pid")), record.get("start")
    recorded = record.get("stop_timeout")
    within = max(grace, recorded if isinstance(recorded, (int, float)) else 0.0) + 3.0
    cgroup = _recorded_cgroup(record, name)
    killed: list[int] = []
    become = isinstance(record.get("become"), str)
    supervised = same_process(agent, agent_start)
    if supervised:
        # the supervisor first, so that it cannot restart what is being stopped
        _signal_all([agent], signal.SIGKILL if force else signal.SIGTERM)
        end = time.monotonic() + within
        while same_process(agent, agent_start) and time.monotonic() < end:
            time.sleep(_POLL)
        if same_process(agent, agent_start):
            _signal_all([agent], signal.SIGKILL)
    if become:
        # the program runs as another account: its supervisor (told by the keeper, the agent
        # here, or left without it: a forced stop) ends it; this login cannot signal it
        end = time.monotonic() + within
        if same_process(pid, start):
            killed.append(pid)
        while supervised and same_process(pid, start) and time.monotonic() < end:
            time.sleep(_POLL)
        if same_process(pid, start):  # its supervisor is gone too: end it as the account
            from rexplan.remote.agent.become import end_as

            try:
                triple = str(record.get("triple", ""))
                killed += end_as(record["become"], pid, str(start), triple, grace, force)
            except Failure as failure:
                return failure.result()
    elif force and cgroup is not None:
        killed += cgroup_kill(cgroup)
    if not become and same_process(pid, start) and pid != os.getpgrp():
        killed.append(pid)
        if force:
            with _suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        else:
            kill_group(pid, grace)
    if not become:
        killed += sweep(str(record.get("triple", "")), grace, force, cgroup)
    if cgroup is not None and not become:
        killed += cgroup_kill(cgroup)  # whatever the sweep's 20 rounds could not end
        remove_cgroup(cgroup)
    # a holder SIGKILLed a moment ago (a forced stop) may not have let go yet: the kernel
    # drops its lock when it is gone, so wait a little for it
    fd = _lock(home, name, wait=1.0)
    if fd is not None:  # else a new launch holds it: its record is not ours to touch
        try:
            current = read_state(home, name)
            if current is not None and current.get("state") != "stopped":
                current.update(state="stopped", updated=time.time())
                _store(home, name, current)
        finally:
            os.close(fd)
    return {"ok": True, "program": name, "was": record.get("state"), "killed": sorted(set(killed))}


def status_report(home: str) -> dict[str, Any]:
    """``--status``: every record under REX_HOME/run, with ``alive`` (the program) and
    ``supervised`` (its supervisor) checked by pid + start time, and ``uptime``."""
    now = time.time()
    try:
        entries = sorted(os.listdir(os.path.join(home, "run")))
    except OSError:
        entries = []
    programs = []
    for entry in entries:
        name = entry[: -len(".json")]
        if entry.startswith(".") or not entry.endswith(".json") or not name:
            continue
        record = read_state(home, name)
        if record is None:
            continue
        record["name"] = name
        record["alive"] = same_process(record.get("pid"), record.get("start"))
        record["supervised"] = same_process(record.get("agent"), record.get("agent_start"))
        record["files"] = file_hashes(home, name)
        started = record.get("started")
        if record["alive"] and isinstance(started, (int, float)):
            record["uptime"] = round(max(0.0, now - started), 3)
        programs.append(record)
    return {"ok": True, "now": now, "programs": programs}
