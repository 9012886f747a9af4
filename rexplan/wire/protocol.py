"""rex-cb/1: key file format, key derivation and the callback wire format; stdlib only.

This module is shipped to hosts inside the agent bundle (Python >= 3.8 there), so it imports
nothing outside the standard library and does no I/O of its own: callers hand it bytes.

Wire format: a frame is a u32 big-endian length then that many bytes of UTF-8 JSON, one object,
1..4096 bytes, parsed strictly (no duplicate keys, no NaN/Infinity, exact key set per message).

    agent -> listener  hello {t, v, run, step, triple, key_id, na, pid, pgid, start}
    listener -> agent  chal  {t, ns, lp}    lp = HMAC(K_L, "chal" || T || ns || nl)
    agent -> listener  resp  {t, ap}        ap = HMAC(K_A, "resp" || T || ns || nl || lp)
    listener -> agent  ok    {t, mac}       mac = HMAC(K_L, "ok" || T || ns || nl || ap)
                    or no    {t, ref}       ref is opaque; the reason is only in the log

An agent whose host fails the launch's ``when`` preconditions starts nothing and, in place of
``resp``, proves a decline: ``decl {t, reason, mac}``, mac = HMAC(K_A, "decl" || T || ns || nl ||
lp || reason); the hello then names the agent's own pid. The listener decides DECLINED.

An agent whose launch asks for it (``unchanged``) and that finds the launch's program already
running with the same spec starts nothing and, in place of ``resp``, proves that: ``same {t,
mac}``, mac = HMAC(K_A, "same" || T || ns || nl || lp); the hello then names the running
program's pid, pgid and start time. The listener decides UNCHANGED: a relay, which holds no
key, cannot.

T = transcript(hello) is a fixed binary encoding of the hello fields (version first), so the
MACs never depend on how JSON was written.

A ``kind: job`` keeps the connection after ``ok``; every later frame carries a sequence number
(1, 2, ... per direction) and a MAC over the session (T, ns, nl, ap), its type, seq and payload:

    listener -> agent  hb    {t, seq, mac}          every JOB_HEARTBEAT s; K_L
    agent -> listener  out   {t, seq, data, mac}    base64 output, <= OUT_CHUNK bytes; K_A
    agent -> listener  exit  {t, seq, status, mac}  the job's exit status; K_A

The ``out`` frames carry the last OUT_TAIL bytes of the job's output at most, opened by the line
``[... N bytes cut]`` (cut_line) when N bytes came before them; the listener keeps no more.

The agent kills the job when the connection ends or no heartbeat came for JOB_SILENCE s.

Nonces and MACs travel as lowercase hex. The launch message (launcher -> agent stdin, one JSON
line) is built by make_launch and read by parse_launch; it is the only place the launch nonce
``nl`` travels.
"""

from __future__ import annotations

import binascii
import math
import os
import struct
from _operator import _compare_digest

# The agent imports this module on every run: no dataclasses (they import inspect) and typing
# only for the type checker
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from hashlib import sha256 as sha256
    from typing import Any
else:
    # The agent imports this module on every launch, so it takes the interpreter's builtin
    # SHA-256 (and HMAC's constant-time comparison, above) directly: importing hashlib or hmac
    # loads OpenSSL, which costs an agent start more CPU than all it then does with digests.
    try:
        from _sha2 import sha256  # Python >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # before 3.12
        except ImportError:  # an interpreter built without its own SHA-256
            from hashlib import sha256

# json's C half, as json.loads and json.dumps use it: the json package imports re, and re
# imports enum, functools and collections, a quarter of an agent start's CPU
try:
    import _json

    _cjson: Any = _json
except ImportError:  # an interpreter without it: the json package then
    _cjson = None

#: the constant-time comparison of MACs: hmac.compare_digest as the hmac module defines it
#: without OpenSSL (with OpenSSL it is CRYPTO_memcmp, equally constant-time)
compare_digest = _compare_digest

VERSION = "rex-cb/1"
KEY_BYTES = 32
KEY_MAGIC = "rex-key 1"
MAX_FRAME = 4096
MAX_LAUNCH = 1 << 20
NONCE_BYTES = 16
MAC_BYTES = 32

