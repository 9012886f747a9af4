"""The persistence daemon: serves Transport calls on SSH connections it keeps between runs.

A cached connection is reused only while the host's current known_hosts still pins the key it
was opened with; a dead one is dropped and reopened once, before anything is run on it. Every
peer is checked by SO_PEERCRED to be this user; a client that goes away (a launcher killed)
cancels its call: a held launch line is never sent. A ``stream`` request (``rex logs -f``)
starts a command on a kept connection and relays its output as it comes; the client hanging up
closes the command's channel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rexplan.core.model import Host, Timeouts, User
from rexplan.errors import TransportError
from rexplan.transport.base import GET_LIMIT, Gate
from rexplan.transport.fds import ensure_fd_budget
from rexplan.transport.persist_wire import (
    FORWARDED,
    METHODS,
    PID_FILE,
    SOCKET,
    b64,
    error_to_wire,
    recv,
    safe_dir,
    send,
    unb64,
)
from rexplan.transport.ssh import SSHTransport, open_stream
from rexplan.transport.streams import wait_readable

#: descriptors the daemon makes room for at start (RLIMIT_NOFILE, toward the hard limit)
DAEMON_FDS = 16384
#: seconds a client has to send its whole request
REQUEST_TIMEOUT = 10.0
#: the most bytes of a streamed command's output relayed as one piece
STREAM_LINE = 1 << 16


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
        # everything rexplan.transport.route reads: the same fields reach the same sshd
        key = (
            host.name if not (host.address_set and host.port_set) else "",
            host.address,
            host.port,
            host.address_set,
            host.port_set,
            host.jump,
            host.ssh_config,
            user.login,
            user.login_set,
            user.identity,
            user.ssh_options,
            known_hosts,
        )
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
                        send(conn, {"ok": False, "retry": True})
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
                request = recv(conn)
                conn.settimeout(None)
                if request.get("op") == "forward":
                    self._forward(request, conn)
                elif request.get("op") == "stream":
                    self._stream(request, conn)
                else:
                    send(conn, self._handle(request, conn))
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
        method = str(request["method"])
        args = request.get("args") or {}
        t: SSHTransport | None = None
        try:
            t = self._transport(request)
            return {"ok": True, "value": self._call(t, method, args, conn)}
        except Exception as exc:  # every failure goes back to the client, mapped
            lost = isinstance(exc, TransportError) and "connection lost" in str(exc)
            if t is not None and lost:
                self.cache.drop(t)
            reply: dict[str, Any] = {"ok": False, "error": error_to_wire(exc)}
            if t is not None and t.leftovers:
                reply["leftovers"], t.leftovers[:] = list(t.leftovers), []
            return reply

    def _transport(self, request: Mapping[str, Any]) -> SSHTransport:
        """The kept connection a request names (opened now when there is none)."""
        host = _from_dict(Host, request["host"])
        user = _from_dict(User, request["user"])
        known = request.get("known_hosts")
        timeouts = _from_dict(Timeouts, request.get("timeouts") or {})
        return self.cache.get(host, user, known if isinstance(known, str) else None, timeouts)

    def _forward(self, request: Mapping[str, Any], conn: socket.socket) -> None:
        """``callback: {via: ssh}`` through the daemon: a remote forward on the kept
        connection, its port the reply; then each forwarded connection goes to the client
        as a descriptor (SCM_RIGHTS, one byte each), until the client hangs up (its run
        ended, or it was killed): then the forward is cancelled, and agents cannot call."""
        lock = threading.Lock()

        def sink(sock: socket.socket, _peer: tuple[str, int]) -> None:
            with lock, sock:
                socket.send_fds(conn, [FORWARDED], [sock.fileno()])

        try:
            t = self._transport(request)
            with lock:
                port = t.open_forward(sink)
                send(conn, {"ok": True, "value": port})
        except Exception as exc:  # every failure goes back to the client, mapped
            send(conn, {"ok": False, "error": error_to_wire(exc)})
            return
        try:
            while conn.recv(64):
                pass  # the client sends nothing more: it holds the forward open
        except OSError:
            pass
        finally:
            t.close_forward(port)

    def _stream(self, request: Mapping[str, Any], conn: socket.socket) -> None:
        """``op: stream``: start a command on a kept connection, answer, then copy its output
        (stderr merged) to the client as it comes, until it ends or the client hangs up,
        which closes its channel (rex logs -f: the follower there ends with it)."""
        args = request.get("args") or {}
        try:
            t = self._transport(request)
            stream = open_stream(
                t, [str(a) for a in args["argv"]], timeout=float(args.get("timeout") or 10.0)
            )
        except Exception as exc:  # every failure goes back to the client, mapped
            send(conn, {"ok": False, "error": error_to_wire(exc)})
            return
        with _client_watch(conn) as gone:

            def close_on_hangup() -> None:
                gone.wait()
                stream.close()

            closer = threading.Thread(target=close_on_hangup, daemon=True)
            closer.start()
            try:
                if args.get("stdin") is not None:
                    stream.send(unb64(args["stdin"]))
                send(conn, {"ok": True, "value": None})
                while not gone.is_set():
                    line = stream.readline(STREAM_LINE)
                    if not line:
                        break
                    conn.sendall(line)
            except (OSError, TransportError):
                pass  # the client or the channel is gone
            finally:
                gone.set()
                closer.join()

    @staticmethod
    def _call(t: SSHTransport, method: str, args: Mapping[str, Any], conn: socket.socket) -> Any:
        if method == "open":
            return None  # connected (or a kept connection still good): errors come as here
        if method == "run":
            gate = args.get("gate")
            with _client_watch(conn) as gone:
                result = t.run(
                    [str(a) for a in args["argv"]],
                    stdin=None if args.get("stdin") is None else unb64(args["stdin"]),
                    timeout=args.get("timeout"),
                    env=args.get("env"),
                    gate=None if gate is None else _gate(gate),
                    abort=gone,
                )
            return {
                "exit_status": result.exit_status,
                "stdout": b64(result.stdout),
                "stderr": b64(result.stderr),
                "cut": [result.stdout_cut, result.stderr_cut],
            }
        if method == "put":
            t.put(unb64(args["data"]), str(args["path"]), int(args.get("mode", 0o600)))
            return None
        if method == "get":
            return b64(t.get(str(args["path"]), int(args.get("limit", GET_LIMIT))))
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
    daemon = Daemon(safe_dir(directory), persist)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rexplan.transport.persistd")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the daemon (rex starts it)")
    run.add_argument("directory")
    run.add_argument("--persist", type=float, required=True)
    run.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    return serve(args.directory, args.persist, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())


def _gate(value: Sequence[Any]) -> Gate:
    """A Gate from its request form: [marker, within] or [marker, within, wanted, supply]."""
    wanted, supply = (unb64(value[2]), unb64(value[3])) if len(value) == 4 else (b"", b"")
    return Gate(unb64(value[0]), float(value[1]), wanted, supply)
