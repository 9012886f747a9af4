"""rex-cb/1's result codes (every callback attempt is logged with exactly one) and FrameError."""

from __future__ import annotations

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


class FrameError(ValueError):
    """A frame or message broke rex-cb/1; ``code`` is the result code to log."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
