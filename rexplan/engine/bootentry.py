"""The boot entry of each login that runs ``autostart`` programs (issue 20, part 6).

After ``rex apply`` and ``rex stop`` the launcher asks the agent's file in the login's REX_HOME
to bring the login's boot entry in line with its records (agent ``--boot-entry``, see
rexplan/remote/agent/boot.py): installed while an autostart program is left to resume,
removed when none is. apply asks the logins with an autostart step in its plan and those where
it restarted a step (a changed program may have dropped ``autostart``); stop asks every login
it stopped a step of. A login where neither ``systemctl --user`` nor ``crontab`` works gets a
warning naming its host: its autostart programs will not come back after a reboot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from rexplan.core.model import Manifest, Step
from rexplan.core.text import printable
from rexplan.engine.agentctl import EXEC_SLACK
from rexplan.errors import TransportError
from rexplan.transport.base import last_report
from rexplan.transport.pool import TransportPool
from rexplan.transport.shipping import agent_name

#: seconds the agent's --boot-entry may take beyond the connection (systemctl, crontab)
ENTRY_TIMEOUT = 60.0


def logins(steps: Iterable[Step]) -> list[Step]:
    """The first step of each host and login among ``steps``."""
    first: dict[tuple[str, str], Step] = {}
    for s in steps:
        first.setdefault((s.host, s.login), s)
    return list(first.values())


def sync(manifest: Manifest, step: Step, pool: TransportPool) -> str | None:
    """Bring the boot entry of ``step``'s login on its host in line with its records; a
    warning to show, or None. Nothing when rex never left its agent there."""
    host = manifest.host(step.host)
    where = f"{step.login}@{step.host}"
    try:
        transport = pool.get(host, manifest.user(step.user))
        agent = f"{transport.rex_home()}/{agent_name()}"
        if transport.stat(agent) is None:
            return None
        res = transport.run(
            [host.python, "-I", "-S", agent, "--boot-entry"], timeout=ENTRY_TIMEOUT + EXEC_SLACK
        )
    except (TransportError, OSError) as exc:
        return f"cannot update the boot entry of {where}: {exc}"
    report = last_report(res.stdout)
    if report.get("ok") is not True:
        why = report.get("reason") or f"exit {res.exit_status}"
        return f"cannot update the boot entry of {where}: {printable(str(why), 200)}"
    wanted = report.get("wanted")
    if wanted and report.get("entry") is None:
        return (
            f"host {step.host}: no boot entry for {where} (neither systemctl --user nor "
            "crontab works there): its autostart programs will not come back after a reboot"
        )
    return None


def sync_all(
    manifest: Manifest,
    steps: Sequence[Step],
    pool: TransportPool,
    warn: Callable[[str, str], None],
    *,
    forks: int = 64,
) -> None:
    """``sync`` each login of ``steps`` in parallel; ``warn(host, text)`` for each warning."""
    targets = logins(steps)
    if not targets:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(targets)))) as workers:
        for step, text in zip(
            targets, workers.map(lambda s: sync(manifest, s, pool), targets), strict=True
        ):
            if text is not None:
                warn(step.host, text)