# Result codes: every callback attempt is logged with exactly one of them.
OK = "OK"
BAD_PROOF = "BAD_PROOF"  # the agent's proof did not verify
UNKNOWN_STEP = "UNKNOWN_STEP"  # no pending step of this run has that id
WRONG_TRIPLE = "WRONG_TRIPLE"  # the claimed triple is not the step's expected triple
WRONG_KEY = "WRONG_KEY"  # the agent holds another key than the launcher's for the triple
DUPLICATE = "DUPLICATE"  # the step was already decided (verified at most once)
MALFORMED = "MALFORMED"  # not a valid frame or message
OVERSIZE = "OVERSIZE"  # a frame longer than MAX_FRAME
TIMEOUT = "TIMEOUT"  # handshake or step deadline passed
VERSION_MISMATCH = "VERSION"  # a protocol version this side does not speak
OUT_OF_ORDER = "OUT_OF_ORDER"  # a valid message at the wrong point of the handshake
BUSY = "BUSY"  # too many unauthenticated connections; closed at once
CLOSED = "CLOSED"  # the peer closed the connection before a verdict
DECLINED = "DECLINED"  # the agent proved that its host declined the launch (``when``)
UNCHANGED = "UNCHANGED"  # the agent proved that the program runs already, with the same spec
CODES = (
    OK,
    BAD_PROOF,
    UNKNOWN_STEP,
    WRONG_TRIPLE,
    WRONG_KEY,
    DUPLICATE,
    MALFORMED,
    OVERSIZE,
    TIMEOUT,
    VERSION_MISMATCH,
    OUT_OF_ORDER,
    BUSY,
    CLOSED,
    DECLINED,
    UNCHANGED,
)

# The names, ids and hex strings of the protocol are checked with _Chars, not re: importing re
# (with the enum, functools and collections it imports) is a large part of an agent start.
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_DIGITS = "0123456789"
_HEX = _DIGITS + "abcdef"
_PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))  # [ -~]


class _Chars:
    """A full match of ASCII character runs, as ``^[A]{m,n}[B]{m,n}...\\Z``: each run takes as
    many characters of its set as it may (the runs of every pattern here either have a fixed
    length or sets the next run does not share, so that is the only way to match). ``match``
    answers as re's does: a true value, or None."""

    __slots__ = ("_runs", "pattern")

    def __init__(self, pattern: str, *runs: tuple[str, int, int]) -> None:
        self.pattern = pattern  # the regex it stands for, for reading and the tests
        self._runs = tuple((frozenset(chars), low, high) for chars, low, high in runs)

    def match(self, value: str) -> bool | None:
        pos, end = 0, len(value)
        for chars, low, high in self._runs:
            stop = min(end, pos + high)
            start = pos
            while pos < stop and value[pos] in chars:
                pos += 1
            if pos - start < low:
                return None
        return True if pos == end else None


class _Dotted:
    """Labels of ``label`` joined by single dots (a host name)."""

    __slots__ = ("_label", "pattern")

    def __init__(self, pattern: str, label: _Chars) -> None:
        self.pattern = pattern
        self._label = label

    def match(self, value: str) -> bool | None:
        return True if all(self._label.match(part) for part in value.split(".")) else None


_NAME = _Chars(r"^[a-z_][a-z0-9_-]{0,31}\Z", (_LOWER + "_", 1, 1), (_LOWER + _DIGITS + "_-", 0, 31))
#: user and program names as the wire accepts them
NAME_RE = _NAME
_HOST_CHARS = _LOWER + _UPPER + _DIGITS + "_"
_HOST = _Dotted(
    r"^(?!-)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\Z",
    _Chars("", (_HOST_CHARS, 1, 1), (_HOST_CHARS + "-", 0, 62)),
)
#: run ids, step ids and triples as the wire accepts them
RUN_RE = _Chars(r"^[A-Za-z0-9_-]{1,64}\Z", (_HOST_CHARS + "-", 1, 64))
#: printable ASCII without spaces: safe to log verbatim
STEP_RE = _Chars(r"^[!-~]{1,255}\Z", (_PRINTABLE[1:], 1, 255))
TRIPLE_RE = _Chars(
    r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{2,299}\Z",
    (_HOST_CHARS + "-", 1, 1),
    (_HOST_CHARS + ".-", 2, 299),
)
_KEY_ID = _Chars(r"^[0-9a-f]{16}\Z", (_HEX, 16, 16))
#: key ids as key_id() makes them
KEY_ID_RE = _KEY_ID
_NONCE_HEX = _Chars(r"^[0-9a-f]{32}\Z", (_HEX, 32, 32))  # NONCE_BYTES in hex
_MAC_HEX = _Chars(r"^[0-9a-f]{64}\Z", (_HEX, 64, 64))  # MAC_BYTES in hex
_START = _Chars(r"^[0-9]{1,20}\Z", (_DIGITS, 1, 20))
_REF = _Chars(r"^[0-9a-f]{1,32}\Z", (_HEX, 1, 32))
_REASON = _Chars(r"^[ -~]{1,200}\Z", (_PRINTABLE, 1, 200))  # printable ASCII: safe to show
_B64 = _Chars(
    r"^[A-Za-z0-9+/]*={0,2}\Z", (_UPPER + _LOWER + _DIGITS + "+/", 0, 1 << 62), ("=", 0, 2)
)
_ENV_NAME = _Chars(
    r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z", (_UPPER + _LOWER + "_", 1, 1), (_HOST_CHARS, 0, 127)
)
_TAG_NAME = _Chars(
    r"^REX_[A-Z0-9_]{1,60}\Z",
    ("R", 1, 1),
    ("E", 1, 1),
    ("X", 1, 1),
    ("_", 1, 1),
    (_UPPER + _DIGITS + "_", 1, 60),
)
RESERVED_ENV = ("REX_RUN", "REX_STEP", "REX_TRIPLE", "NOTIFY_SOCKET")

