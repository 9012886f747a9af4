"""SSH and local transports: the only module that imports fabric, paramiko and invoke."""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import posixpath
import random
import re
import secrets
import select
import shlex
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar, cast

import fabric
import paramiko

from rexplan.core.model import Host, Timeouts, User
from rexplan.errors import (
    AuthenticationError,
    HostKeyError,
    HostTimeoutError,
    TransportError,
    UnreachableError,
)

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHUNK = 32768
#: how often run() retries a send when the remote window is full (select only signals reads)
_SEND_POLL = 0.005
#: longest wait for output before both channel buffers are checked again
_RECV_POLL = 0.05
_REX_HOME_SCRIPT = 'printf "%s\\000%s" "$HOME" "${REX_HOME-}"'
#: bytes of a command's stdout, and as many of its stderr, that a Result keeps: the tail (the
#: agent's report is its last line); what came before is only counted, so a host that floods
#: its output costs the launcher this much, not what it sent
OUTPUT_TAIL = 1 << 20
#: the largest file get() returns unless told otherwise: keys, records and /proc files are small
GET_LIMIT = 1 << 20

# paramiko logs every failed handshake (a dropped banner exchange included) at ERROR with a
# traceback; with no handler anywhere, logging's last resort would print it on stderr. rex
# reports those failures itself, per host; an application that configures logging still
# receives the records.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


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


@dataclass(frozen=True)
class Gate:
    """Hold a command's stdin until it printed ``marker`` as a line of its own, within
    ``within`` seconds of the request; past that the command is closed unfed and run() raises
    HostTimeoutError with phase ``start``. A command that ends without the marker (it had no
    use for its stdin) is never fed."""

    marker: bytes
    within: float


def wait_readable(fds: Sequence[int], timeout: float | None) -> list[int]:
    """``select.select(fds, [], [], timeout)[0]`` over poll(2): select() refuses descriptors
    past FD_SETSIZE (1024), which a launcher with a few hundred connections reaches. EOF and
    errors count as readable, as with select."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLPRI)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [fd for fd, _ in poller.poll(ms)]


class _Tail:
    """The last ``limit`` bytes of a stream read chunk by chunk, and how many came before
    them: memory stays at ``limit`` plus a chunk whatever the stream's length, and each byte
    is copied once."""

    __slots__ = ("_chunks", "_size", "cut", "limit")

    def __init__(self, limit: int = OUTPUT_TAIL) -> None:
        self.limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self.cut = 0

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self.limit:
            dropped = len(self._chunks.popleft())
            self._size -= dropped
            self.cut += dropped

    def value(self) -> tuple[bytes, int]:
        """(the kept tail, the bytes dropped before it)."""
        data = b"".join(self._chunks)
        extra = max(0, len(data) - self.limit)
        return data[extra:], self.cut + extra


class _Announcement:
    """Whether ``marker`` came as a line of its own in a stream read chunk by chunk, looking
    at each new chunk and the few bytes before it only (never the whole output again)."""

    __slots__ = ("_carry", "_needle", "seen")

    def __init__(self, marker: bytes) -> None:
        self._needle = b"\n" + marker + b"\n"
        self._carry = b"\n"  # the stream's start counts as a line start
        self.seen = False

    def feed(self, data: bytes) -> bool:
        if not self.seen:
            window = self._carry + data
            self.seen = self._needle in window
            self._carry = window[-(len(self._needle) - 1) :]
        return self.seen


def _not_started(gate: Gate, host: str) -> HostTimeoutError:
    return HostTimeoutError(
        f"the remote command did not start within {gate.within:g}s", host=host, phase="start"
    )


class Transport(Protocol):
    """One host as one login: run commands and move small files, all under deadlines."""

    host: Host

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        gate: Gate | None = None,
    ) -> Result: ...

    #: temp files of uploads cut mid-way that could not be removed over that connection
    leftovers: list[str]

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None: ...

    def get(self, path: str, limit: int = GET_LIMIT) -> bytes: ...

    def stat(self, path: str) -> tuple[int, int] | None: ...

    def remove(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...

    def rex_home(self) -> str: ...

    def close(self) -> None: ...


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


def host_key_name(address: str, port: int) -> str:
    """The known_hosts name OpenSSH and paramiko use: ``addr``, or ``[addr]:port`` off port 22."""
    return address if port == 22 else f"[{address}]:{port}"


def _temp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.rex-{secrets.token_hex(8)}.tmp")


def _combine_home(home: str, rex_home: str) -> str:
    if rex_home:
        return posixpath.normpath(posixpath.join(home, rex_home))
    return posixpath.normpath(posixpath.join(home, ".rex"))


# --- SSH ------------------------------------------------------------------------------------


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, name: str, key: paramiko.PKey) -> None:
        super().__init__(f"{name} not in known_hosts")
        self.name = name
        self.key = key


class StrictPolicy(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, raising a distinct exception so rex can name the phase."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise _UnknownHostKey(hostname, key)


def _timed_out(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if isinstance(seen, TimeoutError) or "timeout" in text or "timed out" in text:
            return True
        seen = seen.__context__
    return False


class _KnownHostsCache:
    """known_hosts files parsed once per content (path, mtime, size), not once per connection:
    paramiko takes its logging module lock for every line it parses, which serialised a
    64-host fan-out behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[tuple[int, int], paramiko.HostKeys]] = {}

    def get(self, path: str) -> paramiko.HostKeys | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._parsed.get(path)
            if hit is None or hit[0] != stamp:
                hit = (stamp, paramiko.HostKeys(path))
                self._parsed[path] = hit
            return hit[1]


_KNOWN_HOSTS = _KnownHostsCache()


def _stamp(paths: Sequence[str]) -> tuple[tuple[int, int] | None, ...]:
    """(mtime, size) of each path, None where there is no file: a cache key that changes
    when any of them is edited, created or removed."""
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(os.path.expanduser(path))
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


