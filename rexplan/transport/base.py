"""What every transport is: the Transport protocol, its Result and Gate, and the kinds."""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import secrets
import shlex
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from rexplan.core.model import Host, Timeouts
from rexplan.errors import HostTimeoutError

if TYPE_CHECKING:
    from typing_extensions import Required, Unpack

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: bytes of a command's stdout, and as many of its stderr, that a Result keeps: the tail (the
#: agent's report is its last line); what came before is only counted, so a host that floods
#: its output costs the launcher this much, not what it sent
OUTPUT_TAIL = 1 << 20
#: the largest file get() returns unless told otherwise: keys, records and /proc files are small
GET_LIMIT = 1 << 20
#: the address agents dial when they call back through a forward (``callback: {via: ssh}``)
LOOPBACK = "127.0.0.1"
#: takes the launcher's end of one connection forwarded from a host (``callback: {via: ssh}``)
#: and the peer to count and log it as
Sink = Callable[[socket.socket, tuple[str, int]], None]


@dataclass(frozen=True)
class Result:
    """What a remote command did: its exit status (-1: killed by a signal) and its output, the
    last OUTPUT_TAIL bytes of each stream; ``stdout_cut``/``stderr_cut`` count the bytes that
    came before them and were dropped."""

    exit_status: int
    stdout: bytes
    stderr: bytes
    stdout_cut: int = 0
    stderr_cut: int = 0


class RunOptions(TypedDict, total=False):
    """How Transport.run runs a command: ``stdin`` fed to it (held back by ``gate``), the
    ``timeout`` of the whole command, and ``env`` names set for it (checked: command_line)."""

    stdin: bytes | None
    timeout: float | None
    env: Mapping[str, str] | None
    gate: Gate | None


class ConnectOptions(TypedDict, total=False):
    """How a transport connects: ``known_hosts`` (None: ~/.ssh/known_hosts; unknown or changed
    keys are refused, never added), the connect deadline in ``timeouts``, and banner and auth
    deadlines (default: ``timeouts.connect``)."""

    known_hosts: Required[str | os.PathLike[str] | None]
    timeouts: Timeouts | None
    banner_timeout: float | None
    auth_timeout: float | None


def unpack(
    opts: RunOptions,
) -> tuple[bytes | None, float | None, Mapping[str, str] | None, Gate | None]:
    """``opts`` as (stdin, timeout, env, gate), each None when not given."""
    return opts.get("stdin"), opts.get("timeout"), opts.get("env"), opts.get("gate")


@dataclass(frozen=True)
class Gate:
    """Hold a command's stdin until it printed ``marker`` as a line of its own, within
    ``within`` seconds of the request; past that the command is closed unfed and run() raises
    HostTimeoutError with phase ``start``. A command that ends without the marker (it had no
    use for its stdin) is never fed. A command that prints ``wanted`` instead (the agent's
    first stage, missing the agent) is fed ``supply`` (the agent), then stdin."""

    marker: bytes
    within: float
    wanted: bytes = b""
    supply: bytes = b""


class Transport(Protocol):
    """One host as one login: run commands and move small files, all under deadlines."""

    host: Host

    def run(self, argv: Sequence[str], **opts: Unpack[RunOptions]) -> Result: ...

    #: temp files of uploads cut mid-way that could not be removed over that connection
    leftovers: list[str]

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None: ...

    def get(self, path: str, limit: int = GET_LIMIT) -> bytes: ...

    def stat(self, path: str) -> tuple[int, int] | None: ...

    def remove(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...

    def rex_home(self) -> str: ...

    def callback_port(self, sink: Sink) -> int:
        """The port on the host's 127.0.0.1 that its agents dial to reach ``sink`` through
        this connection (``callback: {via: ssh}``); TransportError when it cannot be had."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Kind:
    """A transport kind (what a host's ``transport`` names) and what rex may ask of it."""

    name: str
    #: commands run on the launcher's own machine as its user: no address to call back from,
    #: its keys are made on first use and copied into REX_HOME
    is_local: bool
    #: reached over SSH with a host key pinned in known_hosts (``rex hostkeys``)
    pins_host_keys: bool
    #: can carry a tree fan-out relay (a stream on an SSH channel)
    can_relay: bool


#: every transport kind by name; core's manifest schema lists the same names (a test checks)
KINDS = {
    k.name: k
    for k in (
        Kind("ssh", is_local=False, pins_host_keys=True, can_relay=True),
        Kind("local", is_local=True, pins_host_keys=False, can_relay=False),
    )
}


def kind(name: str) -> Kind:
    """The kind called ``name`` (a Host's or Step's ``transport``); ValueError if none is."""
    found = KINDS.get(name)
    if found is None:
        raise ValueError(f"unknown transport {name!r}")
    return found


def command_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The remote command string: ``argv`` (prefixed by ``env K=V`` pairs) quoted with shlex."""
    if not argv:
        raise ValueError("empty argv")
    words = list(argv)
    if env:
        for key in env:
            if not _ENV_NAME.match(key):
                raise ValueError(f"invalid environment variable name {key!r}")
        if "=" in words[0]:
            raise ValueError(f"argv[0] {words[0]!r} would be read by env(1) as an assignment")
        words = ["env", *(f"{k}={v}" for k, v in env.items()), *words]
    if any("\0" in w for w in words):
        raise ValueError("argv and env may not contain NUL bytes")
    return shlex.join(words)


def not_started(gate: Gate, host: str) -> HostTimeoutError:
    return HostTimeoutError(
        f"the remote command did not start within {gate.within:g}s", host=host, phase="start"
    )


def temp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.rex-{secrets.token_hex(8)}.tmp")


def combine_home(home: str, rex_home: str) -> str:
    if rex_home:
        return posixpath.normpath(posixpath.join(home, rex_home))
    return posixpath.normpath(posixpath.join(home, ".rex"))


def at_most(data: bytes, limit: int, path: str) -> bytes:
    """``data`` (read with ``limit`` + 1 asked for) if it fits ``limit``, else EFBIG."""
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"longer than {limit} bytes", path)
    return data


def last_report(stdout: bytes) -> dict[str, Any]:
    """The last line of ``stdout`` that is a JSON object (an agent's report); {} if none is."""
    for line in reversed(stdout.splitlines()):
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: a value nested deep
            continue
        if isinstance(data, dict):
            return data
    return {}
