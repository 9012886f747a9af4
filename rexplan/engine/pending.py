"""What the callback listener keeps per launched step: its expectation, its verdict, the
attempts it rejected meanwhile and a job's output and result."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rexplan.wire import codes, handshake, jobs, keyfile

CANCELLED = "CANCELLED"  # verdict only: the launcher gave up on the step (or closed)
EXITED = "EXITED"  # a job's result: it sent its exit status
LOST = "LOST"  # a job's result: its connection ended or broke the protocol first

#: distinct rejected attempts a step keeps for its failure's detail (more are only counted)
KEPT_REJECTIONS = 4


@dataclass(frozen=True)
class PendingStep:
    """A launched step the listener waits for; ``deadline`` is on the listener's clock."""

    step_id: str
    triple: str
    key: bytes = field(repr=False)
    key_id: str
    nl: bytes = field(repr=False)
    deadline: float
    job: bool = False  # keep the connection after ok for the job's output and exit status

    @classmethod
    def create(
        cls,
        step_id: str,
        triple: str,
        key: bytes,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> PendingStep:
        """A step with a fresh launch nonce, due ``timeout`` seconds from now."""
        return cls(
            step_id, triple, key, keyfile.key_id(key), handshake.new_nonce(), clock() + timeout
        )


@dataclass(frozen=True)
class Verdict:
    """How a step ended: ``ok`` with the agent's claims, or a result code."""

    ok: bool
    code: str
    pid: int | None = None
    pgid: int | None = None
    start: str | None = None
    peer: tuple[str, int] | None = None
    ref: str | None = None
    #: DECLINED: the reason the agent proved; TIMEOUT: the attempts rejected meanwhile
    detail: str | None = None


@dataclass(frozen=True)
class JobResult:
    """How a job ended: EXITED with its status, or LOST; ``output`` is its output's tail."""

    code: str
    status: int | None = None
    output: bytes = b""
    detail: str = ""


class StepState:
    """The listener's record of one expected step; changed under the listener's lock."""

    __slots__ = (
        "cut",
        "job",
        "k_a",
        "k_l",
        "output",
        "pending",
        "rejected",
        "rejections",
        "verdict",
    )

    def __init__(self, pending: PendingStep) -> None:
        self.pending = pending
        self.k_l, self.k_a = handshake.direction_keys(pending.key)
        self.verdict: Verdict | None = None
        self.job: JobResult | None = None
        self.output = bytearray()
        self.rejected = 0  # attempts that named this step and proved nothing
        self.rejections: Counter[str] = Counter()  # the first KEPT_REJECTIONS kinds of them
        self.cut = 0  # bytes of a job's output dropped past jobs.OUT_TAIL

    def reject(self, what: str) -> None:
        """Under the lock: keep a rejected attempt as detail; it decides nothing."""
        self.rejected += 1
        if what in self.rejections or len(self.rejections) < KEPT_REJECTIONS:
            self.rejections[what] += 1

    def rejected_text(self) -> str | None:
        """``3 rejected attempts: wrong key_id ... from 127.0.0.5 (x2), ...``; None if none."""
        if not self.rejected:
            return None
        kinds = [what if n == 1 else f"{what} (x{n})" for what, n in self.rejections.items()]
        others = self.rejected - sum(self.rejections.values())
        if others:
            kinds.append(f"{others} more")
        plural = "s" if self.rejected != 1 else ""
        return f"{self.rejected} rejected attempt{plural}: {', '.join(kinds)}"

    def take(self, data: bytes) -> None:
        """Keep the last jobs.OUT_TAIL bytes of a job's output (an agent sends no more)."""
        self.output += data
        extra = len(self.output) - jobs.OUT_TAIL
        if extra > 0:
            del self.output[:extra]
            self.cut += extra

    def tail(self) -> bytes:
        """The output kept, opened by the line that says how much of it was dropped."""
        return (jobs.cut_line(self.cut) if self.cut else b"") + bytes(self.output)


def rejection(code: str, hello: dict[str, Any], key_id: str, source: str) -> str:
    """How a rejected attempt on a step reads in its failure: validated hello fields only."""
    what = {
        codes.WRONG_KEY: f"wrong key_id {hello.get('key_id')} (expected {key_id})",
        codes.WRONG_TRIPLE: f"wrong triple {str(hello.get('triple'))[:64]}",
        codes.BAD_PROOF: "a proof that did not verify",
    }.get(code, code)
    return f"{what} from {source}"