#: the files a fabric.Config reads when it is built: ssh_config and fabric's own
_FABRIC_FILES = (
    "/etc/ssh/ssh_config",
    "~/.ssh/config",
    *(f"{d}fabric.{ext}" for d in ("/etc/", "~/.") for ext in ("yaml", "yml", "json", "py")),
)


class _FabricConfigCache:
    """One fabric.Config per content of the files it reads, shared by every Connection, as
    fabric's own Group shares one: a Connection built without one constructs two Configs,
    each loading those files and merging its defaults (a fifth of a launch's launcher CPU)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._config: tuple[tuple[object, ...], fabric.Config] | None = None

    def get(self) -> fabric.Config:
        stamp = (os.path.expanduser("~"), _stamp(_FABRIC_FILES))
        with self._lock:
            if self._config is None or self._config[0] != stamp:
                self._config = (stamp, fabric.Config())
            return self._config[1]


_FABRIC_CONFIG = _FabricConfigCache()


class _Connection(fabric.Connection):  # type: ignore[misc]  # fabric ships no types
    """fabric's Connection with every attribute its constructor sets declared: invoke's
    DataProxy turns a set of an undeclared attribute into a write to the Config, and fabric
    3.2 sets ``inline_ssh_env`` undeclared. That write re-merges the shared Config, clearing
    it for a moment under the other threads reading it."""

    inline_ssh_env = None


class _IdentityCache:
    """Private keys loaded once per file content rather than per connection: paramiko's
    key_filename path parses the file once per key class it tries (three times for an
    ed25519 key) on every connection. A key that does not load here (encrypted, unknown
    type) is left to paramiko's key_filename path and its error messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[tuple[object, ...], paramiko.PKey | None]] = {}

    def get(self, path: str) -> paramiko.PKey | None:
        cert = path + "-cert.pub"
        stamp = _stamp((path, cert))
        with self._lock:
            hit = self._keys.get(path)
            if hit is None or hit[0] != stamp:
                hit = (stamp, self._load(path, cert))
                self._keys[path] = hit
            return hit[1]

    @staticmethod
    def _load(path: str, cert: str) -> paramiko.PKey | None:
        try:
            pkey = paramiko.PKey.from_path(path)
            if os.path.isfile(cert):  # as paramiko's key_filename path does
                pkey.load_certificate(cert)
        except Exception:  # paramiko raises many types; its key_filename path reports them
            return None
        return pkey


_IDENTITIES = _IdentityCache()

#: AEAD ciphers first: their integrity check runs in the cipher library, where with the
#: other ciphers paramiko compares every packet's MAC in a Python loop
_AEAD = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _aead_first(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """SSHClient.connect's transport_factory: paramiko's Transport offering the AES-GCM
    ciphers first (OpenSSH >= 6.2 has them); every cipher it offers stays on the list."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    options.ciphers = tuple(c for c in _AEAD if c in offered) + tuple(
        c for c in offered if c not in _AEAD
    )
    return transport


def _load_known_hosts(client: paramiko.SSHClient, known_hosts: str) -> None:
    # Into the client's own HostKeys (not client.load_host_keys: no file to save back into);
    # entries are immutable once parsed, so the clients share them
    parsed = _KNOWN_HOSTS.get(known_hosts)
    if parsed is None:
        return
    mine = client.get_host_keys()
    theirs, ours = getattr(parsed, "_entries", None), getattr(mine, "_entries", None)
    if isinstance(theirs, list) and isinstance(ours, list):
        ours.extend(theirs)
    else:  # a paramiko without that attribute: parse the file per client, as documented
        mine.load(known_hosts)


def _tcp_connect(host: Host, address: str, port: int, timeout: float) -> socket.socket:
    hint = f"check hosts.{host.name}.address/port and that sshd runs there"
    where = f"{address}:{port}"
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except socket.gaierror as e:
        raise UnreachableError(
            f"cannot resolve {address}: {e.strerror}", host=host.name, phase="connect", hint=hint
        ) from e
    except ConnectionRefusedError as e:
        raise UnreachableError(
            f"connection refused by {where}", host=host.name, phase="connect", hint=hint
        ) from e
    except TimeoutError as e:
        raise UnreachableError(
            f"no TCP connection to {where} within {timeout:g}s",
            host=host.name,
            phase="connect",
            hint=hint,
        ) from e
    except OSError as e:
        raise UnreachableError(
            f"cannot connect to {where}: {e.strerror or e}",
            host=host.name,
            phase="connect",
            hint=hint,
        ) from e
    # SSH packets are small request/reply pairs: Nagle plus delayed ACK would add ~40 ms to each
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# --- handshake pacing: sshd's MaxStartups ------------------------------------------------------
#
# sshd counts a connection from accept until authentication completes; past the start value of
# MaxStartups (OpenSSH default 10:30:100) it drops new ones at random, right after accept. A
# launcher dialling one sshd for many hosts entries or logins at once must stay below that.


class HandshakeGate:
    """At most ``limit`` unauthenticated handshakes to one sshd at a time; safe across threads.

    Hosts entries naming the same sshd may disagree on ``max_startups``: the smallest wins.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a handshake gate needs a limit of at least 1")
        self._cond = threading.Condition()
        self._limit = limit
        self._in_flight = 0
        self._waiting = 0

    @property
    def limit(self) -> int:
        """The smallest limit asked for so far."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Handshakes admitted and not yet released."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Callers blocked in acquire()."""
        return self._waiting

    def acquire(self, limit: int, timeout: float | None = None) -> bool:
        """Wait for a slot (lowering the gate's limit to ``limit``); False after ``timeout``."""
        if limit < 1:
            raise ValueError("a handshake gate needs a limit of at least 1")
        with self._cond:
            self._limit = min(self._limit, limit)
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: self._in_flight < self._limit, timeout):
                    return False
            finally:
                self._waiting -= 1
            self._in_flight += 1
            return True

    def dropped(self) -> None:
        """The sshd dropped a handshake this gate admitted (call before its release): its
        MaxStartups is below what got through, so admit no more than the others still in
        flight, at least one. The limit stays lowered for the gate's lifetime."""
        with self._cond:
            self._limit = max(1, min(self._limit, self._in_flight - 1))

    def release(self) -> None:
        """Give back a slot taken by acquire()."""
        with self._cond:
            if self._in_flight < 1:
                raise RuntimeError("handshake gate released more often than acquired")
            self._in_flight -= 1
            self._cond.notify()