_HEADER = struct.Struct(">I")
_U16 = struct.Struct(">H")


class KeyFormatError(ValueError):
    """A key file's text is not a valid rex key."""


class FrameError(ValueError):
    """A frame or message broke rex-cb/1; ``code`` is the result code to log."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class LaunchError(ValueError):
    """A launch message is malformed."""


def key_id(secret: bytes) -> str:
    """Short public fingerprint of a key, shown everywhere instead of the secret."""
    return sha256(b"rex key id\0" + secret).hexdigest()[:16]


def key_relpath(host: str, user: str, program: str | None) -> str:
    """Path of a key inside a key store (local or remote), one directory per component.

    ``<host>/<user>.key`` for a host.user key, ``<host>/<user>/<program>.key`` for a program
    key. Components are validated so no name can climb out of the store.
    """
    if not _HOST.match(host) or host in (".", ".."):
        raise KeyFormatError(f"invalid host name {host!r}")
    if not _NAME.match(user):
        raise KeyFormatError(f"invalid user name {user!r}")
    if program is None:
        return f"{host}/{user}.key"
    if not _NAME.match(program):
        raise KeyFormatError(f"invalid program name {program!r}")
    return f"{host}/{user}/{program}.key"


def format_key_file(triple: str, created: str, secret: bytes) -> bytes:
    """The text of a key file: it names its own triple and creation time."""
    if len(secret) != KEY_BYTES:
        raise KeyFormatError("a key is 32 bytes")
    b64 = binascii.b2a_base64(secret, newline=False).decode("ascii")
    return f"{KEY_MAGIC}\ntriple: {triple}\ncreated: {created}\nsecret: {b64}\n".encode("ascii")


def parse_key_file(data: bytes) -> tuple[str, str, bytes]:
    """Parse a key file into (triple, created, secret); raises KeyFormatError."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFormatError("key file is not ASCII") from None
    lines = text.splitlines()
    if not lines or lines[0] != KEY_MAGIC:
        raise KeyFormatError(f"key file does not start with {KEY_MAGIC!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(": ")
        if not sep or name not in ("triple", "created", "secret") or name in fields:
            raise KeyFormatError("malformed key file line")
        fields[name] = value
    if set(fields) != {"triple", "created", "secret"}:
        raise KeyFormatError("key file lacks triple, created or secret")
    try:
        if not _B64.match(fields["secret"]):
            raise ValueError(fields["secret"])
        secret = binascii.a2b_base64(fields["secret"])
    except ValueError:
        raise KeyFormatError("key secret is not base64") from None
    if len(secret) != KEY_BYTES:
        raise KeyFormatError("key secret is not 32 bytes")
    return fields["triple"], fields["created"], secret


def direction_keys(secret: bytes) -> tuple[bytes, bytes]:
    """(K_L, K_A): launcher->agent and agent->launcher MAC keys derived from the triple key."""
    return hmac_sha256(secret, b"rex-cb/1 launcher"), hmac_sha256(secret, b"rex-cb/1 agent")


def new_nonce() -> bytes:
    """A fresh 16-byte nonce (na, ns or nl)."""
    return os.urandom(NONCE_BYTES)


# ---- strict JSON ----


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise FrameError(MALFORMED, f"duplicate key {name!r}")
        obj[name] = value
    return obj


def _no_constant(name: str) -> None:
    raise FrameError(MALFORMED, f"{name} is not allowed")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FrameError(MALFORMED, "number out of range")
    return value


def _loads(data: bytes) -> dict[str, Any]:
    """Strict JSON object from UTF-8 bytes; raises FrameError(MALFORMED)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(MALFORMED, "not UTF-8") from None
    try:
        obj = loads(text, _no_duplicates, _finite, _no_constant)
    except FrameError:
        raise
    except (ValueError, RecursionError):
        raise FrameError(MALFORMED, "not JSON") from None
    if not isinstance(obj, dict):
        raise FrameError(MALFORMED, "not a JSON object")
    return obj


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return dumps(obj, compact=True, allow_nan=False).encode("ascii")


class _Decoding:
    """What json's C scanner reads from its decoder (a json.JSONDecoder's attributes)."""

    strict = True  # no control characters inside strings
    object_hook = None
    parse_int = int

    def __init__(
        self,
        pairs: Callable[[list[tuple[str, Any]]], Any] | None,
        parse_float: Callable[[str], Any],
        parse_constant: Callable[[str], Any],
    ) -> None:
        self.object_pairs_hook = pairs
        self.parse_float = parse_float
        self.parse_constant = parse_constant


def loads(
    text: str,
    pairs: Callable[[list[tuple[str, Any]]], Any] | None = None,
    parse_float: Callable[[str], Any] = float,
    parse_constant: Callable[[str], Any] = float,
) -> Any:
    """json.loads(text, object_pairs_hook=pairs, parse_float=..., parse_constant=...), over
    json's C scanner as json.loads runs it; ValueError when ``text`` is not one JSON value."""
    if _cjson is None:
        import json

        decoder = json.JSONDecoder(
            object_pairs_hook=pairs, parse_float=parse_float, parse_constant=parse_constant
        )
        return decoder.decode(text)
    text = text.strip(" \t\n\r")  # JSON's whitespace, as json.loads skips it
    scan = _cjson.make_scanner(_Decoding(pairs, parse_float, parse_constant))
    try:
        try:
            obj, end = scan(text, 0)
        except SystemError:
            # Before Python 3.12 the scanner raises its syntax errors as json.decoder's
            # JSONDecodeError and finds that class only if json.decoder was imported: import
            # it now (bad input is rare) and scan again for the error.
            import json.decoder

            obj, end = scan(text, 0)
    except StopIteration:
        raise ValueError("no JSON value") from None
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    return obj


