"""Find the processes a test started by the tags in their environment, and stop them by pid."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path


def alive(pid: int) -> bool:
    """Running and not a zombie (this machine's init may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def environ(pid: int) -> dict[str, str]:
    """``pid``'s environment at exec time; empty for zombies and vanished processes."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            out[name.decode(errors="replace")] = value.decode(errors="replace")
    return out


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def uid(pid: int) -> int:
    """The real uid of ``pid`` (first field of the Uid line in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ValueError(f"no Uid line for {pid}")


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def find(match: Callable[[dict[str, str]], bool]) -> list[int]:
    """Live processes whose environment satisfies ``match``."""
    return [p for p in pids() if p != os.getpid() and match(environ(p)) and alive(p)]


def tagged(**tags: str) -> list[int]:
    """Live processes whose environment holds every ``NAME=VALUE`` of ``tags``."""
    return find(lambda env: all(env.get(k) == v for k, v in tags.items()))


def running(marker: str) -> list[int]:
    """Live processes with ``marker`` in one of their argv words (e.g. the agent file)."""
    return [
        p for p in pids() if p != os.getpid() and any(marker in w for w in cmdline(p)) and alive(p)
    ]


def describe(found: Iterable[int]) -> str:
    return "; ".join(f"{p}: {' '.join(cmdline(p))[:120]}" for p in found)


def wait_until(check: Callable[[], bool], within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


def kill(found: Iterable[int], grace: float = 2.0) -> None:
    """SIGTERM each pid, then SIGKILL whatever is still alive after ``grace`` seconds."""
    targets = list(found)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for p in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        if wait_until(lambda: not any(alive(p) for p in targets), wait):
            return


def record_path(rex_home: str | os.PathLike[str], name: str) -> Path:
    """The agent's record REX_HOME/run/<name>.json; for a program name whose record is named
    by its triple (host.user.program), the one such record there."""
    path = Path(rex_home, "run", f"{name}.json")
    if path.exists() or "." in name:
        return path
    found = sorted(Path(rex_home, "run").glob(f"*.{name}.json"))
    assert len(found) <= 1, f"several records of {name}: {found}"
    return found[0] if found else path


def read_state(rex_home: str | os.PathLike[str], program: str) -> dict[str, object]:
    """The agent's record of ``program`` (a record name, or a program: see record_path)."""
    data = json.loads(record_path(rex_home, program).read_text())
    assert isinstance(data, dict)
    return data


def remove_records(home: Path, program: str) -> None:
    """Remove what the agent keeps of ``program`` in REX_HOME ``home``: its record, check
    line, lock, log and files, named by the program or by a triple ending in it."""
    for pattern in (f"run/{program}.*", f"run/*.{program}.*", f"logs/{program}.log",
                    f"logs/*.{program}.log"):  # fmt: skip
        for path in home.glob(pattern):
            path.unlink(missing_ok=True)
    for path in (*home.glob(f"files/{program}"), *home.glob(f"files/*.{program}")):
        shutil.rmtree(path, ignore_errors=True)


def stop_service(rex_home: str | os.PathLike[str], program: str, run: str) -> Mapping[str, object]:
    """Stop a verified service the way its supervisor expects: SIGTERM the agent (it ends the
    program's group), by the pids of its state file; returns the state it records then."""
    state = read_state(rex_home, program)
    assert state["run"] == run and state["state"] == "running", state
    agent, pid = int(str(state["agent"])), int(str(state["pid"]))
    kill([agent], grace=5.0)
    assert wait_until(lambda: not alive(pid), 5.0), f"program {pid} outlived its agent"
    return read_state(rex_home, program)