class HandshakeGates:
    """The handshake gate of every sshd, by (address, port): several hosts or logins may share
    one sshd, and they must share its gate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gates: dict[tuple[str, int], HandshakeGate] = {}

    def gate(self, address: str, port: int, limit: int) -> HandshakeGate:
        """The gate of the sshd at ``address``:``port``, created with ``limit`` on first use."""
        with self._lock:
            gate = self._gates.get((address, port))
            if gate is None:
                gate = self._gates[(address, port)] = HandshakeGate(limit)
            return gate


#: the process-wide registry SSHTransport.open uses: every pool and thread shares it
HANDSHAKE_GATES = HandshakeGates()


@dataclass(frozen=True)
class HandshakeRetry:
    """Full-jitter exponential backoff for handshakes an sshd dropped: ``attempts`` in all,
    the pause before retry n drawn uniformly from [0, min(cap, base * 2**(n-1))]."""

    attempts: int = 4
    base: float = 0.1
    cap: float = 2.0

    def delay(self, retry: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        """The pause before retry number ``retry`` (1: the second attempt)."""
        return uniform(0.0, min(self.cap, self.base * 2 ** (retry - 1)))


_T = TypeVar("_T")
#: what sshd's early drop looks like through paramiko: EOF or reset while reading the banner
#: ("Error reading SSH protocol banner") or during the key exchange
_DROP_ERRORS = (EOFError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def dropped_by_server(exc: BaseException) -> bool:
    """True if ``exc`` (from SSHTransport's connect) is the sshd closing the connection during
    the banner exchange or the key exchange: what MaxStartups' random early drop looks like.

    Timeouts, refused connections, authentication and host-key failures are never drops.
    """
    if not isinstance(exc, TransportError) or exc.phase not in ("banner", "kex"):
        return False
    if isinstance(exc, (HostTimeoutError, UnreachableError, AuthenticationError, HostKeyError)):
        return False
    seen: BaseException | None = exc.__cause__
    while seen is not None:
        if isinstance(seen, _DROP_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_dropped(
    attempt: Callable[[], _T],
    *,
    deadline: float,
    policy: HandshakeRetry = HandshakeRetry(),
    retryable: Callable[[BaseException], bool] = dropped_by_server,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    uniform: Callable[[float, float], float] = random.uniform,
) -> _T:
    """``attempt()``, tried again after a jittered pause while it fails ``retryable``, at most
    ``policy.attempts`` times, and only when the pause ends before ``deadline`` (``clock``
    time); the last error is raised as is."""
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except Exception as e:
            if tries >= policy.attempts or not retryable(e):
                raise
            pause = policy.delay(tries, uniform)
            if clock() + pause >= deadline:
                raise
            sleep(pause)


def _gave_up(exc: TransportError, host: Host, attempts: int) -> TransportError:
    reason = str(exc).removeprefix(f"{exc.host}: {exc.phase}: ")
    return TransportError(
        f"{reason} ({attempts} attempts, each dropped before authentication)",
        host=host.name,
        phase=exc.phase,
        hint=f"its sshd drops connections past MaxStartups: set hosts.{host.name}.max_startups "
        f"(now {host.max_startups}) to its sshd's MaxStartups start value, or raise that",
    )


def _handshake(
    host: Host,
    user: User,
    known: str,
    timeouts: Timeouts,
    banner: float,
    auth: float,
    deadline: float,
) -> tuple[fabric.Connection, StrictPolicy]:
    """One connect, key exchange and authentication, inside a handshake slot of the sshd."""
    # never empty: fabric would use (and extend) the shared config's own dict instead
    kwargs: dict[str, Any] = {"transport_factory": _aead_first}
    if user.identity:
        # an explicit identity is the only key offered: deterministic, and no agent surprises
        path = os.path.expanduser(user.identity)
        pkey = _IDENTITIES.get(path)
        kwargs.update(look_for_keys=False, allow_agent=False)
        kwargs.update({"pkey": pkey} if pkey is not None else {"key_filename": [path]})
    conn = _Connection(
        host.address,
        user=user.login,
        port=host.port,
        config=_FABRIC_CONFIG.get(),
        connect_kwargs=kwargs,
    )
    policy = StrictPolicy()
    # fabric installs AutoAddPolicy in its constructor; replace it before anything connects
    conn.client.set_missing_host_key_policy(policy)
    _load_known_hosts(conn.client, known)
    # fabric rounds ssh_config's ConnectTimeout to whole seconds; rex's deadlines apply instead
    conn.connect_timeout = None
    # ssh_config may rename the host or port: the gate belongs to the sshd actually dialled
    address, port = str(conn.host), int(conn.port)
    gate = HANDSHAKE_GATES.gate(address, port, host.max_startups)
    if not gate.acquire(host.max_startups, timeout=max(0.0, deadline - time.monotonic())):
        raise HostTimeoutError(
            f"no handshake slot for {address}:{port} within {timeouts.connect:g}s: "
            f"{gate.in_flight} earlier handshakes to it are still in flight "
            f"(max_startups {gate.limit})",
            host=host.name,
            phase="connect",
            hint="that sshd is hung or very slow; check it, or raise timeouts.connect",
        )
    try:
        _open(conn, host, user, known, timeouts, banner, auth)
    except TransportError as e:
        if dropped_by_server(e):
            gate.dropped()
        raise
    else:
        if gate.in_flight > 1 or gate.waiting:
            _settle(conn, timeouts.connect)
    finally:
        # authenticated sessions no longer count toward sshd's MaxStartups
        gate.release()
    return conn, policy


def _open(
    conn: fabric.Connection,
    host: Host,
    user: User,
    known: str,
    timeouts: Timeouts,
    banner: float,
    auth: float,
) -> None:
    """TCP connect, key exchange and authentication of ``conn``; errors mapped by phase."""
    address, port = str(conn.host), int(conn.port)
    extra: dict[str, Any] = {
        # start_client's own deadline covers banner and key exchange
        "timeout": banner + timeouts.connect,
        "banner_timeout": banner,
        "auth_timeout": auth,
    }
    sock = None
    if not conn.gateway:
        sock = _tcp_connect(host, address, port, timeouts.connect)
        extra["sock"] = sock
    conn.connect_kwargs = {**conn.connect_kwargs, **extra}
    started = time.monotonic()
    try:
        conn.open()
    except BaseException as e:
        elapsed = time.monotonic() - started
        transport = conn.client.get_transport()
        conn.client.close()
        if sock is not None:
            sock.close()
        if isinstance(e, Exception):
            raise _connect_error(
                e, host, user, address, port, known, transport, banner, elapsed
            ) from e
        raise


def _settle(conn: fabric.Connection, timeout: float) -> None:
    """One round trip to sshd's post-authentication process before the slot is handed on.

    OpenSSH's listener stops counting a connection only once its monitor has taken over from
    the pre-auth child, a few ms after the client saw USERAUTH_SUCCESS; a waiter dialling in
    that gap is dropped. The post-auth process answers global requests, so its answer means
    the listener's count is down. Paid (one round trip) only while the sshd's gate is shared:
    a handshake alone on it leaves no waiter that could dial into the gap.
    """
    transport = conn.client.get_transport()
    if transport is None or not transport.is_active():
        return
    # Transport.global_request(wait=True) has no deadline: this is its body with one. OpenSSH's
    # ssh sends keepalive@openssh.com for ServerAliveInterval; servers answer it (failure)
    answered = threading.Event()
    transport.completion_event = answered
    request = paramiko.Message()
    request.add_byte(paramiko.common.cMSG_GLOBAL_REQUEST)
    request.add_string("keepalive@openssh.com")
    request.add_boolean(True)
    with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
        cast(Any, transport)._send_user_message(request)
        answered.wait(timeout)


class SSHTransport:
    """A fabric Connection held open for one host and login, with strict host-key checking.

    Commands go through paramiko's channel directly (exec, stdin, select on the channel until
    EOF) instead of invoke's Runner, whose threads poll with sleeps; files go through the
    connection's one SFTP session. Safe to share between threads.
    """

    def __init__(
        self,
        host: Host,
        user: User,
        conn: fabric.Connection,
        policy: paramiko.RejectPolicy,
        timeouts: Timeouts,
    ) -> None:
        self.host = host
        self.user = user
        self.timeouts = timeouts
        self.connection = conn
        self._client: paramiko.SSHClient = conn.client
        #: the policy rex installed on this connection's client; always a RejectPolicy
        self.missing_host_key_policy = policy
        self._lock = threading.Lock()
        self._sftp: paramiko.SFTPClient | None = None
        self._rex_home: str | None = None
        #: temp files of uploads this connection could not finish nor remove
        self.leftovers: list[str] = []

    @classmethod
    def open(
        cls,
        host: Host,
        user: User,
        *,
        known_hosts: str | os.PathLike[str] | None,
        timeouts: Timeouts | None = None,
        banner_timeout: float | None = None,
        auth_timeout: float | None = None,
    ) -> SSHTransport:
        """Connect, check the host key against ``known_hosts`` and authenticate, or raise.

        At most ``host.max_startups`` handshakes to the host's sshd are in flight at once
        (HANDSHAKE_GATES), and a connection the sshd drops before the key exchange completes is
        retried with jittered backoff while ``timeouts.connect`` allows (retry_dropped).
        """
        timeouts = timeouts or Timeouts()
        banner = timeouts.connect if banner_timeout is None else banner_timeout
        auth = timeouts.connect if auth_timeout is None else auth_timeout
        known = os.path.expanduser(os.fspath(known_hosts or DEFAULT_KNOWN_HOSTS))
        deadline = time.monotonic() + timeouts.connect
        attempts = 0

        def attempt() -> tuple[fabric.Connection, StrictPolicy]:
            nonlocal attempts
            attempts += 1
            return _handshake(host, user, known, timeouts, banner, auth, deadline)

        try:
            conn, policy = retry_dropped(attempt, deadline=deadline)
        except TransportError as e:
            if attempts > 1 and dropped_by_server(e):
                raise _gave_up(e, host, attempts) from e
            raise
        return cls(host, user, conn, policy, timeouts)

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise TransportError("connection lost", host=self.host.name, phase="exec")
        return transport

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        gate: Gate | None = None,
        abort: threading.Event | None = None,
    ) -> Result:
        """Run ``argv``, shlex-quoted, via the login shell; HostTimeoutError past ``timeout``,
        or (phase ``start``) past ``gate.within`` without the gate's marker. ``abort`` set
        (the caller went away) closes the channel, held stdin unsent: TransportError."""
        command = command_line(argv, env)
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        # the gate counts from the request: a login script's time is the command's start
        gate_end = now + (gate.within if gate is not None else 0.0)
        try:
            chan = self._transport().open_session(timeout=timeout)
        except paramiko.SSHException as e:
            raise self._exec_error(e, deadline, timeout) from e
        try:
            # exec_command waits for sshd's reply without a deadline; a timer closing the
            # channel bounds it
            timer = None
            if timeout is not None:
                timer = threading.Timer(timeout, chan.close)
                timer.daemon = True
                timer.start()
            try:
                chan.exec_command(command)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise self._exec_error(e, deadline, timeout) from e
            finally:
                if timer is not None:
                    timer.cancel()
            return self._collect(chan, stdin, deadline, timeout, gate, gate_end, abort)
        finally:
            chan.close()

    def usable(self, known_hosts: str | None) -> bool:
        """Whether this connection is up and its host key is still the one ``known_hosts``
        (None: ~/.ssh/known_hosts) pins for it now: a kept connection is reused only then."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            return False
        known = os.path.expanduser(known_hosts or DEFAULT_KNOWN_HOSTS)
        pinned = _KNOWN_HOSTS.get(known)
        if pinned is None:
            return False
        name = host_key_name(str(self.connection.host), int(self.connection.port))
        return bool(pinned.check(name, transport.get_remote_server_key()))

    def _exec_error(
        self, exc: BaseException, deadline: float | None, timeout: float | None
    ) -> TransportError:
        if deadline is not None and (time.monotonic() >= deadline or _timed_out(exc)):
            return HostTimeoutError(
                f"command did not finish within {timeout:g}s", host=self.host.name, phase="exec"
            )
        return TransportError(f"connection lost: {exc}", host=self.host.name, phase="exec")

    def _collect(
        self,
        chan: paramiko.Channel,
        stdin: bytes | None,
        deadline: float | None,
        timeout: float | None,
        gate: Gate | None = None,
        gate_end: float = 0.0,
        abort: threading.Event | None = None,
    ) -> Result:
        out, err = _Tail(), _Tail()
        pending = memoryview(stdin) if stdin else None
        if pending is None:
            chan.shutdown_write()
        # stdin waits for the gate's marker until ``gate_end``, if there is something to send
        held = gate if pending is not None else None
        announced = _Announcement(held.marker) if held is not None else None
        while True:
            while pending is not None and held is None and chan.send_ready():
                try:
                    sent = chan.send(pending[:_CHUNK].tobytes())
                except OSError:
                    # the command finished without reading all of stdin, as with EPIPE
                    pending = None
                    break
                pending = pending[sent:] if sent < len(pending) else None
                if pending is None:
                    chan.shutdown_write()
            # checked before draining: all data fed before EOF or close is then in the buffers
            done = chan.eof_received or chan.closed
            while chan.recv_ready():
                data = chan.recv(_CHUNK)
                out.add(data)
                if announced is not None:
                    announced.feed(data)
            while chan.recv_stderr_ready():
                err.add(chan.recv_stderr(_CHUNK))
            if held is not None and announced is not None and announced.seen:
                held = None
                continue
            if done:
                break
            if abort is not None and abort.is_set():
                raise TransportError(
                    "cancelled: the launcher went away", host=self.host.name, phase="exec"
                )
            now = time.monotonic()
            wait = None if deadline is None else deadline - now
            if wait is not None and wait <= 0:
                raise self._exec_error(TimeoutError(), deadline, timeout)
            if held is not None:
                if gate_end <= now:
                    raise _not_started(held, self.host.name)
                wait = gate_end - now if wait is None else min(wait, gate_end - now)
            # paramiko's stdout/stderr "or-pipe" can lose a wakeup (one half cleared while the
            # other is being set), so a bounded wait re-checks both buffers: without it a
            # remote blocked on a full window of unread stderr deadlocks until the deadline.
            # Held stdin waits for output like no stdin: the marker wakes the select.
            poll = _SEND_POLL if pending is not None and held is None else _RECV_POLL
            wait = poll if wait is None else min(wait, poll)
            wait_readable([chan.fileno()], wait)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not chan.status_event.wait(remaining):
            raise self._exec_error(TimeoutError(), deadline, timeout)
        transport = self._client.get_transport()
        if chan.exit_status == -1 and (transport is None or not transport.is_active()):
            raise self._exec_error(EOFError("connection closed"), deadline, timeout)
        (stdout, stdout_cut), (stderr, stderr_cut) = out.value(), err.value()
        return Result(chan.recv_exit_status(), stdout, stderr, stdout_cut, stderr_cut)

    @contextlib.contextmanager
    def _sftp_session(self) -> Iterator[paramiko.SFTPClient]:
        """The connection's SFTP client, used by one thread at a time; link errors mapped."""
        with self._lock:
            try:
                if self._sftp is None:
                    self._sftp = self._client.open_sftp()
                yield self._sftp
            except (paramiko.SSHException, EOFError) as e:
                raise TransportError(f"SFTP failed: {e}", host=self.host.name, phase="sftp") from e

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write ``path`` atomically (same-dir temp file, chmod before data, fsync, rename)."""
        with self._sftp_session() as sftp:
            _sftp_makedirs(sftp, posixpath.dirname(path))
            tmp = _temp_name(path)
            try:
                with sftp.open(tmp, "wbx") as f:
                    # mode before data, so no umask ever leaves the secret readable
                    f.chmod(mode)
                    f.write(data)
                    f.flush()
                    _sftp_fsync(sftp, f)
                sftp.posix_rename(tmp, path)
            except BaseException:
                try:
                    sftp.remove(tmp)
                except FileNotFoundError:
                    pass
                except Exception:  # SFTPError, EOFError, OSError...: the link broke
                    # mid-upload; the executor removes the file over a new connection
                    self.leftovers.append(tmp)
                raise

    def get(self, path: str, limit: int = GET_LIMIT) -> bytes:
        """The content of ``path``, read in pieces and never more than ``limit`` bytes of it;
        FileNotFoundError if absent, OSError (EFBIG) if it is longer."""
        with self._sftp_session() as sftp, sftp.open(path, "rb") as f:
            return _at_most(f.read(limit + 1), limit, path)

    def stat(self, path: str) -> tuple[int, int] | None:
        """(st_mode, st_size) of ``path`` without following a final symlink; None if absent."""
        with self._sftp_session() as sftp:
            try:
                st = sftp.lstat(path)
            except FileNotFoundError:
                return None
            return int(st.st_mode or 0), int(st.st_size or 0)

    def remove(self, path: str) -> bool:
        """Unlink ``path``; False if it was absent."""
        with self._sftp_session() as sftp:
            try:
                sftp.remove(path)
            except FileNotFoundError:
                return False
            return True

    def listdir(self, path: str) -> list[str]:
        """Sorted entry names of directory ``path``; [] if absent."""
        with self._sftp_session() as sftp:
            try:
                return sorted(sftp.listdir(path))
            except FileNotFoundError:
                return []

    def rex_home(self) -> str:
        """$REX_HOME of the session environment (relative: under $HOME), else ~/.rex; cached."""
        with self._lock:
            if self._rex_home is not None:
                return self._rex_home
        result = self.run(["sh", "-c", _REX_HOME_SCRIPT], timeout=self.timeouts.start)
        home, _, value = result.stdout.decode("utf-8", "surrogateescape").partition("\0")
        if result.exit_status != 0 or not home.startswith("/"):
            raise TransportError(
                f"cannot read $HOME/$REX_HOME: {result.stderr.decode(errors='replace').strip()}",
                host=self.host.name,
                phase="exec",
            )
        with self._lock:
            self._rex_home = _combine_home(home, value)
            return self._rex_home

    def close(self) -> None:
        """Close the SFTP session and the connection; idempotent."""
        with self._lock:
            if self._sftp is not None:
                with contextlib.suppress(Exception):
                    self._sftp.close()
                self._sftp = None
        self.connection.close()
        # fabric closes only a connection it still sees as up; a dead one keeps its client
        self._client.close()


def _at_most(data: bytes, limit: int, path: str) -> bytes:
    """``data`` (read with ``limit`` + 1 asked for) if it fits ``limit``, else EFBIG."""
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"longer than {limit} bytes", path)
    return data


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """Create missing directories of ``path`` with mode 0700 exactly."""
    if path in ("", "/", "."):
        return
    try:
        st = sftp.stat(path)
    except FileNotFoundError:
        _sftp_makedirs(sftp, posixpath.dirname(path))
        try:
            sftp.mkdir(path, 0o700)
        except OSError:
            # another writer may have created it meanwhile; anything else shows up below
            if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                raise
            return
        sftp.chmod(path, 0o700)
        return
    if not stat.S_ISDIR(st.st_mode or 0):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)


def _sftp_fsync(sftp: paramiko.SFTPClient, f: paramiko.SFTPFile) -> None:
    # paramiko has no public fsync; OpenSSH's sftp-server offers the fsync@openssh.com extension
    with contextlib.suppress(OSError):
        cast(Any, sftp)._request(paramiko.sftp.CMD_EXTENDED, "fsync@openssh.com", f.handle)


def _connect_error(
    exc: Exception,
    host: Host,
    user: User,
    address: str,
    port: int,
    known_hosts: str,
    transport: paramiko.Transport | None,
    banner: float,
    elapsed: float,
) -> TransportError:
    """Map a failed fabric/paramiko connect to the phase it failed in."""
    name = host_key_name(address, port)
    if isinstance(exc, _UnknownHostKey):
        return HostKeyError(
            f"unknown host key for {name} ({exc.key.get_name()} {exc.key.fingerprint}): "
            f"not in {known_hosts}; nothing was run",
            host=host.name,
            phase="hostkey",
            hint="check the fingerprint, then pin it: rex hostkeys scan -m MANIFEST --accept",
        )
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            f"host key CHANGED for {name}: it offered {exc.key.get_name()} "
            f"{exc.key.fingerprint}, {known_hosts} pins {exc.expected_key.fingerprint} "
            f"(possible man-in-the-middle); known_hosts left unchanged, nothing was run",
            host=host.name,
            phase="hostkey",
            hint=f"if {host.name} was really rebuilt: rex hostkeys scan -m MANIFEST "
            f"--replace {host.name}",
        )
    if transport is None or not transport.remote_version:
        if elapsed >= banner or _timed_out(exc):
            return HostTimeoutError(
                f"no SSH banner from {address}:{port} within {banner:g}s (sshd hung or overloaded)",
                host=host.name,
                phase="banner",
            )
        return TransportError(
            f"{address}:{port} closed the connection before the SSH banner: {exc}",
            host=host.name,
            phase="banner",
        )
    if transport.host_key is None:
        if _timed_out(exc):
            return HostTimeoutError(
                f"SSH key exchange with {address}:{port} timed out", host=host.name, phase="kex"
            )
        return TransportError(f"SSH key exchange failed: {exc}", host=host.name, phase="kex")
    if isinstance(exc, paramiko.AuthenticationException) and "timeout" in str(exc).lower():
        return HostTimeoutError(
            f"authentication as {user.login} did not complete in time", host=host.name, phase="auth"
        )
    if isinstance(exc, paramiko.SSHException):
        offered = user.identity or "agent and default keys"
        return AuthenticationError(
            f"{address}:{port} refused login as {user.login} with {offered}",
            host=host.name,
            phase="auth",
            hint=f"check users.{user.name}.identity and ~{user.login}/.ssh/authorized_keys "
            "on the host",
        )
    return TransportError(f"connection failed: {exc}", host=host.name, phase="auth")


# --- host keys for `rex hostkeys` --------------------------------------------------------------


@dataclass(frozen=True)
class HostKeyInfo:
    """A host's public key as offered over SSH."""

    name: str  # known_hosts name: addr or [addr]:port
    key_type: str  # e.g. ssh-ed25519
    key_base64: str
    fingerprint: str  # SHA256:...

    @property
    def known_hosts_line(self) -> str:
        return f"{self.name} {self.key_type} {self.key_base64}\n"


