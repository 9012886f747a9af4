"""Surviving a reboot: the ``--boot`` mode, which starts this REX_HOME's ``autostart``
programs again from their records, and ``--boot-entry``, which keeps the login's one boot
entry that runs it (a systemd user unit, else a crontab ``@reboot`` line).

``--boot`` (run by the boot entry, with no launcher): every record whose launch asked for
``autostart``, that was running (or waiting to restart) when the host went down and whose
program and supervisor are both gone, is started again from its ``launched`` launch: a
supervisor of its own (session, lock, log, restart policy, as after a verified launch), the
readiness probe, and the record marked ``resumed`` (rex status: ``running (resumed at
boot)``). There is no callback: no launcher waits for one. A program rex stop stopped, or that
exited, stays so. One JSON line reports what was resumed and what failed.

``--boot-entry``, run by rex after apply and stop through the agent's file in REX_HOME: with an
autostart program left to resume, the entry is installed (or rewritten: the agent's file name
changes with its version); with none, it is removed. ``systemctl --user`` is used when it
works for the login, else ``crontab`` when it exists; with neither, the report names no entry
and rex warns. The entry's command is ``REX_HOME=<home> <python> -I -S <agent> --boot``, each
word quoted; it is marked with ``rex-boot <id>`` (id: a digest of REX_HOME), so a login's other
crontab lines and units are left alone.
"""

from __future__ import annotations

import os
import select
import sys
import time

from rexplan.remote.agent.failure import (
    EXIT_AGENT,
    EXIT_BAD_LAUNCH,
    EXIT_OK,
    Failure,
    _print_exc,
    _suppress,
)
from rexplan.remote.agent.files import _check_files, _workdir
from rexplan.remote.agent.groups import kill_group, same_process, start_time
from rexplan.remote.agent.logpump import LogPump, log_path
from rexplan.remote.agent.probes import _close_notify, _notify_socket, wait_ready
from rexplan.remote.agent.procs import _cloexec_inherited
from rexplan.remote.agent.records import _lock, _Resumed, _write_state, read_state
from rexplan.remote.agent.supervisor import _after_ok, _program_env, _Run, _spawn
from rexplan.wire import crypto, jsonstrict
from rexplan.wire.launch import Launch, LaunchError, launch_from_record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any

#: the states a program was in when its host went down that --boot resumes
RESUMABLE = ("running", "restarting")
#: seconds a helper command (systemctl, crontab) may take
_TOOL_TIMEOUT = 20.0
_UNIT_DIR = (".config", "systemd", "user")


def _names(home: str) -> list[str]:
    try:
        entries = sorted(os.listdir(os.path.join(home, "run")))
    except OSError:
        return []
    return [e[:-5] for e in entries if e.endswith(".json") and not e.startswith(".") and e[:-5]]


def _wanted(record: dict[str, Any] | None) -> bool:
    """Whether a record is of an autostart program that a boot should find running."""
    if record is None:
        return False
    launched = record.get("launched")
    return (
        isinstance(launched, dict)
        and launched.get("autostart") is True
        and record.get("state") in RESUMABLE
    )


def boot(home: str) -> dict[str, Any]:
    """``--boot``: resume every autostart program of ``home`` that is not running."""
    resumed: list[str] = []
    running: list[str] = []
    failed: list[dict[str, str]] = []
    for name in _names(home):
        record = read_state(home, name)
        if record is None or not _wanted(record):
            continue
        if same_process(record.get("pid"), record.get("start")) or same_process(
            record.get("agent"), record.get("agent_start")
        ):
            running.append(name)
            continue
        try:
            launch = launch_from_record(record.get("launched"))
        except LaunchError as exc:
            failed.append({"program": name, "reason": f"bad recorded launch: {exc}"})
            continue
        if launch.log != name:
            failed.append({"program": name, "reason": "the recorded launch is of another program"})
            continue
        reason = _resume(home, launch)
        if reason is None:
            resumed.append(name)
        else:
            failed.append({"program": name, "reason": reason})
    return {"ok": not failed, "resumed": resumed, "running": running, "failed": failed}