def _unserializable(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(
    obj: Any, *, compact: bool = False, sort_keys: bool = False, allow_nan: bool = True
) -> str:
    """json.dumps(obj, sort_keys=..., allow_nan=...), with separators (",", ":") if
    ``compact``: the same text, from json's C encoder as json.dumps runs it."""
    items, keys = (",", ":") if compact else (", ", ": ")
    if isinstance(obj, str) and _cjson is not None:
        return str(_cjson.encode_basestring_ascii(obj))
    try:
        if _cjson is None:
            raise TypeError("no C encoder")
        encode = _cjson.make_encoder(
            {},
            _unserializable,
            _cjson.encode_basestring_ascii,
            None,
            keys,
            items,
            sort_keys,
            False,
            allow_nan,
        )
    except TypeError:  # no C half, or one called otherwise: json knows how
        import json

        return json.dumps(obj, separators=(items, keys), sort_keys=sort_keys, allow_nan=allow_nan)
    return "".join(encode(obj, 0))


# ---- frames ----


def encode_frame(msg: Mapping[str, Any]) -> bytes:
    """Length-prefixed frame of one message; raises FrameError(OVERSIZE) past MAX_FRAME."""
    payload = _dumps(msg)
    if len(payload) > MAX_FRAME:
        raise FrameError(OVERSIZE, f"{len(payload)} bytes")
    return _HEADER.pack(len(payload)) + payload


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
            return _HEADER.size - len(self._buf)
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
                (length,) = _HEADER.unpack(bytes(self._buf))
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
                out.append(_loads(payload))
        return out


# ---- messages ----


def _is_pid(value: Any) -> bool:
    return type(value) is int and 1 < value < 1 << 31


def _is_seq(value: Any) -> bool:
    return type(value) is int and 0 < value < 1 << 31


def _matches(pattern: _Chars) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and pattern.match(value) is not None


_MESSAGES: dict[str, dict[str, Callable[[Any], bool]]] = {
    "hello": {
        "v": lambda value: isinstance(value, str),
        "run": _matches(RUN_RE),
        "step": _matches(STEP_RE),
        "triple": _matches(TRIPLE_RE),
        "key_id": _matches(_KEY_ID),
        "na": _matches(_NONCE_HEX),
        "pid": _is_pid,
        "pgid": _is_pid,
        "start": _matches(_START),
    },
    "chal": {"ns": _matches(_NONCE_HEX), "lp": _matches(_MAC_HEX)},
    "resp": {"ap": _matches(_MAC_HEX)},
    "decl": {"reason": _matches(_REASON), "mac": _matches(_MAC_HEX)},
    "same": {"mac": _matches(_MAC_HEX)},
    "ok": {"mac": _matches(_MAC_HEX)},
    "no": {"ref": _matches(_REF)},
    "hb": {"seq": lambda v: _is_seq(v), "mac": _matches(_MAC_HEX)},
    "out": {
        "seq": lambda v: _is_seq(v),
        "data": lambda v: (
            isinstance(v, str) and len(v) <= 4 * OUT_CHUNK // 3 + 4 and bool(_B64.match(v))
        ),
        "mac": _matches(_MAC_HEX),
    },
    "exit": {
        "seq": lambda v: _is_seq(v),
        "status": lambda v: type(v) is int and -255 <= v <= 255,
        "mac": _matches(_MAC_HEX),
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
    return _mac(k_a, b"decl", t, ns, nl, lp, reason.encode("ascii"))


def verify_decline(
    k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes, reason: str, mac: bytes
) -> bool:
    return compare_digest(decline_mac(k_a, t, ns, nl, lp, reason), mac)


def make_same(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes) -> dict[str, Any]:
    """A proven "unchanged": the hello's pid, pgid and start are the running program's."""
    return {"t": "same", "mac": same_mac(k_a, t, ns, nl, lp).hex()}


def same_mac(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes) -> bytes:
    return _mac(k_a, b"same", t, ns, nl, lp)


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
        _HEADER.pack(msg["pid"]),
        _HEADER.pack(msg["pgid"]),
        msg["start"].encode("utf-8"),
    ]
    return b"".join(_U16.pack(len(part)) + part for part in parts)


_TRANS_5C = bytes(x ^ 0x5C for x in range(256))
_TRANS_36 = bytes(x ^ 0x36 for x in range(256))


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104), as hmac.new(key, msg, "sha256").digest() computes it, over the
    builtin SHA-256: the same construction as the hmac module's own pure-Python path."""
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha256(key.translate(_TRANS_36))
    inner.update(msg)
    outer = sha256(key.translate(_TRANS_5C))
    outer.update(inner.digest())
    return outer.digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac_sha256(key, b"".join(parts))


def launcher_proof(k_l: bytes, t: bytes, ns: bytes, nl: bytes) -> bytes:
    """lp: the listener proves it holds the key and knows this launch's nonce."""
    return _mac(k_l, b"chal", t, ns, nl)


def agent_proof(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes) -> bytes:
    """ap: the agent proves the same, bound to this connection's ns and the listener's lp."""
    return _mac(k_a, b"resp", t, ns, nl, lp)


def ok_mac(k_l: bytes, t: bytes, ns: bytes, nl: bytes, ap: bytes) -> bytes:
    """The MAC of an ``ok`` verdict, so a third party cannot forge one."""
    return _mac(k_l, b"ok", t, ns, nl, ap)


def verify_launcher_proof(k_l: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes) -> bool:
    return compare_digest(launcher_proof(k_l, t, ns, nl), lp)


def verify_agent_proof(k_a: bytes, t: bytes, ns: bytes, nl: bytes, lp: bytes, ap: bytes) -> bool:
    return compare_digest(agent_proof(k_a, t, ns, nl, lp), ap)


def verify_ok_mac(k_l: bytes, t: bytes, ns: bytes, nl: bytes, ap: bytes, mac: bytes) -> bool:
    return compare_digest(ok_mac(k_l, t, ns, nl, ap), mac)


# ---- a job's frames after ok ----

#: seconds between the listener's heartbeats to a job, and the silence after which the agent
#: takes the launcher for gone and kills the job
JOB_HEARTBEAT = 1.0
JOB_SILENCE = 5.0
#: raw output bytes per ``out`` frame, and in all (the tail of the job's output)
OUT_CHUNK = 2048
OUT_TAIL = 16384


def cut_line(count: int) -> bytes:
    """The line that stands for ``count`` bytes of output cut before a tail."""
    return b"[... %d bytes cut]\n" % count


class _Frozen:
    """An immutable record like a frozen dataclass: equality, hash and repr by ``_fields``, in
    order (less ``_hidden`` in the repr); assigning a field raises AttributeError."""

    __slots__: tuple[str, ...] = ()
    _fields: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()

    def _init(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _Frozen)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = (f"{n}={getattr(self, n)!r}" for n in self._fields if n not in self._hidden)
        return f"{type(self).__name__}({', '.join(shown)})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")


