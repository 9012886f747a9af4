"""The character classes of rex-cb/1's names, ids and hex strings, matched without re.

Importing re (with the enum, functools and collections it imports) is a large part of an agent
start, so each pattern here is a Chars: runs of ASCII character sets, matched in one pass.
"""

from __future__ import annotations

_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_DIGITS = "0123456789"
_HEX = _DIGITS + "abcdef"
_PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))  # [ -~]


class Chars:
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


class Dotted:
    """Labels of ``label`` joined by single dots (a host name)."""

    __slots__ = ("_label", "pattern")

    def __init__(self, pattern: str, label: Chars) -> None:
        self.pattern = pattern
        self._label = label

    def match(self, value: str) -> bool | None:
        return True if all(self._label.match(part) for part in value.split(".")) else None


#: user and program names as the wire accepts them
NAME_RE = Chars(
    r"^[a-z_][a-z0-9_-]{0,31}\Z", (_LOWER + "_", 1, 1), (_LOWER + _DIGITS + "_-", 0, 31)
)
_HOST_CHARS = _LOWER + _UPPER + _DIGITS + "_"
HOST_RE = Dotted(
    r"^(?!-)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\Z",
    Chars("", (_HOST_CHARS, 1, 1), (_HOST_CHARS + "-", 0, 62)),
)
#: run ids, step ids and triples as the wire accepts them
RUN_RE = Chars(r"^[A-Za-z0-9_-]{1,64}\Z", (_HOST_CHARS + "-", 1, 64))
#: printable ASCII without spaces: safe to log verbatim
STEP_RE = Chars(r"^[!-~]{1,255}\Z", (_PRINTABLE[1:], 1, 255))
TRIPLE_RE = Chars(
    r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{2,299}\Z",
    (_HOST_CHARS + "-", 1, 1),
    (_HOST_CHARS + ".-", 2, 299),
)


def is_triple(value: str) -> bool:
    """``host.user.program`` as rex names a step: a host name, then two user/program names."""
    parts = value.rsplit(".", 2)
    return (
        len(parts) == 3
        and TRIPLE_RE.match(value) is not None
        and HOST_RE.match(parts[0]) is not None
        and NAME_RE.match(parts[1]) is not None
        and NAME_RE.match(parts[2]) is not None
    )


#: manifest names (a manifest's ``name:``, else its file's stem made safe): who owns a triple
OWNER_RE = Chars(
    r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z", (_HOST_CHARS, 1, 1), (_HOST_CHARS + ".-", 0, 63)
)
#: key ids as keyfile.key_id() makes them
KEY_ID_RE = Chars(r"^[0-9a-f]{16}\Z", (_HEX, 16, 16))
NONCE_RE = Chars(r"^[0-9a-f]{32}\Z", (_HEX, 32, 32))  # NONCE_BYTES in hex
MAC_RE = Chars(r"^[0-9a-f]{64}\Z", (_HEX, 64, 64))  # MAC_BYTES in hex
SHA_RE = Chars(r"^[0-9a-f]{64}\Z", (_HEX, 64, 64))  # a sha256 in hex
START_RE = Chars(r"^[0-9]{1,20}\Z", (_DIGITS, 1, 20))
REF_RE = Chars(r"^[0-9a-f]{1,32}\Z", (_HEX, 1, 32))
REASON_RE = Chars(r"^[ -~]{1,200}\Z", (_PRINTABLE, 1, 200))  # printable ASCII: safe to show
B64_RE = Chars(
    r"^[A-Za-z0-9+/]*={0,2}\Z", (_UPPER + _LOWER + _DIGITS + "+/", 0, 1 << 62), ("=", 0, 2)
)
ENV_NAME_RE = Chars(
    r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z", (_UPPER + _LOWER + "_", 1, 1), (_HOST_CHARS, 0, 127)
)
TAG_NAME_RE = Chars(
    r"^REX_[A-Z0-9_]{1,60}\Z",
    ("R", 1, 1),
    ("E", 1, 1),
    ("X", 1, 1),
    ("_", 1, 1),
    (_UPPER + _DIGITS + "_", 1, 60),
)


def safe_relpath(path: str) -> bool:
    """A relative path that stays inside its directory: no '/', '.', '..' or empty parts."""
    parts = path.split("/")
    return "\0" not in path and all(p not in ("", ".", "..") for p in parts) and len(path) < 1024


#: an account ``become`` names: a POSIX login name (never an option to sudo)
BECOME_RE = Chars(
    r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z",
    ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_", 1, 1),
    ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789.-", 0, 31),
)
