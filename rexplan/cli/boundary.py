"""The error boundary of ``rex`` and ``rex_key``: expected errors as a message and a hint, an
interrupt as 130, a closed pipe quietly, anything else as one line and a traceback log file."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from rexplan import __version__
from rexplan.core.text import plural, printable
from rexplan.errors import ManifestError, RexError

#: characters one error message (or one log record) may show
MESSAGE_LIMIT = 4000


def write_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def format_error(error: RexError, prog: str = "rex") -> str:
    """What the user sees for an expected error: no traceback, a hint when one is known.

    A ManifestError shows every diagnostic, then a count per file. Every message goes through
    rexplan.core.text.printable: it may quote a host or a manifest.
    """
    diagnostics = error.diagnostics if isinstance(error, ManifestError) else ()
    if diagnostics:
        lines = [printable(d.format(), MESSAGE_LIMIT, keep="\n") for d in diagnostics]
        per_file: dict[str, int] = {}
        for d in diagnostics:
            per_file[d.file] = per_file.get(d.file, 0) + 1
        lines += [
            f"{prog}: error: {plural(n, 'error')} in {printable(f)}" for f, n in per_file.items()
        ]
    else:
        # an error may quote a host (an SSH failure, the persistence daemon's log)
        message = printable(str(error), MESSAGE_LIMIT, keep="\n")
        lines = [f"{prog}: error: {message}"]
    if error.hint:
        lines.append(f"  hint: {printable(error.hint, MESSAGE_LIMIT)}")
    return "\n".join(lines)


def state_log_dirs() -> list[Path]:
    """``$XDG_STATE_HOME/rex`` (default ``~/.local/state/rex``), then the temporary directory."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return [Path(state) / "rex", Path(tempfile.gettempdir())]


def temp_log_dirs() -> list[Path]:
    """The temporary directory only."""
    return [Path(tempfile.gettempdir())]


def log_internal_error(
    error: BaseException, prog: str, argv: Sequence[str], directories: Sequence[Path]
) -> str:
    """Write the traceback to a new log file in the first of ``directories`` that takes it;
    its path, or a reason it could not be written."""
    text = f"{prog} {__version__}\nargv: {list(argv)}\n\n" + "".join(
        traceback.format_exception(type(error), error, error.__traceback__)
    )
    for directory in directories:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(
                prefix=f"{prog}-internal-error-", suffix=".log", dir=directory
            )
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            continue
        return path
    return "no log file could be written"


def run_main(
    prog: str,
    body: Callable[[Sequence[str]], int],
    argv: Sequence[str],
    *,
    log_dirs: Callable[[], list[Path]] = state_log_dirs,
    name_internal_error: bool = True,
) -> int:
    """``body(argv)``'s exit code, or the one of the error it raised, shown on stderr without
    a traceback. ``name_internal_error``: the internal-error line names the exception (rex);
    rex_key's line only points at the log file."""
    try:
        return body(argv)
    except RexError as e:
        write_stderr(format_error(e, prog))
        return e.exit_code
    except KeyboardInterrupt:
        write_stderr(f"{prog}: interrupted")
        return 130
    except BrokenPipeError:
        # the reader went away (`rex plan ... | head`); silence the flush at exit, as cat does
        _silence_stdout()
        return 141
    except Exception as e:
        where = log_internal_error(e, prog, argv, log_dirs())
        if name_internal_error:
            what = printable(f"{type(e).__name__}: {e}")
            write_stderr(f"{prog}: internal error: {what} (traceback in {where})")
        else:
            write_stderr(f"{prog}: internal error (details in {where})")
        return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        # stdout is not a real file (tests, embedding): nothing will flush into a closed pipe
        return
