"""Connection persistence (``persist``), the launcher's side: SSH calls through the daemon.

What OpenSSH's ControlMaster/ControlPersist does for Ansible: with ``persist: SECONDS`` rex's
SSH work goes through one daemon per local user (rexplan.transport.persistd), which holds the
connections and closes them, and itself, after SECONDS without a request.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import rexplan
from rexplan.core.model import MAX_PERSIST, Host, Manifest, Timeouts, User
from rexplan.core.text import printable
from rexplan.errors import TransportError
from rexplan.transport import route
from rexplan.transport.base import (
    GET_LIMIT,
    Result,
    RunOptions,
    Sink,
    Transport,
    kind,
    unpack,
)
from rexplan.transport.forward import peer_label
from rexplan.transport.local import LocalStream, LocalTransport
from rexplan.transport.persist_wire import (
    MUX_ENV,
    SOCKET,
    MuxError,
    b64,
    error_from_wire,
    recv,
    safe_dir,
    send,
    unb64,
)
from rexplan.transport.pool import Connector, TransportPool
from rexplan.transport.ssh import SSHTransport, open_stream
from rexplan.transport.streams import Lines, wait_readable

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: the daemon's stdout and stderr, in its directory
LOG_FILE = "mux.log"
#: seconds a new daemon may take to listen
SPAWN_TIMEOUT = 10.0
#: longest persistence accepted (a day), as for ControlPersist a time, not forever
#: bytes of the daemon's log quoted when it would not start
LOG_TAIL = 2000
#: ``python -I -c BOOT SYS_PATH_JSON serve ...``: the daemon's sys.path is exactly the one
#: given (-I has put neither the current directory nor PYTHONPATH on it), then its main.
#: Isolated, with cwd ``/``: ``-m`` would put the current directory first on sys.path, and a
#: ``./rexplan/__init__.py`` planted where someone runs ``rex apply --persist`` would run as
#: that user, in the process holding the SSH connections
BOOT = (
    "import json,sys\n"
    "sys.path[:]=json.loads(sys.argv.pop(1))\n"
    "from rexplan.transport.persistd import main\n"
    "sys.exit(main())\n"
)


def mux_dir() -> str:
    """$REX_MUX_DIR, else ~/.rex/mux."""
    return os.environ.get(MUX_ENV) or os.path.join(os.path.expanduser("~"), ".rex", "mux")


class MuxClient:
    """Talks to this user's daemon in ``directory``, starting one when there is none."""

    def __init__(self, persist: float, directory: str | None = None) -> None:
        if not 0 < persist <= MAX_PERSIST:
            raise MuxError(f"persist must be from 0 to {MAX_PERSIST:g} seconds")
        self.persist = persist
        self.directory = directory or mux_dir()
        self.path = os.path.join(self.directory, SOCKET)

    def _dial(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self) -> socket.socket:
        """A connection to the daemon; starts it (once, under a lock) when there is none."""
        with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
            return self._dial()
        safe_dir(self.directory)
        lock = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                return self._dial()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a daemon that died without removing it
            self._spawn()
            return self._dial()
        finally:
            os.close(lock)

    def _spawn(self) -> None:
        read_end, write_end = os.pipe()
        log_path = os.path.join(self.directory, LOG_FILE)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        logged = os.fstat(log).st_size
        try:
            argv = [sys.executable, "-I", "-c", BOOT, json.dumps(daemon_path())]
            argv += ["serve", os.path.abspath(self.directory), "--persist", f"{self.persist:g}"]
            argv += ["--ready-fd", str(write_end)]
            spawned = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_end,),
                start_new_session=True,
                close_fds=True,
                cwd="/",
            )
        finally:
            os.close(write_end)
            os.close(log)
        try:
            ready = _read_line(read_end, SPAWN_TIMEOUT)
        finally:
            os.close(read_end)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spawned.wait(SPAWN_TIMEOUT)  # it forks the daemon and exits
        if ready == b"ready":
            return
        if ready:
            why = printable(ready.decode(errors="replace"))
        elif spawned.returncode is None:
            why = f"no answer within {SPAWN_TIMEOUT:g}s"
        else:
            # it died before it was ready (at once, as a rule): say so, and what it said
            status = spawned.returncode
            why = f"it exited (status {status})" if status else "it exited before it was ready"
            tail = _log_tail(log_path, logged)
            if tail:
                why += f"; its log ends: {tail}"
        raise MuxError(
            f"the connection persistence daemon did not start: {why}",
            hint=f"see {log_path}, or run without persist",
        )

    def request(self, obj: Mapping[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send one request and return the daemon's reply (a daemon shutting down as we
        connected is retried once, with a new daemon)."""
        for _ in range(2):
            sock = self.connect()
            with sock:
                sock.settimeout(timeout)
                try:
                    send(sock, obj)
                    reply = recv(sock)
                except (OSError, EOFError, ValueError) as exc:
                    raise TransportError(
                        f"connection persistence daemon: {exc}",
                        host=str(obj.get("host", {}).get("name", "")),
                        phase="exec",
                        hint=f"see {os.path.join(self.directory, LOG_FILE)}",
                    ) from exc
            if not reply.get("retry"):
                return reply
        raise MuxError("the connection persistence daemon keeps shutting down")

    def _ask(self, op: str) -> dict[str, Any] | None:
        """The running daemon's reply to ``op``; None when none runs. Starts nothing."""
        try:
            sock = self._dial()
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        with sock:
            sock.settimeout(10)
            send(sock, {"op": op})
            return recv(sock)

    def ping(self) -> dict[str, Any] | None:
        """The running daemon's pid and connection counts (kept now, opened in all); None
        when none runs. Starts nothing."""
        return self._ask("ping")

    def stop(self) -> int | None:
        """Stop the daemon; its pid, or None when none was running."""
        reply = self._ask("stop")
        pid = None if reply is None else reply.get("pid")
        return pid if isinstance(pid, int) else None


def daemon_path() -> list[str]:
    """The daemon's sys.path: this process's absolute entries other than the current
    directory (what ``-m`` puts first), so nothing that names a directory by where rex runs
    (``''``, ``.``, any relative entry), with the directory rexplan came from."""
    here = os.path.realpath(os.getcwd())
    paths: list[str] = []
    for entry in sys.path:
        if not os.path.isabs(entry) or os.path.realpath(entry) == here:
            continue
        if entry not in paths:
            paths.append(entry)
    # rexplan may have come from the current directory (python -m rexplan.cli in a checkout)
    root = os.path.dirname(os.path.dirname(os.path.abspath(rexplan.__file__)))
    return paths if root in paths else [root, *paths]


def _log_tail(path: str, start: int) -> str:
    """The last LOG_TAIL bytes the daemon wrote to its log after ``start``, shown safely."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(start, size - LOG_TAIL))
            data = f.read(LOG_TAIL)
    except OSError:
        return ""
    return printable(data.decode(errors="replace").strip(), LOG_TAIL // 2, keep="\n")


def _read_line(fd: int, within: float) -> bytes:
    end = time.monotonic() + within
    buf = b""
    while b"\n" not in buf:
        remaining = end - time.monotonic()
        if remaining <= 0 or not wait_readable([fd], remaining):
            break
        data = os.read(fd, 512)
        if not data:
            break
        buf += data
    return buf.split(b"\n", 1)[0].strip()


class MuxTransport:
    """A Transport whose calls the daemon runs on its kept connection to ``host``."""

    def __init__(
        self,
        host: Host,
        user: User,
        client: MuxClient,
        *,
        known_hosts: str | None,
        timeouts: Timeouts,
    ) -> None:
        self.host = host
        self.user = user
        self.client = client
        self.known_hosts = known_hosts
        self.timeouts = timeouts
        self.leftovers: list[str] = []
        self._direct: SSHTransport | None = None
        #: the connection to the daemon holding our callback forward open, and its port
        self._forward: tuple[socket.socket, int] | None = None
        self._lock = threading.Lock()

    def _request(self, op: str) -> dict[str, Any]:
        return {
            "op": op,
            # the daemon reads the ssh_config this process would ($REX_SSH_CONFIG is ours)
            "host": dataclasses.asdict(
                dataclasses.replace(
                    self.host, ssh_config=self.host.ssh_config or os.environ.get(route.ENV)
                )
            ),
            "user": dataclasses.asdict(self.user),
            "known_hosts": self.known_hosts,
            "timeouts": dataclasses.asdict(self.timeouts),
        }

    def _call(self, method: str, within: float | None, **args: Any) -> Any:
        request = {**self._request("call"), "method": method, "args": args}
        # the daemon may have to connect first: its connect deadline comes on top
        wait = None if within is None else within + self.timeouts.connect + 5.0
        reply = self.client.request(request, wait)
        self.leftovers.extend(str(p) for p in reply.get("leftovers") or [])
        if not reply.get("ok"):
            raise error_from_wire(reply.get("error") or {}, self.host.name)
        return reply.get("value")

    def open(self) -> None:
        """Have the daemon connect (or check its kept connection): a host's connect errors
        surface here, at TransportPool.get, as without persistence."""
        self._call("open", 0.0)

    def run(self, argv: Sequence[str], **opts: Unpack[RunOptions]) -> Result:
        stdin, timeout, env, gate = unpack(opts)
        value = self._call(
            "run",
            timeout,
            argv=list(argv),
            stdin=b64(stdin),
            timeout=timeout,
            env=dict(env) if env is not None else None,
            gate=None
            if gate is None
            else [b64(gate.marker), gate.within, b64(gate.wanted), b64(gate.supply)],
        )
        cut = value.get("cut") or [0, 0]
        return Result(
            int(value["exit_status"]),
            unb64(value["stdout"]),
            unb64(value["stderr"]),
            int(cut[0]),
            int(cut[1]),
        )

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        self._call("put", None, data=b64(data), path=path, mode=mode)

    def get(self, path: str, limit: int = GET_LIMIT) -> bytes:
        return unb64(self._call("get", None, path=path, limit=limit))

    def stat(self, path: str) -> tuple[int, int] | None:
        value = self._call("stat", None, path=path)
        return None if value is None else (int(value[0]), int(value[1]))

    def remove(self, path: str) -> bool:
        return bool(self._call("remove", None, path=path))

    def listdir(self, path: str) -> list[str]:
        return [str(name) for name in self._call("listdir", None, path=path)]

    def rex_home(self) -> str:
        return str(self._call("rex_home", self.timeouts.start))

    def callback_port(self, sink: Sink) -> int:
        """``callback: {via: ssh}`` through the daemon, which holds the SSH connection: it
        opens the forward and hands each forwarded connection over as a descriptor on a
        connection of ours held for this transport's life; our end closing (close(), or this
        process killed) cancels the forward."""
        with self._lock:
            if self._forward is None:
                for _ in range(2):
                    sock = self.client.connect()
                    try:
                        sock.settimeout(self.timeouts.connect + 5.0)
                        send(sock, self._request("forward"))
                        reply = recv(sock)
                    except (OSError, EOFError, ValueError) as exc:
                        sock.close()
                        raise TransportError(
                            f"connection persistence daemon: {exc}",
                            host=self.host.name,
                            phase="start",
                        ) from exc
                    if not reply.get("retry"):
                        break
                    sock.close()
                if not reply.get("ok"):
                    sock.close()
                    raise error_from_wire(reply.get("error") or {}, self.host.name)
                sock.settimeout(None)
                self._forward = (sock, int(reply["value"]))
                threading.Thread(
                    target=self._forwarded, args=(sock, sink), name="rex-forward", daemon=True
                ).start()
            return self._forward[1]

    def _forwarded(self, sock: socket.socket, sink: Sink) -> None:
        """Hand each connection the daemon forwards to ``sink``, until it hangs up."""
        count = 0
        with contextlib.suppress(OSError):
            while True:
                data, fds, _, _ = socket.recv_fds(sock, 1, 1)
                if not data:
                    break
                for fd in fds:
                    count += 1
                    sink(socket.socket(fileno=fd), peer_label(self.host.name, count))

    def stream(self, argv: Sequence[str], *, stdin: bytes, timeout: float) -> MuxStream:
        """Start ``argv`` on the daemon's kept connection as a stream (its channel closes
        when this stream does); ``stdin`` is sent first and the command's stdin stays open."""
        request = {
            "op": "stream",
            "host": dataclasses.asdict(self.host),
            "user": dataclasses.asdict(self.user),
            "known_hosts": self.known_hosts,
            "timeouts": dataclasses.asdict(self.timeouts),
            "args": {
                "argv": list(argv),
                "stdin": b64(stdin) if stdin else None,
                "timeout": timeout,
            },
        }
        sock = self.client.connect()
        try:
            sock.settimeout(timeout + self.timeouts.connect + 5.0)
            send(sock, request)
            reply = recv(sock)
            sock.settimeout(None)
        except (OSError, EOFError, ValueError) as exc:
            sock.close()
            raise TransportError(
                f"connection persistence daemon: {exc}", host=self.host.name, phase="exec"
            ) from exc
        if not reply.get("ok"):
            sock.close()
            raise error_from_wire(reply.get("error") or {}, self.host.name)
        return MuxStream(sock)

    def direct(self) -> SSHTransport:
        """A connection of this process's own, for what needs one (tree relays' streams)."""
        with self._lock:
            if self._direct is None:
                self._direct = SSHTransport.open(
                    self.host, self.user, known_hosts=self.known_hosts, timeouts=self.timeouts
                )
            return self._direct

    def close(self) -> None:
        """The daemon keeps the connection; only a direct one of this process closes, and
        the daemon cancels this transport's forward."""
        with self._lock:
            direct, self._direct = self._direct, None
            forward, self._forward = self._forward, None
        if forward is not None:
            with contextlib.suppress(OSError):
                forward[0].shutdown(socket.SHUT_RDWR)
            forward[0].close()
        if direct is not None:
            direct.close()