class Session(_Frozen):
    """What both sides of a verified handshake share: the MAC keys and the session binding."""

    _fields = ("k_l", "k_a", "binding")
    __slots__ = _fields
    _hidden = _fields
    k_l: bytes
    k_a: bytes
    binding: bytes  # T || ns || nl || ap

    def __init__(self, k_l: bytes, k_a: bytes, binding: bytes) -> None:
        self._init(k_l=k_l, k_a=k_a, binding=binding)

    @classmethod
    def of(cls, keys: tuple[bytes, bytes], t: bytes, ns: bytes, nl: bytes, ap: bytes) -> Session:
        """From (K_L, K_A) and the handshake's transcript, nonces and agent proof."""
        return cls(keys[0], keys[1], t + ns + nl + ap)

    def mac(self, key: bytes, kind: str, seq: int, payload: bytes) -> str:
        return _mac(
            key, b"job", self.binding, kind.encode("ascii"), _HEADER.pack(seq), payload
        ).hex()

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


# ---- the launch message ----

#: keys of the ``ready`` probe dict (model.Ready's fields, less the timeout in deadline_s)
PROBE_KEYS = ("kind", "interval", "settle", "host", "port", "url", "argv", "path")
PROBE_KINDS = ("alive", "tcp", "http", "command", "file", "notify")
DEADLINE_KEYS = ("start", "ready", "callback", "stop")
_LAUNCH_KEYS = (
    "v",
    "run",
    "step",
    "triple",
    "key_path",
    "nl",
    "callback",
    "deadline_s",
    "argv",
    "env",
    "cwd",
    "ready",
    "kind",
    "log",
    "tags",
)
#: launch keys an older launcher may leave out; their defaults are Launch's
_OPTIONAL_LAUNCH_KEYS = ("replace", "restart", "files", "when", "unchanged")
RESTART_POLICIES = ("no", "on-failure", "always")


