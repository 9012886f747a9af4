"""What the persistence daemon and its clients share: its directory, frames and errors.

The daemon listens on ``$REX_MUX_DIR/mux.sock`` (default ``~/.rex/mux``): a directory of mode
0700 that the user owns (else rex refuses to use it), a socket of mode 0600. Each request is
one connection: a frame (u32 length, JSON) with the host, the login, the known_hosts file and
one Transport call; one frame back with its value or error. Bytes travel as base64.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Mapping
from typing import Any

from rexplan import errors
from rexplan.errors import RexError, TransportError
from rexplan.wire.frames import FrameReader, encode_frame

MUX_ENV = "REX_MUX_DIR"
SOCKET = "mux.sock"
PID_FILE = "mux.pid"
#: a frame's largest body: file contents travel base64-encoded
MAX_FRAME = 64 << 20
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


def safe_dir(path: str) -> str:
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


#: the byte each forwarded connection's descriptor travels with, daemon to client
FORWARDED = b"F"


def send(sock: socket.socket, obj: Mapping[str, Any]) -> None:
    sock.sendall(encode_frame(obj, MAX_FRAME))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> dict[str, Any]:
    reader = FrameReader(MAX_FRAME)
    while True:
        for obj in reader.feed(_recv_exact(sock, reader.wanted())):
            return obj


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


def error_to_wire(exc: BaseException) -> dict[str, Any]:
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


def error_from_wire(err: Mapping[str, Any], host: str) -> Exception:
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