class MuxStream:
    """A command's output relayed by the daemon, line by line; close() hangs up, and the
    daemon then closes the command's channel."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lines = Lines(lambda: self._sock.recv(1 << 16))

    def readline(self, limit: int) -> bytes:
        """The next output line (at most ``limit`` bytes); b"" once it ended or was closed."""
        return self._lines.readline(limit)

    def close(self) -> None:
        """Hang up (a reader blocked in readline gets b""); idempotent."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class Follower(Protocol):
    """What follow_stream gives: output lines as they come, and close()."""

    def readline(self, limit: int) -> bytes: ...

    def close(self) -> None: ...


def follow_stream(
    transport: Transport, argv: Sequence[str], *, stdin: bytes, timeout: float
) -> Follower:
    """``argv`` on ``transport``'s host with its stdin kept open (after ``stdin``) and its
    output read as it comes: through the daemon's kept connection, over an SSH channel of
    this process, or as a local process; closing it closes that stdin (the command's end)."""
    if isinstance(transport, MuxTransport):
        return transport.stream(argv, stdin=stdin, timeout=timeout)
    if isinstance(transport, LocalTransport):
        return LocalStream(transport.host, argv, stdin)
    stream = open_stream(transport, argv, timeout=timeout)
    if stdin:
        stream.send(stdin)
    return stream


