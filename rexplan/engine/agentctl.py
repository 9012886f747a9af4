"""Talking to the agent on a host: its copy there, its records, the files and key it reads,
its reports and the kill of what a run started."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rexplan.core import spec as specs
from rexplan.core.model import FileSpec, Manifest, Step
from rexplan.engine import events as ev
from rexplan.errors import TransportError
from rexplan.transport.base import Result, Transport
from rexplan.transport.pool import TransportPool
from rexplan.transport.shipping import (
    EXIT_NO_AGENT,
    EXIT_NO_LAUNCH,
    bootstrap_argv,
    bootstrap_input,
    bundle,
    bundle_sha,
    launch_argv,
)
from rexplan.trust.keys import KeyInfo
from rexplan.wire import keyfile, launch

#: seconds added to the remote deadlines before the launcher gives up on the SSH exec
EXEC_SLACK = 5.0

#: the longest record (REX_HOME/run/TRIPLE.json) read over SFTP, as the agent reads them
RECORD_LIMIT = 1 << 20
#: the longest key file and /proc/PID/stat read from a host: they are a few hundred bytes
KEY_FILE_LIMIT = PROC_STAT_LIMIT = 4096

#: agent front exit codes (rexplan.remote.agent) -> failure reason, for the diagnostic only
AGENT_REASONS = {
    10: "no_key",
    11: "start_failed",
    12: "exited",
    13: "not_ready",
    14: "no_callback",
    15: "rejected",
    16: "bad_launch",
    17: "agent_failed",
    18: "already_running",
    19: "declined",
    22: "become",
    23: "owned",
    EXIT_NO_AGENT: "agent_upload",
    EXIT_NO_LAUNCH: "agent_start_timeout",
}


def agent_run(transport: Transport, python: str, *args: str, timeout: float) -> Result:
    """Run the agent with ``args`` on the host: the copy a launch left there, through the
    launch stub (its code cached: nothing sent, nothing compiled), else the bundle piped
    over stdin and compiled there (a host rex never launched on: nothing is left on it)."""
    res = transport.run(launch_argv(python, *args), timeout=timeout)
    if res.exit_status != EXIT_NO_AGENT:
        return res
    return transport.run(bootstrap_argv(python, *args), stdin=bootstrap_input(b""), timeout=timeout)


def read_records(
    transport: Transport, python: str, agent: str, timeout: float
) -> dict[str, dict[str, Any]] | None:
    """The agent's ``--status`` records of one login on one host; None if unreadable."""
    try:
        res = transport.run([python, "-I", "-S", agent, "--status"], timeout=timeout)
        return specs.parse_status(res.stdout)
    except (TransportError, ValueError):
        return None


def sftp_records(transport: Transport) -> dict[str, dict[str, Any]] | None:
    """The records of one login on one host read over SFTP, with liveness from /proc: what the
    agent's ``--status`` reports, minus the uptime, without starting a Python there. None (ask
    the agent) when a program has uploaded files, since hashing them is the agent's job."""
    try:
        home = transport.rex_home()
        run = f"{home}/run"
        out: dict[str, dict[str, Any]] = {}
        for entry in transport.listdir(run):
            name = entry[: -len(".json")]
            if entry.startswith(".") or not entry.endswith(".json") or not name:
                continue
            if transport.listdir(f"{home}/files/{name}"):
                return None
            try:
                record = json.loads(transport.get(f"{run}/{entry}", RECORD_LIMIT))
            except (OSError, ValueError, RecursionError):
                continue  # vanished, unreadable or too long: the agent skips it too
            if not isinstance(record, dict):
                continue
            record.update(
                name=name,
                alive=_same_process(transport, record.get("pid"), record.get("start")),
                supervised=_same_process(transport, record.get("agent"), record.get("agent_start")),
                files={},
            )
            out[name] = record
        return out
    except (TransportError, OSError):
        return None


def _same_process(transport: Transport, pid: Any, start: Any) -> bool:
    """The agent's ``same_process`` over SFTP: ``pid`` lives, not a zombie, and started at
    ``start`` (clock ticks since boot, /proc/PID/stat field 22), so a reused pid does not count."""
    if type(pid) is not int or pid <= 1 or not isinstance(start, str):
        return False
    try:
        fields = transport.get(f"/proc/{pid}/stat", PROC_STAT_LIMIT).rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return len(fields) > 19 and fields[0] != b"Z" and fields[19] == start.encode()


@dataclass(frozen=True)
class LocalFile:
    """A program's file as the launcher reads it: where it goes, its bytes, hash and mode."""

    dest: str
    data: bytes = field(repr=False)
    sha: str
    mode: int

    @property
    def entry(self) -> tuple[str, str, int]:
        """(dest, sha256 hex, mode), as the launch message and the spec digest carry it."""
        return self.dest, self.sha, self.mode


def local_files(specs_: Iterable[FileSpec]) -> tuple[LocalFile, ...]:
    """A step's ``files``: a template's rendered content, else the file read; OSError if
    one cannot be read."""
    out = []
    for f in specs_:
        if f.content is not None:
            data = f.content
        else:
            with open(f.src, "rb") as src:
                data = src.read()
        out.append(LocalFile(f.dest, data, hashlib.sha256(data).hexdigest(), f.mode))
    return tuple(out)