def scan_host_key(host: Host, *, timeout: float = 10.0) -> HostKeyInfo:
    """Fetch the key ``host`` offers (key exchange only: no authentication, nothing run)."""
    sock = _tcp_connect(host, host.address, host.port, timeout)
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    started = time.monotonic()
    try:
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
    except Exception as e:
        elapsed = time.monotonic() - started
        nobody = User(name="scan", login="scan")
        raise _connect_error(
            e, host, nobody, host.address, host.port, "", transport, timeout, elapsed
        ) from e
    finally:
        transport.close()
        sock.close()
    return HostKeyInfo(
        name=host_key_name(host.address, host.port),
        key_type=key.get_name(),
        key_base64=key.get_base64(),
        fingerprint=key.fingerprint,
    )


def host_key_status(known_hosts: str | os.PathLike[str], key: HostKeyInfo) -> str:
    """``ok``, ``unknown`` (no entry for the name) or ``changed`` (entry with another key)."""
    keys = paramiko.HostKeys()
    with contextlib.suppress(FileNotFoundError):
        keys.load(os.fspath(known_hosts))
    pinned = keys.lookup(key.name)
    if pinned is None or not len(pinned):
        return "unknown"
    entry = pinned.get(key.key_type)
    return "ok" if entry is not None and entry.get_base64() == key.key_base64 else "changed"