class Probe(_Frozen):
    """A readiness probe as the agent runs it."""

    _fields = ("kind", "interval", "settle", "host", "port", "url", "argv", "path")
    __slots__ = _fields
    kind: str
    interval: float
    settle: float
    host: str
    port: int | None
    url: str | None
    argv: tuple[str, ...]
    path: str | None

    def __init__(
        self,
        kind: str = "alive",
        interval: float = 0.2,
        settle: float = 0.5,
        host: str = "127.0.0.1",
        port: int | None = None,
        url: str | None = None,
        argv: tuple[str, ...] = (),
        path: str | None = None,
    ) -> None:
        self._init(
            kind=kind,
            interval=interval,
            settle=settle,
            host=host,
            port=port,
            url=url,
            argv=argv,
            path=path,
        )


class Launch(_Frozen):
    """A parsed launch message. ``deadlines`` are seconds: start, ready, callback, stop."""

    _fields = (
        "run",
        "step",
        "triple",
        "key_path",
        "nl",
        "callback",
        "deadlines",
        "argv",
        "env",
        "cwd",
        "ready",
        "kind",
        "log",
        "tags",
        "replace",
        "restart",
        "files",
        "when",
        "unchanged",
    )
    __slots__ = _fields
    _hidden = ("nl",)
    run: str
    step: str
    triple: str
    key_path: str
    nl: bytes
    callback: tuple[str, int]
    deadlines: tuple[tuple[str, float], ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str | None
    ready: Probe
    kind: str
    log: str
    tags: tuple[tuple[str, str], ...]
    replace: bool  # stop a running instance of the triple first, else refuse
    restart: str  # the supervisor's policy when the program ends: RESTART_POLICIES
    #: (dest, sha256 hex, mode): files the launcher put under REX_HOME/files/<log>/
    files: tuple[tuple[str, str, int], ...]
    #: preconditions: ("max_load", 1-minute load average) and ("min_free_mb", MemAvailable)
    when: tuple[tuple[str, float], ...]
    #: an instance of the same spec alive is proven to the listener (``same``), not refused
    unchanged: bool

    def __init__(
        self,
        run: str,
        step: str,
        triple: str,
        key_path: str,
        nl: bytes,
        callback: tuple[str, int],
        deadlines: tuple[tuple[str, float], ...],
        argv: tuple[str, ...],
        env: tuple[tuple[str, str], ...],
        cwd: str | None,
        ready: Probe,
        kind: str,
        log: str,
        tags: tuple[tuple[str, str], ...],
        replace: bool = False,
        restart: str = "no",
        files: tuple[tuple[str, str, int], ...] = (),
        when: tuple[tuple[str, float], ...] = (),
        unchanged: bool = False,
    ) -> None:
        self._init(
            run=run,
            step=step,
            triple=triple,
            key_path=key_path,
            nl=nl,
            callback=callback,
            deadlines=deadlines,
            argv=argv,
            env=env,
            cwd=cwd,
            ready=ready,
            kind=kind,
            log=log,
            tags=tags,
            replace=replace,
            restart=restart,
            files=files,
            when=when,
            unchanged=unchanged,
        )

    def deadline(self, name: str) -> float:
        return dict(self.deadlines)[name]


def make_launch(
    *,
    run: str,
    step: str,
    triple: str,
    key_path: str,
    nl: bytes,
    callback: tuple[str, int],
    deadlines: Mapping[str, float],
    argv: Sequence[str],
    env: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    cwd: str | None = None,
    ready: Mapping[str, Any] | None = None,
    kind: str = "service",
    log: str,
    tags: Mapping[str, str] | None = None,
    replace: bool = False,
    restart: str = "no",
    files: Sequence[tuple[str, str, int]] = (),
    when: Mapping[str, float] | None = None,
    unchanged: bool = False,
) -> bytes:
    """The launch message as one JSON line (newline-terminated); raises LaunchError.

    ``ready`` takes PROBE_KEYS (None values mean the default); ``deadlines`` takes
    DEADLINE_KEYS. The result is parsed back before it is returned, so a launcher can never
    send a message its agent would refuse.
    """
    probe = {k: v for k, v in (ready or {"kind": "alive"}).items() if v is not None}
    if "argv" in probe:
        probe["argv"] = list(probe["argv"])
    msg = {
        "v": VERSION,
        "run": run,
        "step": step,
        "triple": triple,
        "key_path": key_path,
        "nl": nl.hex(),
        "callback": [callback[0], callback[1]],
        "deadline_s": dict(deadlines),
        "argv": list(argv),
        "env": dict(env),
        "cwd": cwd,
        "ready": probe,
        "kind": kind,
        "log": log,
        "tags": dict(tags or {}),
        "replace": replace,
        "restart": restart,
        "files": [list(f) for f in files],
        "when": dict(when or {}),
    }
    if unchanged:
        msg["unchanged"] = True
    try:
        line = _dumps(msg) + b"\n"
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"launch message cannot be encoded: {exc}") from None
    parse_launch(line)
    return line