class HostAgents:
    """What a run keeps per host and login: the agent's copy there, its records read once,
    the programs' files read once, and a lock for each."""

    def __init__(
        self,
        manifest: Manifest,
        pool: TransportPool,
        run_id: str,
        emit: Callable[..., None],
    ) -> None:
        self.manifest = manifest
        self.pool = pool
        self.run_id = run_id
        self._emit = emit
        self._agents: dict[str, str] = {}
        self._records: dict[str, dict[str, dict[str, Any]] | None] = {}
        self._agent_lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._files: dict[tuple[FileSpec, ...], tuple[LocalFile, ...]] = {}
        self._bundle = bundle()
        self._bundle_sha = bundle_sha()

    def ensure_local_copy(self, transport: Transport, info: KeyInfo, secret: bytes) -> None:
        """Local hosts read keys from REX_HOME/keys like any host; copy when it differs."""
        rel = keyfile.key_relpath(info.host, info.user, info.program)
        path = f"{transport.rex_home()}/keys/{rel}"
        with self._lock_for(transport.host.name):
            # absent, unreadable, too long or malformed: written anew
            with contextlib.suppress(OSError, keyfile.KeyFormatError):
                _, _, there = keyfile.parse_key_file(transport.get(path, KEY_FILE_LIMIT))
                if keyfile.key_id(there) == info.key_id:
                    return
            data = keyfile.format_key_file(info.triple, info.created, secret)
            transport.put(data, path, 0o600)

    def files_of(self, step: Step) -> tuple[LocalFile, ...]:
        """``step``'s files, each read once per run (the steps of a program without
        templates share them); OSError if one cannot be read."""
        with self._lock_for(f"files {step.program}"):
            found = self._files.get(step.files)
            if found is None:
                found = self._files[step.files] = local_files(step.files)
            return found

    def upload(
        self, step: Step, transport: Transport, files: Sequence[LocalFile], dests: list[str]
    ) -> None:
        """Put the files the host lacks (by content hash) under REX_HOME/files/<triple>/."""
        if not dests:
            return
        base = f"{transport.rex_home()}/files/{step.triple}"
        for f in files:
            if f.dest in dests:
                transport.put(f.data, f"{base}/{f.dest}", f.mode)
        self._emit(
            ev.NOTICE,
            host=step.host,
            program=step.program,
            step=step.id,
            detail=f"uploaded {len(dests)} file(s) for {step.id}: {', '.join(dests)}",
        )

    def status_of(
        self,
        step: Step,
        transport: Transport,
        agent: str,
        files: Sequence[tuple[str, str, int]] = (),
    ) -> tuple[specs.StepStatus, dict[str, Any] | None]:
        """``step``'s status on its host and its record there, from the agent's records read
        once per run and login (one exec, whatever the number of steps there); ABSENT if they
        cannot be read, so the launch goes ahead and the agent's lock still refuses a second
        instance."""
        where = f"{step.login}@{step.host}"
        with self._lock_for(f"records {where}"):
            if where not in self._records:
                self._records[where] = sftp_records(transport)
            if self._records[where] is None:
                self._records[where] = read_records(
                    transport, self.manifest.host(step.host).python, agent, step.timeouts.start
                )
                if self._records[where] is None:
                    self._emit(
                        ev.NOTICE,
                        host=step.host,
                        detail=f"cannot read the programs' state of {where}; launching anyway",
                    )
            records = self._records[where]
        found = specs.record_of(records, step)
        record = None if found is None else dict(found[1])
        status = specs.classify(step, record, specs.expected_spec(step, files), files)
        return status, record

    def _lock_for(self, host: str) -> threading.Lock:
        with self._agent_lock:
            return self._host_locks.setdefault(host, threading.Lock())

    def agent_on(self, host: str, login: str, transport: Transport) -> str:
        """Path of the agent in ``login``'s REX_HOME on ``host``, uploaded once per host and
        login (logins do not share a REX_HOME) while its hash matches."""
        where = f"{login}@{host}"
        with self._lock_for(where):
            path = self._agents.get(where)
            if path is None:
                path = f"{transport.rex_home()}/agent-{self._bundle_sha[:16]}.py"
                try:
                    st = transport.stat(path)
                    if st is None or st[1] != len(self._bundle):
                        transport.put(self._bundle, path, 0o600)
                except OSError as exc:
                    # SFTP refusals (e.g. a read-only REX_HOME) arrive as OSErrors naming no path
                    raise TransportError(
                        f"cannot write the agent to {path}: {exc.strerror or exc}",
                        host=host,
                        phase="start",
                    ) from exc
                self._agents[where] = path
            return path

    def clean_leftovers(self, step: Step, transport: Transport) -> None:
        """Remove the temp files of uploads cut mid-way (the connection died under them) over
        a new connection; a host that stays out of reach keeps them, and the user is told."""
        leftovers, transport.leftovers = list(transport.leftovers), []
        if not leftovers:
            return
        host, user = self.manifest.host(step.host), self.manifest.user(step.user)
        self.pool.discard(host, user)
        try:
            fresh = self.pool.get(host, user)
            for path in leftovers:
                fresh.remove(path)
        except (TransportError, OSError) as exc:
            self._emit(
                ev.NOTICE,
                host=step.host,
                detail=f"could not remove the partial upload(s) {', '.join(leftovers)}: {exc}",
            )

    def kill_remote(self, transport: Transport, python: str, step: Step) -> None:
        """Kill whatever this run started for ``step`` on its host, found by the rex tags
        (the run id goes on stdin: a command line is anyone's to read there)."""
        with contextlib.suppress(TransportError):
            transport.run(
                launch_argv(python, "--kill"),
                stdin=launch.make_kill(self.run_id, step.id, step.stop_timeout),
                timeout=step.stop_timeout + EXEC_SLACK,
            )
