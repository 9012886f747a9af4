"""Connection persistence (``persist``): SSH connections kept open between runs.

What OpenSSH's ControlMaster/ControlPersist does for Ansible: with ``persist: SECONDS``
(manifest ``defaults.persist`` or ``--persist``) rex's SSH work goes through one daemon per
local user, ``python -m rexplan.transport.persist serve``, which holds the connections
(opened, pinned and authenticated exactly as without it: rexplan.transport.ssh) and closes
them, and itself, after SECONDS without a request. A later run to the same hosts then skips
the TCP connect, key exchange and authentication (for an unchanged re-apply, most of its cost).

The daemon runs isolated (``python -I``, cwd ``/``): ``-m`` would put the current directory
first on ``sys.path``, and a ``./rexplan/__init__.py`` planted where someone runs ``rex apply
--persist`` would run as that user, in the process holding the SSH connections. It imports
from the launcher's ``sys.path`` instead (passed in its argv: its absolute entries other
than the current directory), with the directory rexplan itself was imported from.

The daemon listens on ``$REX_MUX_DIR/mux.sock`` (default ``~/.rex/mux``): a directory of
mode 0700 that the user owns (else rex refuses to use it), a socket of mode 0600, and every
peer checked by SO_PEERCRED to be this user. Each request is one connection: a frame (u32
length, JSON) with the host, the login, the known_hosts file and one Transport call; one
frame back with its value or error. Bytes travel as base64. A client that goes away (a
launcher killed) cancels its call: a held launch line is never sent.

A cached connection is reused only while the host's current known_hosts still pins the key
it was opened with; a dead one is dropped and reopened once, before anything is run on it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import rexplan
from rexplan import errors
from rexplan.core.model import Host, Manifest, Timeouts, User
from rexplan.core.text import printable
from rexplan.engine.callback import ensure_fd_budget
from rexplan.errors import RexError, TransportError
from rexplan.transport.base import GET_LIMIT, Gate, Result, Transport, kind
from rexplan.transport.local import LocalTransport
from rexplan.transport.pool import Connector, TransportPool
from rexplan.transport.ssh import SSHTransport
from rexplan.transport.streams import wait_readable

MUX_ENV = "REX_MUX_DIR"
SOCKET = "mux.sock"
PID_FILE = "mux.pid"
LOG_FILE = "mux.log"
#: a frame's largest body: file contents travel base64-encoded
MAX_FRAME = 64 << 20
#: descriptors the daemon makes room for at start (RLIMIT_NOFILE, toward the hard limit)
DAEMON_FDS = 16384
#: seconds a client has to send its whole request
REQUEST_TIMEOUT = 10.0
#: seconds a new daemon may take to listen
SPAWN_TIMEOUT = 10.0
#: longest persistence accepted (a day), as for ControlPersist a time, not forever
MAX_PERSIST = 86400.0
#: bytes of the daemon's log quoted when it would not start
LOG_TAIL = 2000
#: ``python -I -c BOOT SYS_PATH_JSON serve ...``: the daemon's sys.path is exactly the one
#: given (-I has put neither the current directory nor PYTHONPATH on it), then its main
BOOT = (
    "import json,sys\n"
    "sys.path[:]=json.loads(sys.argv.pop(1))\n"
    "from rexplan.transport.persist import main\n"
    "sys.exit(main())\n"
)
#: the Transport calls a client may make, and nothing else
METHODS = ("open", "run", "put", "get", "stat", "remove", "listdir", "rex_home")
_ERRORS: dict[str, type[TransportError]] = {
    cls.__name__: cls
    for cls in (
        TransportError,
        errors.UnreachableError,
        errors.HostTimeoutError,
        errors.AuthenticationError,
        errors.HostKeyError,
    )
}


class MuxError(RexError):
    """The persistence daemon cannot be used (unsafe directory, would not start)."""

    exit_code = 3


def mux_dir() -> str:
    """$REX_MUX_DIR, else ~/.rex/mux."""
    return os.environ.get(MUX_ENV) or os.path.join(os.path.expanduser("~"), ".rex", "mux")


def _safe_dir(path: str) -> str:
    """Create ``path`` (0700) if missing; refuse one another user owns or others can enter."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise MuxError(
            f"{path} must be a directory of mode 0700 that you own",
            hint=f"chmod 700 {path} (or set {MUX_ENV} elsewhere)",
        )
    return path


# --- frames -------------------------------------------------------------------------------------


def _send(sock: socket.socket, obj: Mapping[str, Any]) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    obj = json.loads(_recv_exact(sock, size))
    if not isinstance(obj, dict):
        raise ValueError("frame is not an object")
    return obj


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