# --- local ----------------------------------------------------------------------------------


class LocalTransport:
    """``transport: local``: this machine as the launcher's own user, same interface.

    Commands run with subprocess (argv list, no shell, a new session so a timeout kills the
    whole group) rather than invoke's Local runner: invoke wants a shell command string and
    polls its pipes with sleeping threads, while _pump waits on poll(2) and keeps only the
    tail of the output. ``user.login`` is not switched to.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self.leftovers: list[str] = []  # put() removes its own temp files locally

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        gate: Gate | None = None,
    ) -> Result:
        """Run ``argv`` directly; a missing program gives status 127 as a shell would; ``gate``
        as over SSH."""
        command_line(argv, env)  # the same argv and env rules as over SSH
        environ = {**os.environ, **env} if env else None
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        gate_end = now + (gate.within if gate is not None else 0.0)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environ,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError) as e:
            status = 127 if isinstance(e, FileNotFoundError) else 126
            return Result(status, b"", f"{argv[0]}: {e.strerror}\n".encode())
        try:
            out, err = _pump(proc, stdin, deadline, gate if stdin else None, gate_end)
        except _Overdue as e:
            _kill_group(proc)
            if gate is not None and e.phase == "start":
                raise _not_started(gate, self.host.name) from None
            raise HostTimeoutError(
                f"command did not finish within {timeout:g}s", host=self.host.name, phase="exec"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            for pipe in (proc.stdout, proc.stderr):
                _close(pipe)
        (stdout, stdout_cut), (stderr, stderr_cut) = out.value(), err.value()
        return Result(proc.returncode, stdout, stderr, stdout_cut, stderr_cut)

    def _path(self, path: str) -> str:
        return os.path.join(os.path.expanduser("~"), path)

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write ``path`` atomically: O_EXCL temp file in the same dir, fchmod, fsync, rename."""
        path = self._path(path)
        _local_makedirs(os.path.dirname(path))
        tmp = _temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def get(self, path: str, limit: int = GET_LIMIT) -> bytes:
        """The content of ``path``, never more than ``limit`` bytes of it; FileNotFoundError
        if absent, OSError (EFBIG) if it is longer."""
        with open(self._path(path), "rb") as f:
            return _at_most(f.read(limit + 1), limit, path)

    def stat(self, path: str) -> tuple[int, int] | None:
        """(st_mode, st_size) of ``path`` without following a final symlink; None if absent."""
        try:
            st = os.lstat(self._path(path))
        except FileNotFoundError:
            return None
        return st.st_mode, st.st_size

    def remove(self, path: str) -> bool:
        """Unlink ``path``; False if it was absent."""
        try:
            os.unlink(self._path(path))
        except FileNotFoundError:
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        """Sorted entry names of directory ``path``; [] if absent."""
        try:
            return sorted(os.listdir(self._path(path)))
        except FileNotFoundError:
            return []

    def rex_home(self) -> str:
        """$REX_HOME of the launcher's environment (relative: under ~), else ~/.rex."""
        return _combine_home(os.path.expanduser("~"), os.environ.get("REX_HOME", ""))

    def close(self) -> None:
        """Nothing to release."""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        _close(pipe)
    proc.wait()


