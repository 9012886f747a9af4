"""The sshd rig itself: accounts, per-host REX_HOME, pinned keys, and a clean teardown."""

from __future__ import annotations

import os
import pwd
import threading
import time
from collections.abc import Callable

import pytest
from sshrig import RigHost, SshdRig, unavailable_reason

from rexplan.core.model import Timeouts
from rexplan.transport.pool import connect
from rexplan.transport.ssh import SSHTransport

FAST = Timeouts(connect=3.0, start=5.0)


@pytest.mark.sshd
def test_plain_ssh_with_pinned_keys(sshd_hosts: Callable[[int], list[RigHost]]) -> None:
    hosts = sshd_hosts(2)
    assert [h.address for h in hosts] == ["127.0.0.10", "127.0.0.11"]
    for h in hosts:
        out = h.ssh(["sh", "-c", 'id -un; printf %s "$REX_HOME"'])
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode() == f"{h.login}\n{h.state_dir}"


@pytest.mark.sshd
def test_second_account_has_its_own_rex_home(sshd_rig: SshdRig) -> None:
    first, second = sshd_rig.account(0), sshd_rig.account(1)
    assert sshd_rig.account(1) == second and first.uid != second.uid
    h = sshd_rig.hosts(1)[0]
    t = connect(h.model_host(), h.model_user(login=second.login), known_hosts=h.known_hosts,
                timeouts=FAST)  # fmt: skip
    try:
        assert t.rex_home() == h.state_dir_for(second.login)
        assert t.run(["id", "-un"], timeout=5).stdout.decode().strip() == second.login
        # the accounts cannot read each other's state
        assert t.run(["ls", h.state_dir], timeout=5).exit_status != 0
    finally:
        t.close()


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@pytest.mark.sshd
def test_teardown_leaves_no_process_account_or_file() -> None:
    rig = SshdRig()
    try:
        hosts = rig.hosts(2) + rig.spawn()
        t = connect(hosts[0].model_host(), hosts[0].model_user(), known_hosts=rig.known_hosts,
                    timeouts=FAST)  # fmt: skip
        assert isinstance(t, SSHTransport)
        # a command still running in a session: teardown must end it too
        runner = threading.Thread(target=_ignore_errors, args=(t,), daemon=True)
        runner.start()
        for _ in range(200):
            if len(rig.pids()) > len(hosts) + 2:
                break
            time.sleep(0.01)
        pids = rig.pids()
        assert len(pids) > len(hosts)
    finally:
        logins = [a.login for a in rig.accounts]
        base = rig.base
        rig.close()
    t.close()
    assert not [p for p in pids if _alive(p)]
    assert set(pids) <= set(rig.dead_pids())
    for login in logins:
        with pytest.raises(KeyError):
            pwd.getpwnam(login)
    assert not base.exists()


def _ignore_errors(t: SSHTransport) -> None:
    try:
        t.run(["sleep", "30"], timeout=60)
    except Exception:
        return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.sshd
def test_stop_forgets_host_and_frees_its_address(sshd_rig: SshdRig) -> None:
    (h,) = sshd_rig.spawn()
    sshd_rig.stop(h)
    assert not _alive(h.pid)
    assert f"[{h.address}]:{h.port} " not in open(sshd_rig.known_hosts).read()
    (again,) = sshd_rig.spawn()
    try:
        assert again.address == h.address and again.host_key != h.host_key
        assert os.listdir(again.state_dir) == []
    finally:
        sshd_rig.stop(again)