def _text(value: Any, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty) or "\0" in value:
        raise LaunchError(f"{what} must be a non-empty string without NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise LaunchError(f"{what} is not valid Unicode") from None
    return value


def _seconds(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not 0 < value <= 86400:
        raise LaunchError(f"{what} must be a number of seconds in (0, 86400]")
    return float(value)


def _key_path(value: Any) -> str:
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) not in (2, 3) or not parts[-1].endswith(".key"):
        raise LaunchError("key_path must be HOST/USER.key or HOST/USER/PROGRAM.key")
    names = [*parts[1:-1], parts[-1][: -len(".key")]]
    if (
        not _HOST.match(parts[0])
        or parts[0] in (".", "..")
        or not all(_NAME.match(name) for name in names)
    ):
        raise LaunchError("key_path has an invalid component")
    return str(value)


def _pairs(value: Any, what: str, name_re: _Chars) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise LaunchError(f"{what} must be an object")
    for name, text in value.items():
        if not name_re.match(name) or name in RESERVED_ENV:
            raise LaunchError(f"{what} has an invalid or reserved name {name!r}")
        _text(text, f"{what}.{name}", empty=True)
    return tuple(sorted(value.items()))


def _probe(value: Any) -> Probe:
    if not isinstance(value, dict) or not set(value) <= set(PROBE_KEYS):
        raise LaunchError(f"ready must be an object with keys among {', '.join(PROBE_KEYS)}")
    kind = value.get("kind")
    if kind not in PROBE_KINDS:
        raise LaunchError(f"ready.kind must be one of {', '.join(PROBE_KINDS)}")
    required = {"tcp": "port", "http": "url", "command": "argv", "file": "path"}.get(kind)
    if required is not None and required not in value:
        raise LaunchError(f"a {kind} probe needs ready.{required}")
    port = value.get("port")
    if port is not None and (type(port) is not int or not 0 < port < 65536):
        raise LaunchError("ready.port must be a TCP port")
    url = value.get("url")
    if url is not None and not _text(url, "ready.url").startswith(("http://", "https://")):
        raise LaunchError("ready.url must be an http:// or https:// URL")
    argv = value.get("argv", [])
    if not isinstance(argv, list) or (kind == "command" and not argv):
        raise LaunchError("ready.argv must be a non-empty list of strings")
    return Probe(
        kind=kind,
        interval=_seconds(value.get("interval", 0.2), "ready.interval"),
        settle=_seconds(value.get("settle", 0.5), "ready.settle"),
        host=_text(value.get("host", "127.0.0.1"), "ready.host"),
        port=port,
        url=url,
        argv=tuple(_text(arg, "ready.argv[]", empty=True) for arg in argv),
        path=None if value.get("path") is None else _text(value["path"], "ready.path"),
    )


_SHA_HEX = _Chars(r"^[0-9a-f]{64}\Z", (_HEX, 64, 64))


def safe_relpath(path: str) -> bool:
    """A relative path that stays inside its directory: no '/', '.', '..' or empty parts."""
    parts = path.split("/")
    return "\0" not in path and all(p not in ("", ".", "..") for p in parts) and len(path) < 1024


def _files(value: Any) -> tuple[tuple[str, str, int], ...]:
    if not isinstance(value, list) or len(value) > 1000:
        raise LaunchError("files must be a list of [dest, sha256, mode]")
    out = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not safe_relpath(item[0])
            or not isinstance(item[1], str)
            or not _SHA_HEX.match(item[1])
            or type(item[2]) is not int
            or not 0 <= item[2] <= 0o7777
        ):
            raise LaunchError("files must be [relative dest, sha256 hex, mode] entries")
        out.append((item[0], item[1], item[2]))
    return tuple(out)