class _Overdue(Exception):
    """A local command passed a deadline: ``phase`` is ``start`` (its gate's) or ``exec``."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


def _pump(
    proc: subprocess.Popen[bytes],
    stdin: bytes | None,
    deadline: float | None,
    gate: Gate | None,
    gate_end: float,
) -> tuple[_Tail, _Tail]:
    """Feed ``stdin`` to ``proc`` (with ``gate``: only once its stdout announced the gate's
    marker, by ``gate_end``; never if its stdout ends first) and keep the tails of its output
    until both streams end and it exits; _Overdue past a deadline (the caller kills it).

    Popen.communicate would keep every byte the command writes: a host that floods its
    output (a login script, a hostile interpreter) would cost the launcher that much memory.
    """
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Tail(), _Tail()
    stdout = proc.stdout.fileno()
    tails = {stdout: out, proc.stderr.fileno(): err}
    announced = _Announcement(gate.marker) if gate is not None else None
    pending = memoryview(stdin) if stdin and proc.stdin is not None else None
    writer = proc.stdin.fileno() if proc.stdin is not None else -1
    if pending is not None:
        os.set_blocking(writer, False)
    feeding = False  # the writer is registered with the poller
    poller = select.poll()
    for fd in tails:
        poller.register(fd, select.POLLIN)
    while tails:
        held = announced is not None and not announced.seen
        if held and stdout not in tails:
            held, pending = False, None  # its stdout ended unannounced: no use for stdin
            _close(proc.stdin)
        now = time.monotonic()
        if held and now >= gate_end:
            raise _Overdue("start")
        if deadline is not None and now >= deadline:
            raise _Overdue("exec")
        if pending is not None and not held and not feeding:
            poller.register(writer, select.POLLOUT)
            feeding = True
        ends = [t for t in (deadline, gate_end if held else None) if t is not None]
        wait = None if not ends else max(0, int((min(ends) - now) * 1000 + 0.999))
        for fd, _ in poller.poll(wait):
            if fd in tails:
                data = os.read(fd, _CHUNK)
                if not data:
                    poller.unregister(fd)
                    del tails[fd]
                    continue
                tails[fd].add(data)
                if announced is not None and fd == stdout:
                    announced.feed(data)
            elif pending is not None:
                try:
                    pending = pending[os.write(fd, pending[:_CHUNK]) :] or None
                except BlockingIOError:
                    continue
                except OSError:  # it stopped reading, as with EPIPE: the rest is not for it
                    pending = None
                if pending is None:
                    poller.unregister(fd)
                    _close(proc.stdin)
    _close(proc.stdin)
    try:
        proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise _Overdue("exec") from None
    return out, err


def _close(pipe: Any) -> None:
    if pipe is not None:
        with contextlib.suppress(OSError):
            pipe.close()


def _local_makedirs(path: str) -> None:
    if not path or os.path.isdir(path):
        return
    _local_makedirs(os.path.dirname(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)


# --- entry points ---------------------------------------------------------------------------


def connect(
    host: Host,
    user: User,
    *,
    known_hosts: str | os.PathLike[str] | None,
    timeouts: Timeouts | None = None,
    banner_timeout: float | None = None,
    auth_timeout: float | None = None,
) -> Transport:
    """Open a transport to ``host`` as ``user``; connection errors surface here, by phase.

    ``known_hosts`` None means ~/.ssh/known_hosts; unknown or changed keys are refused, never
    added. Banner and auth deadlines default to ``timeouts.connect``.
    """
    if host.transport == "local":
        return LocalTransport(host)
    if host.transport != "ssh":
        raise ValueError(f"unknown transport {host.transport!r}")
    return SSHTransport.open(
        host,
        user,
        known_hosts=known_hosts,
        timeouts=timeouts,
        banner_timeout=banner_timeout,
        auth_timeout=auth_timeout,
    )


Connector = Callable[[Host, User], Transport]


class TransportPool:
    """One transport per (host, login), opened on first use and shared by every thread.

    A failed connect is remembered and re-raised for that host, so steps on an unreachable
    host fail at once instead of each waiting out the connect deadline again.
    """

    def __init__(
        self,
        *,
        known_hosts: str | os.PathLike[str] | None,
        timeouts: Timeouts | None = None,
        banner_timeout: float | None = None,
        auth_timeout: float | None = None,
        connector: Connector | None = None,
    ) -> None:
        def default(host: Host, user: User) -> Transport:
            return connect(
                host,
                user,
                known_hosts=known_hosts,
                timeouts=timeouts,
                banner_timeout=banner_timeout,
                auth_timeout=auth_timeout,
            )

        self._connect = connector or default
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, str], _Slot] = {}

    def get(self, host: Host, user: User) -> Transport:
        """The open transport for ``host`` as ``user.login``, connecting on first use."""
        key = (host.name, user.login)
        with self._lock:
            slot = self._slots.setdefault(key, _Slot())
        # connects to different hosts proceed in parallel; the same host connects once
        with slot.lock:
            if slot.error is not None:
                raise slot.error
            if slot.transport is None:
                try:
                    slot.transport = self._connect(host, user)
                except TransportError as e:
                    slot.error = e
                    raise
            return slot.transport

    def discard(self, host: Host, user: User) -> None:
        """Close and forget ``host``'s transport or remembered error; get() reconnects."""
        with self._lock:
            slot = self._slots.pop((host.name, user.login), None)
        if slot is not None:
            with slot.lock:
                if slot.transport is not None:
                    slot.transport.close()

    def close_all(self) -> None:
        """Close every transport; the pool can be used again afterwards."""
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            with slot.lock:
                if slot.transport is not None:
                    with contextlib.suppress(Exception):
                        slot.transport.close()

    def __enter__(self) -> TransportPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transport: Transport | None = None
        self.error: TransportError | None = None


