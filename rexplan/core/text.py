"""The one filter for text rex did not write itself (host output, run logs, manifests) before a
terminal, a log or a comment: controls, bidi overrides and line separators become escapes."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: characters one host-given field may show; longer text is cut with a note of how much
LIMIT = 500

_MEMO = 4096
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _cut(pieces: list[str], total: int, limit: int) -> str:
    """The first of ``pieces`` (one per input character, escaped) that fit in ``limit``
    characters with a note of how many of the ``total`` input characters were left out."""
    room = limit
    while True:
        shown: list[str] = []
        size = 0
        for piece in pieces:
            if size + len(piece) > room:
                break
            shown.append(piece)
            size += len(piece)
        note = f"... [{total - len(shown)} more characters]"
        if size + len(note) <= limit or room == 0:
            return ("".join(shown) + note)[:limit]
        room = max(0, limit - len(note))


def printable(text: str, limit: int | None = LIMIT, *, keep: str = "") -> str:
    """``text`` safe to show: what ``str.isprintable()`` rejects is escaped, except the
    characters of ``keep`` (``"\\n"`` for several lines, ``"\\n\\t"`` for a command's
    output); at most ``limit`` characters (None: no cap), a longer text ends with
    ``... [N more characters]``. Idempotent: printable text within the limit is returned
    as is."""
    fits = limit is None or len(text) <= limit
    if fits and (text.isprintable() or (keep and _only_kept(text, keep))):
        return text
    table = _table(keep)
    if limit is None:
        # line by line: the lines that need no escape (most of them) are copied whole
        return "".join(
            line if _only_kept(line, keep) else "".join(map(table.__getitem__, map(ord, line)))
            for line in text.splitlines(keepends=True)
        )
    pieces: list[str] = []
    size = 0
    # past the limit nothing more is looked at: a huge text costs at most `limit` escapes
    for code in map(ord, text[: limit + 1]):
        piece = table[code]
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            return _cut(pieces, len(text), limit)
    return "".join(pieces)


class _Escapes(dict[int, str]):
    """Each character's rendering, worked out once (for the first _MEMO characters met: a
    host sending every code point must not grow it without end)."""

    def __init__(self, keep: str) -> None:
        super().__init__()
        self.keep = keep

    def __missing__(self, code: int) -> str:
        char = chr(code)
        piece = char if char.isprintable() or char in self.keep else _escape(char)
        if len(self) < _MEMO:
            self[code] = piece
        return piece


_TABLES: dict[str, _Escapes] = {}


def _table(keep: str) -> _Escapes:
    table = _TABLES.get(keep)
    if table is None:
        table = _TABLES[keep] = _Escapes(keep)
    return table


def _only_kept(text: str, keep: str) -> bool:
    """Whether every character of ``text`` is printable or in ``keep``."""
    for char in keep:
        text = text.replace(char, " ")
    return text.isprintable()


def plural(n: int, word: str) -> str:
    """``1 step``, ``3 steps``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_columns(
    header: Sequence[str], rows: Sequence[Sequence[str]], width: Callable[[str], int] = len
) -> list[str]:
    """Left-aligned columns two spaces apart, trailing blanks stripped: for pipes and logs.
    ``width`` measures a cell as the terminal shows it (the cli passes rich's cell width)."""
    table = [list(header), *(list(r) for r in rows)]
    widths = [max(width(r[c]) for r in table) for c in range(len(header))]
    return [
        "  ".join(
            cell + " " * (w - width(cell)) for cell, w in zip(r, widths, strict=True)
        ).rstrip()
        for r in table
    ]


#: json.dumps's encoder, less its check for circular values (documents are trees): one line
_LINE = json.JSONEncoder(check_circular=False)


def json_document(
    doc: Mapping[str, Any], encoded: Mapping[str, Sequence[str]] | None = None
) -> str:
    """``doc`` as JSON with a line per top-level key and per item of a top-level list (a
    plan's steps): as easy to read and diff as ``indent=2`` for such documents, and several
    times faster, as json's C encoder writes every line (indent falls back to pure Python).
    ``encoded``: lists given as their items' JSON already (json.dumps's separators)."""
    encode = _LINE.encode
    parts = []
    for key, value in doc.items():
        name = encode(key)
        items = (encoded or {}).get(key)
        if items is None and isinstance(value, list) and value:
            items = list(map(encode, value))
        if items:
            parts.append(f"  {name}: [\n    " + ",\n    ".join(items) + "\n  ]")
        else:
            parts.append(f"  {name}: {encode(value)}")
    return "{\n" + ",\n".join(parts) + "\n}"