def _resume(home: str, launch: Launch) -> str | None:
    """Start one program again under a supervisor of its own; None once it is ready, else
    why not."""
    lock = _lock(home, launch.log)
    if lock is None:
        return "another launch holds its lock"
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        code = EXIT_AGENT
        try:
            code = _supervise_again(launch, home, write_end)
        except BaseException:
            _print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(lock)  # the supervisor holds it from here on
    within = launch.deadline("start") + launch.deadline("ready") + 5.0
    end = time.monotonic() + within
    data = b""
    try:
        while b"\n" not in data:
            remaining = end - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                return f"no outcome within {within:g}s"
            chunk = os.read(read_end, 4096)
            if not chunk:
                return "its supervisor died"
            data += chunk
    finally:
        os.close(read_end)
    with _suppress(OSError):
        os.waitpid(child, os.WNOHANG)
    try:
        report = jsonstrict.loads(data.split(b"\n", 1)[0].decode("ascii"))
    except ValueError:
        return "its supervisor gave no report"
    return None if report.get("ok") is True else str(report.get("reason"))


def _supervise_again(launch: Launch, home: str, out: int) -> int:
    """The resumed program's supervisor: start, probe, record, then stay its parent."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    os.makedirs(os.path.join(home, "logs"), mode=0o700, exist_ok=True)
    log_fd = os.open(log_path(home, launch.log), flags, 0o600)
    pump = LogPump(log_path(home, launch.log), log_fd, *launch.logs)  # rotates as at launch
    os.dup2(pump.write_fd, 2)
    os.close(null)
    _cloexec_inherited()
    pump.run()
    _Resumed.at = time.time()
    proc = None
    notify: socket.socket | None = None
    notify_path: str | None = None
    try:
        _check_files(home, launch)
        if launch.ready.kind == "notify":
            notify, notify_path = _notify_socket(home)
        env = _program_env(launch, notify_path)
        began_wall = time.time()
        proc = _spawn(launch, pump, env)
        start = start_time(proc.pid)
        wait_ready(
            proc,
            launch.ready,
            time.monotonic() + launch.deadline("ready"),
            _workdir(launch),
            env,
            notify,
            launch.deadline("ready"),
        )
    except BaseException as exc:
        failure = exc if isinstance(exc, Failure) else Failure(EXIT_AGENT, "agent failed")
        if not isinstance(exc, Failure):
            _print_exc()
        fields: dict[str, Any] = {"state": "failed", "reason": f"at boot: {failure.reason}"}
        if proc is not None:
            kill_group(proc.pid, launch.deadline("stop"), proc)
            fields.update(pid=proc.pid, status=proc.returncode)
        _write_state(home, launch, restarts=0, **fields)
        with _suppress(OSError):
            os.write(
                out, jsonstrict.dumps({"ok": False, "reason": fields["reason"]}).encode() + b"\n"
            )
        pump.finish()
        return failure.code
    finally:
        _close_notify(notify, notify_path)
    run = _Run(proc, start, began_wall)
    _write_state(home, launch, **run.fields(state="running", status=None, restarts=0))
    with _suppress(OSError):
        os.write(out, jsonstrict.dumps({"ok": True, "pid": proc.pid}).encode() + b"\n")
    os.close(out)
    env.pop("NOTIFY_SOCKET", None)
    try:
        return _after_ok(launch, home, run, env, pump)
    finally:
        with _suppress(OSError):  # the supervisor's stderr lets go of the pipe
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        pump.finish()


# --- the boot entry ------------------------------------------------------------------------------


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\"'\"'") + "'"


def entry_id(home: str) -> str:
    """The boot entry's mark for this REX_HOME: 12 hex of its digest."""
    return crypto.sha256(home.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def boot_command(home: str, agent: str) -> str:
    """The shell command the boot entry runs."""
    return f"REX_HOME={_quote(home)} {_quote(sys.executable)} -I -S {_quote(agent)} --boot"


def _tool(argv: list[str], stdin: bytes | None = None) -> tuple[int, bytes]:
    """Run a helper command; (exit status, stdout); 127 when it cannot be run."""
    import subprocess  # only here: the agent's other modes must not pay its imports

    try:
        res = subprocess.run(
            argv,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=_TOOL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return 127, b""
    return res.returncode, res.stdout


def _systemd_works() -> bool:
    return _tool(["systemctl", "--user", "show-environment"])[0] == 0


def _crontab_lines() -> list[str] | None:
    """The login's crontab lines ([] when it has none); None when crontab cannot be run."""
    code, out = _tool(["crontab", "-l"])
    if code == 127:
        return None
    if code != 0:
        return []  # "no crontab for LOGIN"
    return out.decode("utf-8", "surrogateescape").splitlines()


def _unit_path(mark: str) -> str:
    return os.path.join(os.path.expanduser("~"), *_UNIT_DIR, f"rex-boot-{mark}.service")


def _unit_word(word: str) -> str:
    """``word`` as one double-quoted word of a unit file (systemd.syntax; ``%`` doubled)."""
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _install_unit(home: str, agent: str, mark: str) -> bool:
    path = _unit_path(mark)
    text = (
        f"# rex-boot {mark}: written by rex, removed when no autostart program is left\n"
        "[Unit]\nDescription=rex: resume the autostart programs of a rex home\n\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nKillMode=process\n"
        f"Environment={_unit_word('REX_HOME=' + home)}\n"
        f"ExecStart={_unit_word(sys.executable)} -I -S {_unit_word(agent)} --boot\n\n"
        "[Install]\nWantedBy=default.target\n"
    )
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    _tool(["systemctl", "--user", "daemon-reload"])
    return _tool(["systemctl", "--user", "enable", os.path.basename(path)])[0] == 0


def _remove_unit(mark: str) -> bool:
    path = _unit_path(mark)
    if not os.path.exists(path):
        return False
    _tool(["systemctl", "--user", "disable", os.path.basename(path)])
    with _suppress(FileNotFoundError):
        os.unlink(path)
    _tool(["systemctl", "--user", "daemon-reload"])
    return True


def _set_crontab(lines: list[str], mark: str, command: str | None) -> bool:
    """Replace this REX_HOME's @reboot line (remove it when ``command`` is None)."""
    tag = f"# rex-boot {mark}"
    kept = [line for line in lines if not line.rstrip().endswith(tag)]
    if command is not None:
        kept.append(f"@reboot {command} {tag}")
    if kept == lines:
        return True
    if not any(line.strip() and not line.lstrip().startswith("#") for line in kept):
        return _tool(["crontab", "-r"])[0] == 0  # nothing left: no empty crontab behind
    text = "".join(f"{line}\n" for line in kept)
    return _tool(["crontab", "-"], text.encode("utf-8", "surrogateescape"))[0] == 0


def boot_entry(home: str, agent: str) -> dict[str, Any]:
    """``--boot-entry``: install the login's boot entry while an autostart program is left to
    resume, else remove it. Reports which entry (``systemd``, ``crontab`` or None)."""
    mark = entry_id(home)
    if not all(w.isprintable() for w in (home, agent, sys.executable)):
        return Failure(EXIT_BAD_LAUNCH, "REX_HOME or the agent's path is not printable").result()
    wanted = [name for name in _names(home) if _wanted(read_state(home, name))]
    lines = _crontab_lines()
    if not wanted:
        removed = _remove_unit(mark)
        if lines is not None and any(
            line.rstrip().endswith(f"# rex-boot {mark}") for line in lines
        ):
            removed = _set_crontab(lines, mark, None) or removed
        return {"ok": True, "entry": None, "wanted": [], "removed": removed}
    command = boot_command(home, agent)
    if _systemd_works():
        if _install_unit(home, agent, mark):
            if lines:
                _set_crontab(lines, mark, None)  # one entry per login: not both
            return {"ok": True, "entry": "systemd", "wanted": wanted, "command": command}
    if lines is not None and _set_crontab(lines, mark, command):
        return {"ok": True, "entry": "crontab", "wanted": wanted, "command": command}
    return {
        "ok": True,
        "entry": None,
        "wanted": wanted,
        "warning": "neither systemctl --user nor crontab works for this login",
    }


def boot_modes(args: list[str], home: str) -> int | None:
    """Run ``--boot`` or ``--boot-entry``; None for any other arguments."""
    if args == ["--boot"]:
        report = boot(home)
    elif args == ["--boot-entry"]:
        agent = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        if not (
            os.path.isfile(agent)
            and os.path.dirname(os.path.realpath(agent)) == os.path.realpath(home)
        ):
            report = Failure(
                EXIT_BAD_LAUNCH, "--boot-entry runs from the agent's file in REX_HOME"
            ).result()
        else:
            report = boot_entry(home, agent)
    else:
        return None
    with _suppress(OSError):
        sys.stdout.write(jsonstrict.dumps(report) + "\n")
        sys.stdout.flush()
    return EXIT_OK if report.get("ok") else EXIT_AGENT
