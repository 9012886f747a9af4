"""The start of the agent bundle: its modules' code, compiled once per uploaded file.

Compiling the sources costs more than the rest of a short run: a bundle run as a file keeps
their code next to it (FILE.<cache_tag>.code, 0600), checked by the sources' sha256.
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import CodeType


def _rex_codes(
    sha: str, sources: "tuple[tuple[str, str, str], ...]"
) -> "tuple[tuple[str, CodeType], ...]":
    import marshal
    import os

    tag = getattr(sys.implementation, "cache_tag", None)
    path = globals().get("__file__")
    cache = f"{path}.{tag}.code" if path and tag else None
    if cache is not None:
        try:
            with open(cache, "rb") as f:
                cached, codes = marshal.loads(f.read())  # noqa: S302 (our own 0600 file)
            if cached == sha:
                return codes  # type: ignore[no-any-return]
        except (OSError, EOFError, ValueError, TypeError):
            pass
    codes = tuple(
        (name, compile(source, "<rex-bundle>/" + file, "exec")) for name, file, source in sources
    )
    if cache is not None:
        tmp = f"{os.path.dirname(cache)}/.{os.path.basename(cache)}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                marshal.dump((sha, codes), f)
            os.replace(tmp, cache)
        except (OSError, ValueError):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return codes
