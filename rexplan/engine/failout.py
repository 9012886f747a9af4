"""What a failed step shows besides its reason: the last lines of its program's output, where
the whole log is on the host (``host:path``), and what to run next (the hint).

The output comes from the host (the agent's failure report, or a job's authenticated output
frames): it is cut to ``--tail`` lines and wire.jobs.FAIL_TAIL characters and escaped with
core.text.printable line by line. Hints name the manifest path the run was given, so they can
be pasted as they are."""

from __future__ import annotations

import shlex

from rexplan.core.model import Step
from rexplan.core.text import LIMIT, printable
from rexplan.errors import HostKeyError, KeyStoreError, TransportError
from rexplan.wire import jobs

#: lines of output a failed step shows unless ``rex apply --tail N`` says otherwise
DEFAULT_TAIL = 10


def last_lines(text: str | None, lines: int) -> str | None:
    """The last ``lines`` lines of ``text`` (at most FAIL_TAIL characters, each line escaped),
    joined by newlines; None when there is nothing to show."""
    if not text or lines <= 0:
        return None
    kept = text.rstrip("\n").split("\n")[-lines:]
    shown = [printable(line.rstrip("\r"), None) for line in kept]
    while len(shown) > 1 and sum(len(line) + 1 for line in shown) > jobs.FAIL_TAIL:
        shown.pop(0)
    out = "\n".join(shown)[-jobs.FAIL_TAIL :]
    return out if out.strip() else None


def log_place(host: str, diag: dict[str, object]) -> str | None:
    """``host:path`` of the program log the agent reported, or None."""
    path = diag.get("log")
    if not isinstance(path, str) or not path.startswith("/"):
        return None
    return f"{host}:{printable(path, LIMIT)}"


def _m(manifest_path: str) -> str:
    return shlex.quote(manifest_path)


def connect_hint(exc: TransportError, step: Step, manifest_path: str) -> str | None:
    """What to run after a connect that failed on the host key (or the hint it carries)."""
    if isinstance(exc, HostKeyError):
        m = _m(manifest_path)
        if "CHANGED" in str(exc):
            return (
                f"rex hostkeys verify -m {m} shows which keys changed; if {step.host} was "
                f"really rebuilt, pin its new key: rex hostkeys scan -m {m} --replace {step.host}"
            )
        return f"check the fingerprint, then pin it: rex hostkeys scan -m {m} --accept"
    return exc.hint


def key_hint(exc: KeyStoreError, step: Step) -> str | None:
    """What to run when the launcher has no key (or an unsafe one) for the step's triple."""
    if exc.hint:
        return exc.hint
    return f"create one with: rex_key create {step.triple}"


def launch_hint(
    reason: str,
    step: Step,
    diag: dict[str, object],
    manifest_path: str,
    dialled: tuple[str, int] | None,
) -> str | None:
    """What to run or change after a launch that was not verified, by its reason."""
    m = _m(manifest_path)
    if reason == "no_key":  # the agent found no key for the triple on the host
        return f"put the key on the host: rex_key distribute -m {m}"
    if reason == "bad_proof":
        return f"the host holds another key for {step.triple}: rex_key distribute -m {m}"
    if reason == "exited" and diag.get("status") == 0 and step.kind == "service":
        return (
            f"{step.program} exited 0 before it was ready: it daemonized (forked into the "
            "background). Keep it in the foreground: nginx 'daemon off;', supervisord "
            "--nodaemon, redis --daemonize no, most servers -f or --foreground"
        )
    if reason == "no_callback" and dialled is not None and diag.get("exit") == 14:
        where = f"{dialled[0]}:{dialled[1]}"
        return (
            f"the agent on {step.host} dialled {where} and got no answer: make {where} "
            f"reachable from {step.host} (firewall, NAT), or set callback.advertise / "
            f"callback.via in {m}"
        )
    return None