def _error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, TransportError):
        message = str(exc).removeprefix(f"{exc.host}: {exc.phase}: ").removeprefix(f"{exc.host}: ")
        name = type(exc).__name__ if type(exc).__name__ in _ERRORS else "TransportError"
        return {
            "type": name,
            "message": message,
            "host": exc.host,
            "phase": exc.phase,
            "hint": exc.hint,
        }
    if isinstance(exc, FileNotFoundError):
        return {"type": "FileNotFoundError", "message": str(exc.filename or exc)}
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:  # get() past its limit
        return {"type": "EFBIG", "message": str(exc.strerror), "path": str(exc.filename)}
    return {"type": "TransportError", "message": f"{type(exc).__name__}: {exc}"}


def _error_from_wire(err: Mapping[str, Any], host: str) -> Exception:
    if err.get("type") == "FileNotFoundError":
        return FileNotFoundError(errno.ENOENT, "No such file", str(err.get("message", "")))
    if err.get("type") == "EFBIG":
        return OSError(errno.EFBIG, str(err.get("message", "")), str(err.get("path", "")))
    cls = _ERRORS.get(str(err.get("type")), TransportError)
    hint = err.get("hint")
    return cls(
        str(err.get("message", "")),
        host=str(err.get("host") or host),
        phase=str(err.get("phase") or "exec"),
        hint=hint if isinstance(hint, str) else None,
    )


# --- the daemon ---------------------------------------------------------------------------------


def _from_dict(cls: type[Any], data: Mapping[str, Any]) -> Any:
    """A frozen model record from its asdict(), tuples restored."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[f.name] = value
    return cls(**kwargs)


class _Cache:
    """The daemon's open connections, one per (address, port, login, identity, known_hosts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[tuple[object, ...], tuple[threading.Lock, list[SSHTransport]]] = {}
        #: connections opened since the daemon started
        self.opened = 0

    def get(
        self, host: Host, user: User, known_hosts: str | None, timeouts: Timeouts
    ) -> SSHTransport:
        key = (host.address, host.port, user.login, user.identity, user.ssh_options, known_hosts)
        with self._lock:
            lock, held = self._slots.setdefault(key, (threading.Lock(), []))
        with lock:
            if held:
                t = held[0]
                if t.usable(known_hosts):
                    return t
                held.clear()
                with contextlib.suppress(Exception):
                    t.close()
            t = SSHTransport.open(host, user, known_hosts=known_hosts, timeouts=timeouts)
            held.append(t)
            with self._lock:
                self.opened += 1
            return t

    def kept(self) -> int:
        with self._lock:
            return sum(len(held) for _, held in self._slots.values())

    def drop(self, t: SSHTransport) -> None:
        with self._lock:
            slots = list(self._slots.values())
        for lock, held in slots:
            with lock:
                if t in held:
                    held.remove(t)
        with contextlib.suppress(Exception):
            t.close()

    def close_all(self) -> int:
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        closed = 0
        for lock, held in slots:
            with lock:
                for t in held:
                    closed += 1
                    with contextlib.suppress(Exception):
                        t.close()
        return closed


