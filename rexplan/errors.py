"""The rex exception tree; a leaf module that imports nothing from rexplan.

    RexError                      exit 1   base; anything unexpected is reported as internal
    ├── UsageError                exit 5   bad command line
    ├── ManifestError             exit 4   manifest unreadable or invalid (carries Diagnostics)
    │   └── PlanError             exit 4   the manifest cannot be compiled into a plan
    ├── KeyStoreError             exit 6   key missing, unreadable, or insecure on disk
    ├── InsecurePathError         exit 6   .rex/runs a symlink, another user's, or writable
    ├── TransportError            exit 3   a host could not be used
    │   ├── UnreachableError      exit 3   refused, no route, DNS, connect deadline
    │   ├── HostTimeoutError      exit 3   connected but a phase deadline passed (banner, exec)
    │   ├── AuthenticationError   exit 6   the host refused our credentials
    │   └── HostKeyError          exit 6   host key unknown or changed (never auto-added)
    ├── ProtocolError             exit 2   a callback frame broke rex-cb/1
    ├── StepFailedError           exit 2   a step failed (the run summary names the reason)
    └── InterruptedRunError       exit 130 Ctrl-C

Every class has an ``exit_code`` and an optional ``hint`` (what to do next); the CLI error
boundary prints ``str(error)`` and the hint, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnostic:
    """One problem at a position in a file: ``FILE:LINE:COL: key.path: message``.

    ``line`` 0 means the problem has no position (plan errors, a command-line option): the
    text is then ``FILE: key.path: message``.
    """

    file: str
    line: int
    col: int
    path: str
    message: str
    hint: str | None = None

    def format(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class RexError(Exception):
    """Base of every error rex reports on purpose."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str = "", *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(RexError):
    """The command line is wrong."""

    exit_code = 5


class ManifestError(RexError):
    """The manifest cannot be read or is invalid; carries every problem found in one pass."""

    exit_code = 4

    def __init__(
        self, diagnostics: list[Diagnostic] | tuple[Diagnostic, ...], *, hint: str | None = None
    ) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.format() for d in self.diagnostics), hint=hint)


class PlanError(ManifestError):
    """The manifest is valid but cannot be compiled into launch waves."""


class KeyStoreError(RexError):
    """A key is missing, unreadable, malformed or stored insecurely."""

    exit_code = 6


class InsecurePathError(RexError):
    """A place rex keeps state in (.rex/runs) is a symlink, another user's, or writable by
    others, or a directory above it is: refused, as ssh's StrictModes."""

    exit_code = 6


class TransportError(RexError):
    """A host could not be used; ``host`` and ``phase`` say which and when."""

    exit_code = 3

    def __init__(
        self, message: str, *, host: str = "", phase: str = "", hint: str | None = None
    ) -> None:
        self.host = host
        self.phase = phase
        prefix = f"{host}: {phase}: " if host and phase else (f"{host}: " if host else "")
        super().__init__(prefix + message, hint=hint)


class UnreachableError(TransportError):
    """The host did not accept a TCP connection in time (refused, no route, timeout)."""


class HostTimeoutError(TransportError):
    """The host connected but a later phase (banner, auth, exec) passed its deadline."""


class AuthenticationError(TransportError):
    """The host refused rex's credentials."""

    exit_code = 6


class HostKeyError(TransportError):
    """The host's key is not pinned in known_hosts, or differs from the pinned one."""

    exit_code = 6


class ProtocolError(RexError):
    """A callback connection broke the rex-cb/1 protocol; ``code`` is the logged result code."""

    exit_code = 2

    def __init__(self, code: str, message: str = "") -> None:
        self.code = code
        super().__init__(f"{code}: {message}" if message else code)


class StepFailedError(RexError):
    """At least one step failed."""

    exit_code = 2


class InterruptedRunError(RexError):
    """The run was interrupted (Ctrl-C); what was starting has been stopped."""

    exit_code = 130
