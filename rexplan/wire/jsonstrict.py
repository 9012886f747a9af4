"""Strict JSON over json's C half: no duplicate keys, no NaN or Infinity, one object a message.

json's C half is used as json.loads and json.dumps use it, without importing the json package:
it imports re, and re imports enum, functools and collections, a quarter of an agent start's CPU.
"""

from __future__ import annotations

import math

from rexplan.wire.codes import MALFORMED, FrameError

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

try:
    import _json

    _cjson: Any = _json
except ImportError:  # an interpreter without it: the json package then
    _cjson = None


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


def parse_object(data: bytes) -> dict[str, Any]:
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


def encode_object(obj: Mapping[str, Any]) -> bytes:
    """Compact ASCII JSON of one object; raises ValueError on NaN or Infinity."""
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