class Daemon:
    """Serve Transport calls on ``path`` until ``persist`` seconds pass without one."""

    def __init__(self, directory: str, persist: float) -> None:
        self.directory = directory
        self.path = os.path.join(directory, SOCKET)
        self.persist = persist
        self.cache = _Cache()
        self._lock = threading.Lock()
        self._active = 0
        self._last = time.monotonic()
        self._closing = threading.Event()
        self._server: socket.socket | None = None

    def bind(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(self.path)
        finally:
            os.umask(old)
        server.listen(256)
        self._server = server

    def serve(self) -> None:
        assert self._server is not None
        threading.Thread(target=self._idle_watch, daemon=True).start()
        while not self._closing.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                break  # closed by _idle_watch or stop
            with self._lock:
                if self._closing.is_set():
                    with contextlib.suppress(OSError):
                        _send(conn, {"ok": False, "retry": True})
                    conn.close()
                    break
                self._active += 1
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        self._wait_idle()
        self.cache.close_all()

    def _idle_watch(self) -> None:
        while not self._closing.wait(min(1.0, self.persist / 4 or 1.0)):
            with self._lock:
                if self._active == 0 and time.monotonic() - self._last >= self.persist:
                    self._shut()

    def _shut(self) -> None:
        """Stop accepting (under self._lock): the socket goes first, so a client connecting
        now spawns a new daemon rather than talking to this one."""
        self._closing.set()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()

    def _wait_idle(self) -> None:
        while True:
            with self._lock:
                if self._active == 0:
                    return
            time.sleep(0.05)

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                _, uid, _ = struct.unpack("3i", creds)
                if uid != os.getuid():
                    return  # another user: not a word
                conn.settimeout(REQUEST_TIMEOUT)
                request = _recv(conn)
                conn.settimeout(None)
                _send(conn, self._handle(request, conn))
        except (OSError, EOFError, ValueError, struct.error):
            pass  # a client gone or talking nonsense: nothing to answer
        finally:
            with self._lock:
                self._active -= 1
                self._last = time.monotonic()

    def _handle(self, request: Mapping[str, Any], conn: socket.socket) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            kept, opened = self.cache.kept(), self.cache.opened
            return {"ok": True, "pid": os.getpid(), "kept": kept, "opened": opened}
        if op == "stop":
            with self._lock:
                self._shut()
            return {"ok": True, "pid": os.getpid()}
        if op != "call" or request.get("method") not in METHODS:
            return {"ok": False, "error": {"type": "TransportError", "message": "bad request"}}
        host = _from_dict(Host, request["host"])
        user = _from_dict(User, request["user"])
        known = request.get("known_hosts")
        timeouts = _from_dict(Timeouts, request.get("timeouts") or {})
        method = str(request["method"])
        args = request.get("args") or {}
        t: SSHTransport | None = None
        try:
            t = self.cache.get(host, user, known if isinstance(known, str) else None, timeouts)
            return {"ok": True, "value": self._call(t, method, args, conn)}
        except Exception as exc:  # every failure goes back to the client, mapped
            lost = isinstance(exc, TransportError) and "connection lost" in str(exc)
            if t is not None and lost:
                self.cache.drop(t)
            reply: dict[str, Any] = {"ok": False, "error": _error_to_wire(exc)}
            if t is not None and t.leftovers:
                reply["leftovers"], t.leftovers[:] = list(t.leftovers), []
            return reply

    @staticmethod
    def _call(t: SSHTransport, method: str, args: Mapping[str, Any], conn: socket.socket) -> Any:
        if method == "open":
            return None  # connected (or a kept connection still good): errors come as here
        if method == "run":
            gate = args.get("gate")
            with _client_watch(conn) as gone:
                result = t.run(
                    [str(a) for a in args["argv"]],
                    stdin=None if args.get("stdin") is None else _unb64(args["stdin"]),
                    timeout=args.get("timeout"),
                    env=args.get("env"),
                    gate=None if gate is None else Gate(_unb64(gate[0]), float(gate[1])),
                    abort=gone,
                )
            return {
                "exit_status": result.exit_status,
                "stdout": _b64(result.stdout),
                "stderr": _b64(result.stderr),
                "cut": [result.stdout_cut, result.stderr_cut],
            }
        if method == "put":
            t.put(_unb64(args["data"]), str(args["path"]), int(args.get("mode", 0o600)))
            return None
        if method == "get":
            return _b64(t.get(str(args["path"]), int(args.get("limit", GET_LIMIT))))
        if method == "stat":
            return t.stat(str(args["path"]))
        if method == "remove":
            return t.remove(str(args["path"]))
        if method == "listdir":
            return t.listdir(str(args["path"]))
        return t.rex_home()


@contextlib.contextmanager
def _client_watch(conn: socket.socket) -> Iterator[threading.Event]:
    """An event set once the client hangs up (it sends nothing after its request)."""
    gone = threading.Event()
    wake_r, wake_w = os.pipe()

    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            if conn.fileno() in wait_readable([conn.fileno(), wake_r], None):
                gone.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield gone
    finally:
        os.write(wake_w, b"x")
        watcher.join()
        os.close(wake_r)
        os.close(wake_w)


def serve(directory: str, persist: float, ready_fd: int | None = None) -> int:
    """The daemon's main: listen, tell ``ready_fd``, serve until idle for ``persist`` s."""
    daemon = Daemon(_safe_dir(directory), persist)
    # it may hold many runs' connections: about four descriptors each (socket, channel
    # pipes, the client's); a limit it cannot raise is noted in its log
    notice = ensure_fd_budget(DAEMON_FDS)
    if notice is not None:
        print(f"rex mux: {notice}", file=sys.stderr, flush=True)
    try:
        daemon.bind()
    except OSError as exc:
        if ready_fd is not None:
            os.write(ready_fd, f"error {exc}\n".encode())
        return 1
    # detach: the process that spawned us reaps our parent at once, init adopts us
    if os.fork() != 0:
        os._exit(0)
    pid_path = os.path.join(directory, PID_FILE)
    with open(os.open(pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f"{os.getpid()}\n")
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    try:
        daemon.serve()
    finally:
        with contextlib.suppress(OSError):
            if _read_pid(directory) == os.getpid():
                os.unlink(pid_path)
    return 0


def _read_pid(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, PID_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# --- the client ---------------------------------------------------------------------------------


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
        _safe_dir(self.directory)
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
                    _send(sock, obj)
                    reply = _recv(sock)
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

    def ping(self) -> dict[str, Any] | None:
        """The running daemon's pid and connection counts (kept now, opened in all); None
        when none runs. Starts nothing."""
        try:
            sock = self._dial()
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        with sock:
            sock.settimeout(10)
            _send(sock, {"op": "ping"})
            return _recv(sock)

    def stop(self) -> int | None:
        """Stop the daemon; its pid, or None when none was running."""
        try:
            sock = self._dial()
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        with sock:
            sock.settimeout(10)
            _send(sock, {"op": "stop"})
            reply = _recv(sock)
        pid = reply.get("pid")
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
        self._lock = threading.Lock()

    def _call(self, method: str, within: float | None, **args: Any) -> Any:
        request = {
            "op": "call",
            "host": dataclasses.asdict(self.host),
            "user": dataclasses.asdict(self.user),
            "known_hosts": self.known_hosts,
            "timeouts": dataclasses.asdict(self.timeouts),
            "method": method,
            "args": args,
        }
        # the daemon may have to connect first: its connect deadline comes on top
        wait = None if within is None else within + self.timeouts.connect + 5.0
        reply = self.client.request(request, wait)
        self.leftovers.extend(str(p) for p in reply.get("leftovers") or [])
        if not reply.get("ok"):
            raise _error_from_wire(reply.get("error") or {}, self.host.name)
        return reply.get("value")

    def open(self) -> None:
        """Have the daemon connect (or check its kept connection): a host's connect errors
        surface here, at TransportPool.get, as without persistence."""
        self._call("open", 0.0)

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        gate: Gate | None = None,
    ) -> Result:
        value = self._call(
            "run",
            timeout,
            argv=list(argv),
            stdin=_b64(stdin),
            timeout=timeout,
            env=dict(env) if env is not None else None,
            gate=None if gate is None else [_b64(gate.marker), gate.within],
        )
        cut = value.get("cut") or [0, 0]
        return Result(
            int(value["exit_status"]),
            _unb64(value["stdout"]),
            _unb64(value["stderr"]),
            int(cut[0]),
            int(cut[1]),
        )

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        self._call("put", None, data=_b64(data), path=path, mode=mode)

    def get(self, path: str, limit: int = GET_LIMIT) -> bytes:
        return _unb64(self._call("get", None, path=path, limit=limit))

    def stat(self, path: str) -> tuple[int, int] | None:
        value = self._call("stat", None, path=path)
        return None if value is None else (int(value[0]), int(value[1]))

    def remove(self, path: str) -> bool:
        return bool(self._call("remove", None, path=path))

    def listdir(self, path: str) -> list[str]:
        return [str(name) for name in self._call("listdir", None, path=path)]

    def rex_home(self) -> str:
        return str(self._call("rex_home", self.timeouts.start))

    def direct(self) -> SSHTransport:
        """A connection of this process's own, for what needs one (tree relays' streams)."""
        with self._lock:
            if self._direct is None:
                self._direct = SSHTransport.open(
                    self.host, self.user, known_hosts=self.known_hosts, timeouts=self.timeouts
                )
            return self._direct

    def close(self) -> None:
        """The daemon keeps the connection; only a direct one of this process closes."""
        with self._lock:
            direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()


def connector(
    persist: float, *, known_hosts: str | os.PathLike[str] | None, timeouts: Timeouts
) -> Connector:
    """A TransportPool connector sending SSH hosts' calls through the daemon (local hosts
    are run here, as always)."""
    client = MuxClient(persist)
    _safe_dir(client.directory)  # refused before anything runs, not at each step
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= MAX_PERSIST:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_PERSIST:g}")
    return value


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--persist SECONDS`` of the commands that connect to the manifest's hosts."""
    parser.add_argument(
        "--persist",
        type=_seconds,
        metavar="SECONDS",
        help="keep the SSH connections open for SECONDS after their last use, in a daemon "
        "of yours, so the next run skips connecting (default: the manifest's "
        "defaults.persist, 0 = off); 'rex disconnect' closes them",
    )


def with_option(manifest: Manifest, args: argparse.Namespace) -> Manifest:
    """``manifest`` with ``--persist`` applied, when given."""
    value = getattr(args, "persist", None)
    return manifest if value is None else dataclasses.replace(manifest, persist=value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rexplan.transport.persist")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the daemon (rex starts it)")
    run.add_argument("directory")
    run.add_argument("--persist", type=float, required=True)
    run.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    return serve(args.directory, args.persist, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
