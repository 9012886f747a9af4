"""A job's frames after ``ok``: heartbeats, output and exit status, under the session's MACs."""

from __future__ import annotations

import binascii

from rexplan.wire.crypto import compare_digest, mac_of
from rexplan.wire.frames import U32
from rexplan.wire.record import Frozen

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

#: seconds between the listener's heartbeats to a job, and the silence after which the agent
#: takes the launcher for gone and kills the job
JOB_HEARTBEAT = 1.0
JOB_SILENCE = 5.0
#: raw output bytes per ``out`` frame, and in all (the tail of the job's output)
OUT_CHUNK = 2048
OUT_TAIL = 16384
#: raw bytes of a program's output a failure report carries (the front's JSON line): the end
#: of what the program wrote before it failed, opened by cut_line when more came before
FAIL_TAIL = 4096
#: a program's log: the size at which the agent rotates it and the rotated files it keeps
#: (NAME.log.1 ... NAME.log.KEEP), unless the launch message says otherwise
LOG_MAX_SIZE = 10 << 20
LOG_KEEP = 3
#: the bounds a launch message's ``logs`` is held to
LOG_MAX_SIZE_RANGE = (4096, 1 << 40)
LOG_KEEP_MAX = 100


def cut_line(count: int) -> bytes:
    """The line that stands for ``count`` bytes of output cut before a tail."""
    return b"[... %d bytes cut]\n" % count


class Session(Frozen):
    """What both sides of a verified handshake share: the MAC keys and the session binding."""

    _hidden = ("k_l", "k_a", "binding")
    k_l: bytes
    k_a: bytes
    binding: bytes  # T || ns || nl || ap

    @classmethod
    def of(cls, keys: tuple[bytes, bytes], t: bytes, ns: bytes, nl: bytes, ap: bytes) -> Session:
        """From (K_L, K_A) and the handshake's transcript, nonces and agent proof."""
        return cls(keys[0], keys[1], t + ns + nl + ap)

    def mac(self, key: bytes, kind: str, seq: int, payload: bytes) -> str:
        return mac_of(key, b"job", self.binding, kind.encode("ascii"), U32.pack(seq), payload).hex()

    def verify(self, key: bytes, msg: Mapping[str, Any], payload: bytes) -> bool:
        expected = self.mac(key, msg["t"], msg["seq"], payload)
        return compare_digest(expected, msg["mac"])


def make_hb(session: Session, seq: int) -> dict[str, Any]:
    return {"t": "hb", "seq": seq, "mac": session.mac(session.k_l, "hb", seq, b"")}


def make_out(session: Session, seq: int, data: bytes) -> dict[str, Any]:
    text = binascii.b2a_base64(data, newline=False).decode("ascii")
    return {"t": "out", "seq": seq, "data": text, "mac": session.mac(session.k_a, "out", seq, data)}


def make_exit(session: Session, seq: int, status: int) -> dict[str, Any]:
    payload = str(status).encode("ascii")
    return {
        "t": "exit",
        "seq": seq,
        "status": status,
        "mac": session.mac(session.k_a, "exit", seq, payload),
    }


def job_payload(msg: Mapping[str, Any]) -> bytes:
    """The bytes a checked hb/out/exit message's MAC covers."""
    if msg["t"] == "out":
        return binascii.a2b_base64(msg["data"])
    if msg["t"] == "exit":
        return str(msg["status"]).encode("ascii")
    return b""
