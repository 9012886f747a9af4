"""SSHTransport: commands over paramiko channels and files over SFTP on one kept connection."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import fabric
import paramiko

from rexplan.core.model import Host, Timeouts, User
from rexplan.errors import HostTimeoutError, TransportError
from rexplan.transport.base import (
    DEFAULT_KNOWN_HOSTS,
    GET_LIMIT,
    ConnectOptions,
    Gate,
    Result,
    RunOptions,
    Sink,
    Transport,
    at_most,
    combine_home,
    command_line,
    not_started,
    temp_name,
    unpack,
)
from rexplan.transport.dialing import timed_out
from rexplan.transport.forward import Forwards
from rexplan.transport.handshake import handshake
from rexplan.transport.pacing import dropped_by_server, gave_up, retry_dropped
from rexplan.transport.pinning import KNOWN_HOSTS, StrictPolicy, host_key_name
from rexplan.transport.streams import CHUNK, Announcement, Stream, Tail, wait_readable

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: how often run() retries a send when the remote window is full (select only signals reads)
_SEND_POLL = 0.005
#: longest wait for output before both channel buffers are checked again
_RECV_POLL = 0.05
_REX_HOME_SCRIPT = 'printf "%s\\000%s" "$HOME" "${REX_HOME-}"'


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
        self.forwards = Forwards(host.name)
        self._callback_port: int | None = None
        self._forward_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        host: Host,
        user: User,
        **opts: Unpack[ConnectOptions],
    ) -> SSHTransport:
        """Connect, check the host key against ``known_hosts`` and authenticate, or raise.

        At most ``host.max_startups`` handshakes to the host's sshd are in flight at once
        (HANDSHAKE_GATES), and a connection the sshd drops before the key exchange completes is
        retried with jittered backoff while ``timeouts.connect`` allows (retry_dropped).
        """
        timeouts = opts.get("timeouts") or Timeouts()
        banner, auth = opts.get("banner_timeout"), opts.get("auth_timeout")
        banner = timeouts.connect if banner is None else banner
        auth = timeouts.connect if auth is None else auth
        known = os.path.expanduser(os.fspath(opts.get("known_hosts") or DEFAULT_KNOWN_HOSTS))
        deadline = time.monotonic() + timeouts.connect
        attempts = 0

        def attempt() -> tuple[fabric.Connection, StrictPolicy]:
            nonlocal attempts
            attempts += 1
            return handshake(host, user, known, timeouts, banner, auth, deadline)

        try:
            conn, policy = retry_dropped(attempt, deadline=deadline)
        except TransportError as e:
            if attempts > 1 and dropped_by_server(e):
                raise gave_up(e, host, attempts) from e
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
        abort: threading.Event | None = None,
        **opts: Unpack[RunOptions],
    ) -> Result:
        """Run ``argv``, shlex-quoted, via the login shell; HostTimeoutError past ``timeout``,
        or (phase ``start``) past ``gate.within`` without the gate's marker. ``abort`` set
        (the caller went away) closes the channel, held stdin unsent: TransportError."""
        stdin, timeout, env, gate = unpack(opts)
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
        pinned = KNOWN_HOSTS.get(known)
        if pinned is None:
            return False
        name = host_key_name(str(self.connection.host), int(self.connection.port))
        return bool(pinned.check(name, transport.get_remote_server_key()))

    def _exec_error(
        self, exc: BaseException, deadline: float | None, timeout: float | None
    ) -> TransportError:
        if deadline is not None and (time.monotonic() >= deadline or timed_out(exc)):
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
        out, err = Tail(), Tail()
        pending = memoryview(stdin) if stdin else None
        if pending is None:
            chan.shutdown_write()
        # stdin waits for the gate's marker until ``gate_end``, if there is something to send
        held = gate if pending is not None else None
        announced = Announcement(held.marker, held.wanted) if held is not None else None
        supplied = False  # the agent went in front of stdin: a connection lost is its upload's
        while True:
            while pending is not None and held is None and chan.send_ready():
                try:
                    sent = chan.send(pending[:CHUNK].tobytes())
                except (OSError, EOFError):  # EOFError: paramiko's, the connection went
                    # the command finished without reading all of stdin, as with EPIPE
                    pending = None
                    break
                pending = pending[sent:] if sent < len(pending) else None
                if pending is None:
                    chan.shutdown_write()
            # checked before draining: all data fed before EOF or close is then in the buffers
            done = chan.eof_received or chan.closed
            while chan.recv_ready():
                data = chan.recv(CHUNK)
                out.add(data)
                if announced is not None:
                    announced.feed(data)
            while chan.recv_stderr_ready():
                err.add(chan.recv_stderr(CHUNK))
            if held is not None and announced is not None and announced.seen:
                if announced.wanted and pending is not None:
                    pending = memoryview(held.supply + pending.tobytes())
                    supplied = True
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
                    raise not_started(held, self.host.name)
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
            error = self._exec_error(EOFError("connection closed"), deadline, timeout)
            if supplied:
                error.phase = "agent_upload"
            raise error
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
            tmp = temp_name(path)
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
            return at_most(f.read(limit + 1), limit, path)

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
            self._rex_home = combine_home(home, value)
            return self._rex_home

    def open_forward(self, sink: Sink) -> int:
        """A new remote forward from the host's 127.0.0.1 to ``sink``: the port sshd chose
        (rexplan.transport.forward); TransportError when sshd refuses it."""
        transport = self._transport()
        try:
            return self.forwards.open(transport, sink)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransportError(
                f"sshd refused a remote port forward for the callback ({exc}): callback via "
                "ssh needs 'AllowTcpForwarding yes' (or 'remote') in its sshd_config",
                host=self.host.name,
                phase="start",
            ) from None

    def close_forward(self, port: int) -> None:
        """Cancel the forward at ``port`` (open_forward's)."""
        self.forwards.close(self._client.get_transport(), port)

    def callback_port(self, sink: Sink) -> int:
        """The port on the host's loopback its agents dial to call back through this
        connection (``callback: {via: ssh}``), forwarded to ``sink``; one forward per
        connection, opened on first use."""
        with self._forward_lock:
            if self._callback_port is None:
                self._callback_port = self.open_forward(sink)
            return self._callback_port

    def close(self) -> None:
        """Close the SFTP session and the connection; idempotent."""
        self.forwards.forget()
        with self._lock:
            if self._sftp is not None:
                with contextlib.suppress(Exception):
                    self._sftp.close()
                self._sftp = None
        self.connection.close()
        # fabric closes only a connection it still sees as up; a dead one keeps its client
        self._client.close()
        with self._lock:
            link, self.connection.bastion = self.connection.bastion, None
        if link is not None:
            link.release()


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