def connector(
    persist: float, *, known_hosts: str | os.PathLike[str] | None, timeouts: Timeouts
) -> Connector:
    """A TransportPool connector sending SSH hosts' calls through the daemon (local hosts
    are run here, as always)."""
    client = MuxClient(persist)
    safe_dir(client.directory)  # refused before anything runs, not at each step
    known = None if known_hosts is None else os.fspath(known_hosts)

    def connect(host: Host, user: User) -> Transport:
        if kind(host.transport).is_local:
            return LocalTransport(host)
        t = MuxTransport(host, user, client, known_hosts=known, timeouts=timeouts)
        t.open()
        return t

    return connect


def transport_pool(
    *, known_hosts: str | os.PathLike[str] | None, timeouts: Timeouts, persist: float
) -> TransportPool:
    """A run's TransportPool: through the daemon when ``persist`` > 0, else direct."""
    if persist <= 0:
        return TransportPool(known_hosts=known_hosts, timeouts=timeouts)
    return TransportPool(
        known_hosts=known_hosts,
        timeouts=timeouts,
        connector=connector(persist, known_hosts=known_hosts, timeouts=timeouts),
    )


def with_option(manifest: Manifest, args: argparse.Namespace) -> Manifest:
    """``manifest`` with ``--persist`` applied, when given."""
    value = getattr(args, "persist", None)
    return manifest if value is None else dataclasses.replace(manifest, persist=value)