# --- streams: a remote command fed and read over time (tree fan-out relays) --------------------


class Stream:
    """A command on an SSH host whose stdin stays open: send data as it comes, read its output
    line by line. stderr is merged into stdout so a chatty command never blocks on a full
    window nobody reads. One reader thread; send() is safe from any thread."""

    def __init__(self, chan: paramiko.Channel, host: str) -> None:
        self.host = host
        self._chan = chan
        self._buffer = b""
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        """Write ``data`` to the command's stdin; TransportError once the channel is gone."""
        with self._send_lock:
            try:
                self._chan.sendall(data)
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise TransportError(f"stream closed: {e}", host=self.host, phase="exec") from e

    def readline(self, limit: int) -> bytes:
        """The next output line (at most ``limit`` bytes); b"" once the command has ended or
        the connection died."""
        while b"\n" not in self._buffer and len(self._buffer) < limit:
            try:
                data = self._chan.recv(_CHUNK)
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            if not data:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += data
        end = self._buffer.find(b"\n") + 1 or limit
        line, self._buffer = self._buffer[: min(end, limit)], self._buffer[min(end, limit) :]
        return line

    def close_input(self) -> None:
        """EOF on the command's stdin."""
        with self._send_lock, contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._chan.shutdown_write()

    def close(self) -> None:
        """Close the channel (sshd then closes the command's pipes); idempotent."""
        self._chan.close()


def open_stream(transport: Transport, argv: Sequence[str], *, timeout: float) -> Stream:
    """Start ``argv`` (shlex-quoted, via the login shell) on an SSH transport as a Stream;
    ``timeout`` bounds the channel open and exec request."""
    direct = getattr(transport, "direct", None)  # a kept connection's (rexplan.transport.persist)
    if callable(direct):
        transport = direct()
    if not isinstance(transport, SSHTransport):
        raise TransportError("streams need transport: ssh", host=transport.host.name, phase="exec")
    command = command_line(argv)
    try:
        chan = transport._transport().open_session(timeout=timeout)
    except paramiko.SSHException as e:
        raise TransportError(f"connection lost: {e}", host=transport.host.name, phase="exec") from e
    timer = threading.Timer(timeout, chan.close)
    timer.daemon = True
    timer.start()
    try:
        chan.set_combine_stderr(True)
        chan.exec_command(command)
    except (paramiko.SSHException, EOFError, OSError) as e:
        chan.close()
        raise TransportError(
            f"cannot start {argv[0]}: {e}", host=transport.host.name, phase="exec"
        ) from e
    finally:
        timer.cancel()
    return Stream(chan, transport.host.name)