def parse_launch(line: bytes) -> Launch:
    """Parse and validate one launch line; raises LaunchError naming the first problem."""
    if len(line) > MAX_LAUNCH:
        raise LaunchError("launch message too long")
    try:
        msg = _loads(line)
    except FrameError as exc:
        raise LaunchError(f"launch message is not a strict JSON object: {exc}") from None
    if msg.get("v") != VERSION:
        raise LaunchError(f"launch message is not {VERSION}")
    if any(name not in msg for name in _LAUNCH_KEYS) or not set(msg) <= {
        *_LAUNCH_KEYS,
        *_OPTIONAL_LAUNCH_KEYS,
    }:
        raise LaunchError(
            f"launch message needs exactly the keys {', '.join(_LAUNCH_KEYS)} "
            f"(optional: {', '.join(_OPTIONAL_LAUNCH_KEYS)})"
        )
    for name, pattern in (
        ("run", RUN_RE),
        ("step", STEP_RE),
        ("triple", TRIPLE_RE),
        ("log", _NAME),
    ):
        if not isinstance(msg[name], str) or not pattern.match(msg[name]):
            raise LaunchError(f"{name} is invalid")
    if not isinstance(msg["nl"], str) or not _NONCE_HEX.match(msg["nl"]):
        raise LaunchError("nl must be 16 bytes of lowercase hex")
    callback = msg["callback"]
    if (
        not isinstance(callback, list)
        or len(callback) != 2
        or not isinstance(callback[0], str)
        or not 0 < len(callback[0]) <= 255
        or not callback[0].isascii()  # an address or a DNS name, passed on as bytes
        or type(callback[1]) is not int
        or not 0 < callback[1] < 65536
    ):
        raise LaunchError("callback must be [host, port]")
    deadlines = msg["deadline_s"]
    if not isinstance(deadlines, dict) or set(deadlines) != set(DEADLINE_KEYS):
        raise LaunchError(f"deadline_s needs exactly {', '.join(DEADLINE_KEYS)}")
    argv = msg["argv"]
    if not isinstance(argv, list) or not argv:
        raise LaunchError("argv must be a non-empty list of strings")
    cwd = msg["cwd"]
    if msg["kind"] not in ("service", "job"):
        raise LaunchError("kind must be service or job")
    replace = msg.get("replace", False)
    if type(replace) is not bool:
        raise LaunchError("replace must be true or false")
    unchanged = msg.get("unchanged", False)
    if type(unchanged) is not bool:
        raise LaunchError("unchanged must be true or false")
    restart = msg.get("restart", "no")
    if restart not in RESTART_POLICIES:
        raise LaunchError(f"restart must be one of {', '.join(RESTART_POLICIES)}")
    when = msg.get("when", {})
    if (
        not isinstance(when, dict)
        or not set(when) <= {"max_load", "min_free_mb"}
        or not all(type(v) in (int, float) and 0 <= v < 1e300 for v in when.values())
    ):
        raise LaunchError("when takes max_load and min_free_mb, non-negative numbers")
    return Launch(
        run=msg["run"],
        step=msg["step"],
        triple=msg["triple"],
        key_path=_key_path(msg["key_path"]),
        nl=bytes.fromhex(msg["nl"]),
        callback=(callback[0], callback[1]),
        deadlines=tuple((k, _seconds(deadlines[k], f"deadline_s.{k}")) for k in DEADLINE_KEYS),
        argv=(_text(argv[0], "argv[0]"), *(_text(a, "argv[]", empty=True) for a in argv[1:])),
        env=_pairs(msg["env"], "env", _ENV_NAME),
        cwd=None if cwd is None else _text(cwd, "cwd"),
        ready=_probe(msg["ready"]),
        kind=msg["kind"],
        log=msg["log"],
        tags=_pairs(msg["tags"], "tags", _TAG_NAME),
        replace=replace,
        restart=restart,
        files=_files(msg.get("files", [])),
        when=tuple(sorted((k, float(v)) for k, v in when.items())),
        unchanged=unchanged,
    )


def spec_digest(launch: Launch) -> str:
    """sha256 of what the program is (argv, env, cwd, probe, kind, restart, files' content and
    modes), for change detection; ``replace``, ``unchanged``, ``when`` and the run's identity
    are not."""
    spec: dict[str, Any] = {
        "argv": list(launch.argv),
        "env": dict(launch.env),
        "cwd": launch.cwd,
        "ready": [launch.ready.kind, launch.ready.port, launch.ready.url, launch.ready.path],
        "probe_argv": list(launch.ready.argv),
        "kind": launch.kind,
    }
    if launch.restart != "no":
        spec["restart"] = launch.restart
    if launch.files:
        spec["files"] = [list(f) for f in launch.files]
    return sha256(dumps(spec, sort_keys=True).encode("ascii")).hexdigest()


# ---- the kill request ----

#: seconds the agent's ``--kill`` mode waits for its request line on stdin
KILL_WAIT = 30.0
_KILL_KEYS = ("v", "run", "step", "grace")


def make_kill(run: str, step: str, grace: float) -> bytes:
    """The agent's ``--kill`` request, one JSON line for its stdin: end what run ``run``
    started for ``step``, allowing ``grace`` seconds after SIGTERM. The run id goes there, not
    in argv, which every user of the host can read. Raises LaunchError."""
    try:
        line = _dumps({"v": VERSION, "run": run, "step": step, "grace": grace}) + b"\n"
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"kill request cannot be encoded: {exc}") from None
    parse_kill(line)
    return line


def parse_kill(line: bytes) -> tuple[str, str, float]:
    """(run, step, grace) of a kill request line; raises LaunchError."""
    if len(line) > MAX_FRAME:
        raise LaunchError("kill request too long")
    try:
        msg = _loads(line)
    except FrameError as exc:
        raise LaunchError(f"kill request is not a strict JSON object: {exc}") from None
    if set(msg) != set(_KILL_KEYS) or msg["v"] != VERSION:
        raise LaunchError(f"kill request needs exactly the keys {', '.join(_KILL_KEYS)}")
    run, step, grace = msg["run"], msg["step"], msg["grace"]
    if not isinstance(run, str) or not RUN_RE.match(run):
        raise LaunchError("run is invalid")
    if not isinstance(step, str) or not STEP_RE.match(step):
        raise LaunchError("step is invalid")
    if type(grace) not in (int, float) or not 0 <= grace <= 86400:
        raise LaunchError("grace must be a number of seconds in [0, 86400]")
    return run, step, float(grace)
