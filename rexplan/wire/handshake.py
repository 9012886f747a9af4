"""The rex-cb/1 handshake (hello, chal, resp or decl or same, ok or no): its messages and MACs.

The protocol, step by step, is in man/rex.7 (THE rex-cb/1 HANDSHAKE). T = transcript(hello) is a
fixed binary encoding of the hello's fields (version first), so no MAC depends on how JSON was
written; nonces and MACs travel as lowercase hex.
"""

from __future__ import annotations

import os
import struct

from rexplan.wire.crypto import compare_digest, hmac_sha256, mac_of
from rexplan.wire.frames import U32
from rexplan.wire.messages import VERSION, check_message

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

NONCE_BYTES = 16
MAC_BYTES = 32

_U16 = struct.Struct(">H")


def direction_keys(secret: bytes) -> tuple[bytes, bytes]:
    """(K_L, K_A): launcher->agent and agent->launcher MAC keys derived from the triple key."""
    return hmac_sha256(secret, b"rex-cb/1 launcher"), hmac_sha256(secret, b"rex-cb/1 agent")


def new_nonce() -> bytes:
    """A fresh 16-byte nonce (na, ns or nl)."""
    return os.urandom(NONCE_BYTES)


def make_hello(
    *,
    run: str,
    step: str,
    triple: str,
    key_id: str,
    na: bytes,
    pid: int,
    pgid: int,
    start: str,
) -> dict[str, Any]:
    """The agent's first message; raises FrameError if a field is invalid."""
    msg = {
        "t": "hello",
        "v": VERSION,
        "run": run,
        "step": step,
        "triple": triple,
        "key_id": key_id,
        "na": na.hex(),
        "pid": pid,
        "pgid": pgid,
        "start": start,
    }
    return check_message(msg, "hello")


def make_chal(ns: bytes, lp: bytes) -> dict[str, Any]:
    return {"t": "chal", "ns": ns.hex(), "lp": lp.hex()}


def make_resp(ap: bytes) -> dict[str, Any]:
    return {"t": "resp", "ap": ap.hex()}


def make_decl(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes, reason: str) -> dict[str, Any]:
    """A proven decline; ``reason`` is cut to 200 printable ASCII characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in reason)[:200] or "declined"
    return {"t": "decl", "reason": text, "mac": decline_mac(k_a, t, ns, nl, lp, text).hex()}


def decline_mac(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes, reason: str) -> bytes:
    return mac_of(k_a, b"decl", t, ns, nl, lp, reason.encode("ascii"))


def verify_decline(
    k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes, reason: str, mac: bytes
) -> bool:
    return compare_digest(decline_mac(k_a, t, ns, nl, lp, reason), mac)


def make_same(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes) -> dict[str, Any]:
    """A proven "unchanged": the hello's pid, pgid and start are the running program's."""
    return {"t": "same", "mac": same_mac(k_a, t, ns, nl, lp).hex()}


def same_mac(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes) -> bytes:
    return mac_of(k_a, b"same", t, ns, nl, lp)


def verify_same(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes, mac: bytes) -> bool:
    return compare_digest(same_mac(k_a, t, ns, nl, lp), mac)


def make_ok(mac: bytes) -> dict[str, Any]:
    return {"t": "ok", "mac": mac.hex()}


def make_no(ref: str) -> dict[str, Any]:
    return {"t": "no", "ref": ref}


def transcript(hello: Mapping[str, Any]) -> bytes:
    """T: the hello's fields in fixed order, each a u16 length then its bytes.

    Strings are UTF-8, ``na`` its 16 raw bytes, pid and pgid u32 big-endian. The version is
    the first field, so it is under every MAC.
    """
    msg = check_message(hello, "hello")
    parts = [
        msg["v"].encode("utf-8"),
        msg["run"].encode("utf-8"),
        msg["step"].encode("utf-8"),
        msg["triple"].encode("utf-8"),
        msg["key_id"].encode("utf-8"),
        bytes.fromhex(msg["na"]),
        U32.pack(msg["pid"]),
        U32.pack(msg["pgid"]),
        msg["start"].encode("utf-8"),
    ]
    return b"".join(_U16.pack(len(part)) + part for part in parts)


def launcher_proof(k_l: bytes, t: bytes, ns: bytes, nl: bytes) -> bytes:
    """lp: the listener proves it holds the key and knows this launch's nonce."""
    return mac_of(k_l, b"chal", t, ns, nl)


def agent_proof(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes) -> bytes:
    """ap: the agent proves the same, bound to this connection's ns and the listener's lp."""
    return mac_of(k_a, b"resp", t, ns, nl, lp)


def ok_mac(k_l: bytes, t: bytes, ns: bytes, nl: bytes, ap: bytes) -> bytes:
    """The MAC of an ``ok`` verdict, so a third party cannot forge one."""
    return mac_of(k_l, b"ok", t, ns, nl, ap)


def verify_launcher_proof(k_l: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes) -> bool:
    return compare_digest(launcher_proof(k_l, t, ns, nl), lp)


def verify_agent_proof(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes, ap: bytes) -> bool:
    return compare_digest(agent_proof(k_a, t, ns, nl, lp), ap)


def verify_ok_mac(k_l: bytes, t: bytes, ns: bytes, nl: bytes, ap: bytes, mac: bytes) -> bool:
    return compare_digest(ok_mac(k_l, t, ns, nl, ap), mac)
