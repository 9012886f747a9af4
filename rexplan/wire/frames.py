"""Length-prefixed frames: a u32 big-endian length, then that many bytes of one JSON object."""

from __future__ import annotations

import struct

from rexplan.wire.codes import MALFORMED, OVERSIZE, FrameError
from rexplan.wire.jsonstrict import encode_object, parse_object

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

#: a rex-cb/1 frame's largest payload
MAX_FRAME = 4096
#: a frame's length header (and rex-cb/1's other u32 fields)
U32 = struct.Struct(">I")


def encode_frame(msg: Mapping[str, Any], limit: int = MAX_FRAME) -> bytes:
    """Length-prefixed frame of one message; raises FrameError(OVERSIZE) past ``limit``."""
    payload = encode_object(msg)
    if len(payload) > limit:
        raise FrameError(OVERSIZE, f"{len(payload)} bytes")
    return U32.pack(len(payload)) + payload


def decode_frame(frame: bytes) -> dict[str, Any]:
    """The JSON object of one complete frame (header included); raises FrameError."""
    reader = FrameReader()
    msgs = reader.feed(frame)
    if len(msgs) != 1 or not reader.idle:
        raise FrameError(MALFORMED, "not exactly one complete frame")
    return msgs[0]


class FrameReader:
    """Incremental frame decoder: feed it received bytes, get complete JSON objects back.

    It checks a frame's length header before taking any of its payload, so it never buffers
    more than one frame of at most MAX_FRAME bytes. ``wanted()`` is how many bytes finish the
    current header or payload: reading exactly that much keeps later frames in the kernel.
    """

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._need: int | None = None  # payload length once the header is complete

    @property
    def idle(self) -> bool:
        """True between frames (nothing of a next frame buffered)."""
        return self._need is None and not self._buf

    def wanted(self) -> int:
        if self._need is None:
            return U32.size - len(self._buf)
        return self._need - len(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            chunk = view[pos : pos + self.wanted()]
            pos += len(chunk)
            self._buf += chunk
            if self.wanted():
                continue
            if self._need is None:
                (length,) = U32.unpack(bytes(self._buf))
                self._buf.clear()
                if length == 0:
                    raise FrameError(MALFORMED, "empty frame")
                if length > self._limit:
                    raise FrameError(OVERSIZE, f"{length} bytes announced")
                self._need = length
            else:
                payload = bytes(self._buf)
                self._buf.clear()
                self._need = None
                out.append(parse_object(payload))
        return out
