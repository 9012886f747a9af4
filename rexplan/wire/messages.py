"""The fields of every rex-cb/1 message, and check_message, which holds a decoded one to them."""

from __future__ import annotations

from rexplan.wire.chars import (
    B64_RE,
    KEY_ID_RE,
    MAC_RE,
    NONCE_RE,
    REASON_RE,
    REF_RE,
    RUN_RE,
    START_RE,
    STEP_RE,
    TRIPLE_RE,
    Chars,
)
from rexplan.wire.codes import MALFORMED, OUT_OF_ORDER, VERSION_MISMATCH, FrameError
from rexplan.wire.jobs import OUT_CHUNK

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

VERSION = "rex-cb/1"


def _is_pid(value: Any) -> bool:
    return type(value) is int and 1 < value < 1 << 31


def _is_seq(value: Any) -> bool:
    return type(value) is int and 0 < value < 1 << 31


def _matches(pattern: Chars) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and pattern.match(value) is not None


_MESSAGES: dict[str, dict[str, Callable[[Any], bool]]] = {
    "hello": {
        "v": lambda value: isinstance(value, str),
        "run": _matches(RUN_RE),
        "step": _matches(STEP_RE),
        "triple": _matches(TRIPLE_RE),
        "key_id": _matches(KEY_ID_RE),
        "na": _matches(NONCE_RE),
        "pid": _is_pid,
        "pgid": _is_pid,
        "start": _matches(START_RE),
    },
    "chal": {"ns": _matches(NONCE_RE), "lp": _matches(MAC_RE)},
    "resp": {"ap": _matches(MAC_RE)},
    "decl": {"reason": _matches(REASON_RE), "mac": _matches(MAC_RE)},
    "same": {"mac": _matches(MAC_RE)},
    "ok": {"mac": _matches(MAC_RE)},
    "no": {"ref": _matches(REF_RE)},
    "hb": {"seq": lambda v: _is_seq(v), "mac": _matches(MAC_RE)},
    "out": {
        "seq": lambda v: _is_seq(v),
        "data": lambda v: (
            isinstance(v, str) and len(v) <= 4 * OUT_CHUNK // 3 + 4 and bool(B64_RE.match(v))
        ),
        "mac": _matches(MAC_RE),
    },
    "exit": {
        "seq": lambda v: _is_seq(v),
        "status": lambda v: type(v) is int and -255 <= v <= 255,
        "mac": _matches(MAC_RE),
    },
}


def check_message(msg: Mapping[str, Any], *expected: str) -> dict[str, Any]:
    """Validate a decoded message whose type must be one of ``expected``; raises FrameError.

    Unknown types and bad fields are MALFORMED, a known type at the wrong time is
    OUT_OF_ORDER, a hello of another protocol version is VERSION.
    """
    kind = msg.get("t")
    if not isinstance(kind, str) or kind not in _MESSAGES:
        raise FrameError(MALFORMED, "unknown message type")
    if kind not in expected:
        raise FrameError(OUT_OF_ORDER, f"{kind} while expecting {'/'.join(expected)}")
    version = msg.get("v")
    if kind == "hello" and isinstance(version, str) and version != VERSION:
        raise FrameError(VERSION_MISMATCH, "peer speaks another protocol version")
    schema = _MESSAGES[kind]
    if len(msg) != len(schema) + 1 or any(name not in msg for name in schema):
        raise FrameError(MALFORMED, f"{kind} has missing or unknown keys")
    for name, check in schema.items():
        if not check(msg[name]):
            raise FrameError(MALFORMED, f"{kind}.{name} is invalid")
    return dict(msg)
