"""Manifest loading: capped YAML 1.2 with positions -> JSON Schema -> semantic checks -> records."""

from __future__ import annotations

import hashlib
import os
import re

from rexplan.core.checks import Checker
from rexplan.core.model import Manifest
from rexplan.core.schema import check, show
from rexplan.core.values import as_str
from rexplan.core.yamlpos import Fatal, Pos, Report, Retry, compose
from rexplan.errors import Diagnostic, ManifestError

#: largest manifest read, in bytes
MAX_BYTES = 5 * 1024 * 1024

# YAML's printable set, less TAB/LF/CR; libyaml reports these as byte offsets, so find them first
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


def _locate(text: str, index: int) -> Pos:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _decode(raw: bytes, report: Report) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = raw[: exc.start].decode("utf-8")
        raise report.fatal(
            _locate(good, len(good)),
            (),
            f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8",
            "save the manifest as UTF-8",
        ) from None


def _text(data: bytes | str, raw: bytes, filename: str) -> str:
    """The manifest as text, once its size, encoding and characters are acceptable."""
    report = Report(filename)
    try:
        if len(raw) > MAX_BYTES:
            raise report.fatal(
                (1, 1),
                (),
                f"the manifest is larger than {MAX_BYTES // (1024 * 1024)} MiB",
                "split it, or describe hosts with ranges such as node[001-999]",
            )
        text = data if isinstance(data, str) else _decode(raw, report)
        bad = _UNPRINTABLE.search(text)
        if bad:
            raise report.fatal(
                _locate(text, bad.start()),
                (),
                f"character U+{ord(bad.group()):04X} is not allowed in YAML",
                "remove the control character (write it with an escape in a quoted string)",
            )
    except Fatal:
        raise ManifestError(report.items) from None
    return text


def _validate(text: str, raw: bytes, filename: str, track: bool) -> Manifest:
    report = Report(filename, track=track)
    try:
        doc = compose(text, report)
    except Fatal:
        raise ManifestError(_ordered(report.items)) from None
    if not isinstance(doc, dict):
        report.value(
            (),
            f"the manifest must be a mapping, not {show(doc)}",
            "start the manifest with 'rex: 1', then hosts:, users:, programs:, authorize:",
        )
        raise ManifestError(_ordered(report.items))
    check(doc, report)
    checker = Checker(doc, report, os.path.dirname(os.path.abspath(filename)))
    callback, forks = checker.run()
    if report.items:
        raise ManifestError(_ordered(report.items))
    return Manifest(
        path=filename,
        digest=hashlib.sha256(raw).hexdigest(),
        hosts=tuple(checker.hosts),
        users=tuple(checker.users.values()),
        programs=tuple(checker.programs),
        authorize=tuple(a for a, _, _, _ in checker.authorize),
        callback=callback,
        forks=forks,
        default_user=as_str(checker.defaults.get("user"), None),
        strategy=checker.strategy,
        fanout=checker.fanout,
        relay_identity=checker.relay_identity,
        persist=checker.persist(),
        name=manifest_name(as_str(doc.get("name"), None), filename),
    )


def manifest_name(declared: str | None, filename: str) -> str:
    """A manifest's name: its ``name:``, else its file's stem with every character a manifest
    name cannot hold replaced by '_' (at most 64; ``manifest`` when nothing is left)."""
    if declared:
        return declared
    stem = os.path.splitext(os.path.basename(filename))[0]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:64].lstrip(".-")
    return safe or "manifest"


def loads(data: bytes | str, filename: str = "<string>") -> Manifest:
    """Validate a manifest given as bytes or text; ``filename`` names it in diagnostics.

    Raises ManifestError carrying every problem found (YAML, schema and semantic) at once.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    text = _text(data, raw, filename)
    try:
        return _validate(text, raw, filename, track=False)
    except Retry:
        return _validate(text, raw, filename, track=True)


def load(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate the manifest file at ``path``; raises ManifestError."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ManifestError(
            [Diagnostic(filename, 1, 1, "", f"cannot read the manifest: {exc.strerror or exc}")]
        ) from None
    return loads(raw, filename)


def _ordered(items: list[Diagnostic]) -> list[Diagnostic]:
    unique = list(dict.fromkeys(items))
    return sorted(unique, key=lambda d: (d.line, d.col, d.path))
