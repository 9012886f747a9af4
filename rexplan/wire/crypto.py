"""SHA-256, HMAC-SHA256 and the constant-time comparison of MACs, from the interpreter's builtins.

The agent imports this on every launch, so it takes the builtin SHA-256 and HMAC's
constant-time comparison directly: importing hashlib or hmac loads OpenSSL, which costs an
agent start more CPU than all it then does with digests.
"""

from __future__ import annotations

from _operator import _compare_digest

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from hashlib import sha256 as sha256
else:
    try:
        from _sha2 import sha256  # Python >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # before 3.12
        except ImportError:  # an interpreter built without its own SHA-256
            from hashlib import sha256

#: the constant-time comparison of MACs: hmac.compare_digest as the hmac module defines it
#: without OpenSSL (with OpenSSL it is CRYPTO_memcmp, equally constant-time)
compare_digest = _compare_digest

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


def mac_of(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of ``parts`` joined."""
    return hmac_sha256(key, b"".join(parts))
