"""Key files (``rex-key 1``: a triple, its creation time, a 32-byte secret), key ids and paths."""

from __future__ import annotations

import binascii

from rexplan.wire.chars import B64_RE, HOST_RE, NAME_RE
from rexplan.wire.crypto import sha256

KEY_BYTES = 32
KEY_MAGIC = "rex-key 1"


class KeyFormatError(ValueError):
    """A key file's text is not a valid rex key."""


def key_id(secret: bytes) -> str:
    """Short public fingerprint of a key, shown everywhere instead of the secret."""
    return sha256(b"rex key id\0" + secret).hexdigest()[:16]


def key_relpath(host: str, user: str, program: str | None) -> str:
    """Path of a key inside a key store (local or remote), one directory per component.

    ``<host>/<user>.key`` for a host.user key, ``<host>/<user>/<program>.key`` for a program
    key. Components are validated so no name can climb out of the store.
    """
    if not HOST_RE.match(host) or host in (".", ".."):
        raise KeyFormatError(f"invalid host name {host!r}")
    if not NAME_RE.match(user):
        raise KeyFormatError(f"invalid user name {user!r}")
    if program is None:
        return f"{host}/{user}.key"
    if not NAME_RE.match(program):
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
        if not B64_RE.match(fields["secret"]):
            raise ValueError(fields["secret"])
        secret = binascii.a2b_base64(fields["secret"])
    except ValueError:
        raise KeyFormatError("key secret is not base64") from None
    if len(secret) != KEY_BYTES:
        raise KeyFormatError("key secret is not 32 bytes")
    return fields["triple"], fields["created"], secret
