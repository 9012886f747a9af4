"""Connection persistence (``persist``, rexplan.transport.persist) against the sshd rig: the
daemon keeps the connections between runs, reuses one only while its host key is still
pinned, refuses an unsafe directory and other users, and is stopped by pid after every test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_world import SLEEPER, World
from sshrig import RigHost, SshdRig

import rexplan
from rexplan.cli.rex import main
from rexplan.core.model import Timeouts
from rexplan.errors import TransportError
from rexplan.transport import persist as mux
from rexplan.transport import persist_wire, pinning, pool
from rexplan.transport.base import Gate
from rexplan.transport.ssh import SSHTransport

pytestmark = pytest.mark.sshd

Hosts = Callable[[int], list[RigHost]]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _daemon_pid(directory: Path) -> int | None:
    try:
        return int((directory / persist_wire.PID_FILE).read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def mux_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$REX_MUX_DIR for this test (short: a socket path has at most 107 bytes); the daemon
    a test started is stopped, by its pid, afterwards."""
    base = Path(tempfile.mkdtemp(prefix="rexmux-", dir="/tmp"))
    directory = base / "mux"
    monkeypatch.setenv(persist_wire.MUX_ENV, str(directory))
    yield directory
    pid = _daemon_pid(directory)
    if pid is not None:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            if not _gone_within(pid, 10):
                os.kill(pid, signal.SIGKILL)
        assert _gone_within(pid, 10), f"persistence daemon {pid} still running"
    shutil.rmtree(base)


def _disconnect(world: World) -> tuple[int, str]:
    code = main(["disconnect"])
    out, err = world.capsys.readouterr()
    return code, out + err


def _ping(directory: Path) -> dict[str, object]:
    info = mux.MuxClient(30, str(directory)).ping()
    assert info is not None, "no daemon"
    return info


def test_persist_keeps_the_connections_between_runs(
    world: World, sshd_hosts: Hosts, mux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = sshd_hosts(2)
    names = [h.name for h in hosts]
    m = world.manifest(hosts, {"db": {"on": names, **SLEEPER}}, defaults={"persist": 30})
    world.distribute(m)

    def no_direct(*args: object, **kwargs: object) -> SSHTransport:
        raise AssertionError("the launcher connected by itself")

    monkeypatch.setattr(SSHTransport, "open", no_direct)
    first = world.apply(m)
    assert first.code == 0, first.out + first.err
    assert set(first.actions().values()) == {"started"}
    assert stat.S_IMODE(mux_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((mux_dir / persist_wire.SOCKET).stat().st_mode) == 0o600
    info = _ping(mux_dir)
    assert (info["kept"], info["opened"]) == (2, 2)
    second = world.apply(m)
    assert second.code == 0, second.out + second.err
    assert set(second.actions().values()) == {"unchanged"}
    assert second.pids() == first.pids()
    code, statuses = world.status(m)
    assert code == 0 and {s["status"] for s in statuses.values()} == {"running"}
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert world.tagged() == []
    assert _ping(mux_dir)["opened"] == 2  # apply, apply, status, stop: two connections
    pid = _daemon_pid(mux_dir)
    assert pid is not None
    code, out = _disconnect(world)
    assert code == 0 and f"daemon pid {pid}" in out
    assert _gone_within(pid, 10)
    assert not (mux_dir / persist_wire.SOCKET).exists()
    code, out = _disconnect(world)
    assert code == 0 and "no connections kept" in out


def test_persist_flag_overrides_the_manifest(
    world: World, sshd_hosts: Hosts, mux_dir: Path
) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}}, defaults={"persist": 30})
    world.distribute(m)
    run = world.apply(m, "--persist", "0")
    assert run.code == 0, run.out + run.err
    assert not mux_dir.exists()  # no daemon was started
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err


def test_unsafe_directory_is_refused_and_nothing_runs(
    world: World, sshd_hosts: Hosts, mux_dir: Path
) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}})
    world.distribute(m)
    mux_dir.mkdir(mode=0o755)
    mux_dir.chmod(0o755)
    run = world.apply(m, "--persist", "30")
    assert run.code == 3, run.out + run.err
    assert "must be a directory of mode 0700" in run.out + run.err
    assert "Traceback" not in run.out + run.err
    assert world.tagged() == []
    assert not (mux_dir / persist_wire.SOCKET).exists()


def test_a_kept_connection_is_dropped_when_its_pin_changes(
    world: World, sshd_hosts: Hosts, mux_dir: Path, tmp_path: Path
) -> None:
    (host,) = sshd_hosts(1)
    known = tmp_path / "known_hosts"
    shutil.copy(world.rig.known_hosts, known)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}}, defaults={"persist": 30})
    world.distribute(m)
    first = world.apply(m, "--known-hosts", str(known))
    assert first.code == 0, first.out + first.err
    # the pinned key for this host becomes another one
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    name = pinning.host_key_name(host.address, host.port)
    public = " ".join(Path(f"{other}.pub").read_text().split()[:2])
    known.write_text(f"{name} {public}\n")
    second = world.apply(m, "--known-hosts", str(known))
    assert second.code == 6, second.out + second.err
    assert "host key" in (second.out + second.err).lower()
    assert _ping(mux_dir)["kept"] == 0
    code, out, err = world.rex("stop", str(m), "--persist", "0")
    assert code == 0, out + err


def test_a_killed_daemon_is_replaced(world: World, sshd_hosts: Hosts, mux_dir: Path) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}}, defaults={"persist": 30})
    world.distribute(m)
    assert world.apply(m).code == 0
    pid = _daemon_pid(mux_dir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert _gone_within(pid, 10)
    assert (mux_dir / persist_wire.SOCKET).exists()  # left behind: the next client replaces it
    again = world.apply(m)
    assert again.code == 0, again.out + again.err
    assert set(again.actions().values()) == {"unchanged"}
    new = _daemon_pid(mux_dir)
    assert new is not None and new != pid and _alive(new)
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err


def test_an_idle_daemon_closes_everything_and_exits(
    world: World, sshd_hosts: Hosts, mux_dir: Path
) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}}, defaults={"persist": 1})
    world.distribute(m)
    assert world.apply(m).code == 0
    pid = _daemon_pid(mux_dir)
    assert pid is not None
    assert _gone_within(pid, 20)
    assert not (mux_dir / persist_wire.SOCKET).exists()
    assert not (mux_dir / persist_wire.PID_FILE).exists()
    code, out, err = world.rex("stop", str(m), "--persist", "0")
    assert code == 0, out + err


#: an interpreter another user may run (the test's own may live under /root)
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
def test_another_user_gets_no_answer(
    world: World, sshd_hosts: Hosts, mux_dir: Path, sshd_rig: SshdRig
) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}}, defaults={"persist": 30})
    world.distribute(m)
    assert world.apply(m).code == 0
    # open the door on purpose: only the SO_PEERCRED check is left
    mux_dir.parent.chmod(0o711)
    mux_dir.chmod(0o711)
    (mux_dir / persist_wire.SOCKET).chmod(0o666)
    probe = (
        "import socket, struct, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        'body = b\'{"op":"ping"}\'\n'
        "s.settimeout(10)\n"
        "try:\n"
        "    s.sendall(struct.pack('>I', len(body)) + body)\n"
        "    got = s.recv(100)\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    got = b''  # closed before or after the frame arrived\n"
        "sys.stdout.write('closed' if got == b'' else repr(got))\n"
    )
    account = sshd_rig.account(0)
    out = subprocess.run(
        [SYSTEM_PYTHON, "-c", probe, str(mux_dir / persist_wire.SOCKET)],
        user=account.uid,
        group=account.gid,
        capture_output=True,
        timeout=30,
    )
    assert out.stdout == b"closed", out.stderr  # without a word
    mux_dir.chmod(0o700)
    (mux_dir / persist_wire.SOCKET).chmod(0o600)
    assert _ping(mux_dir)["kept"] == 1  # and the daemon serves its own user still
    code, out2, err = world.rex("stop", str(m))
    assert code == 0, out2 + err


def test_bad_frames_get_no_answer_and_break_nothing(mux_dir: Path) -> None:
    client = mux.MuxClient(30, str(mux_dir))
    for frame in (b"\xff\xff\xff\xff", struct.pack(">I", 3) + b"[1]", struct.pack(">I", 2) + b"{"):
        with client.connect() as sock:
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)  # a truncated frame ends here
            sock.settimeout(30)
            assert sock.recv(100) == b""
    reply = client.request({"op": "call", "method": "exec"}, 10)
    assert reply == {"ok": False, "error": {"type": "TransportError", "message": "bad request"}}
    pid = client.stop()
    assert pid is not None and _gone_within(pid, 10)


def test_abort_never_sends_a_held_launch(sshd_hosts: Hosts, tmp_path: Path) -> None:
    """A caller gone (the daemon's client hung up) cancels a run whose stdin waits for its
    gate: the channel closes and the line is never sent."""
    (host,) = sshd_hosts(1)
    t = pool.connect(
        host.model_host(), host.model_user(), known_hosts=host.known_hosts, timeouts=Timeouts()
    )
    assert isinstance(t, SSHTransport)
    sink = tmp_path / "got"
    try:
        abort = threading.Event()
        threading.Timer(0.3, abort.set).start()
        with pytest.raises(TransportError) as e:
            t.run(
                ["sh", "-c", f"sleep 2; cat > {sink}"],
                stdin=b"the launch line\n",
                timeout=30,
                gate=Gate(b"never-printed", 20),
                abort=abort,
            )
        assert "cancelled" in str(e.value) and e.value.phase == "exec"
    finally:
        t.close()
    time.sleep(2.5)  # what the command would have done by now
    assert not sink.exists() or sink.read_bytes() == b""


# --- the daemon's imports and start (security issue, hole 4) -----------------------------------


def test_the_daemon_never_imports_from_the_current_directory(
    world: World,
    sshd_hosts: Hosts,
    mux_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"db": {"on": [host.name], **SLEEPER}}, defaults={"persist": 30})
    world.distribute(m)
    # a directory someone else prepared, where the user runs rex apply --persist
    trap = tmp_path / "trap"
    (trap / "rexplan").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (trap / "rexplan" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(trap)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    assert not marker.exists()
    pid = _daemon_pid(mux_dir)
    assert pid is not None
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1] == b"-I" and os.readlink(f"/proc/{pid}/cwd") == "/"
    # the daemon serves later runs from anywhere, and imports nothing from here either
    again = world.apply(m)
    assert again.code == 0 and set(again.actions().values()) == {"unchanged"}
    assert not marker.exists()
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err


def test_a_daemon_that_dies_at_once_is_reported_with_its_status_and_log(
    mux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an interpreter that cannot run the daemon: it complains (with a control sequence) and exits
    broken = tmp_path / "python3"
    broken.write_text(
        "#!/bin/sh\nprintf 'daemon: cannot import rexplan\\033]0;owned\\007\\n' >&2\nexit 3\n"
    )
    broken.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(broken))
    with pytest.raises(persist_wire.MuxError) as info:
        mux.MuxClient(30, str(mux_dir)).connect()
    message = str(info.value)
    assert "did not start: it exited (status 3)" in message, message
    assert "cannot import rexplan\\x1b]0;owned\\x07" in message
    assert "\x1b" not in message and "no answer" not in message


def test_the_daemon_path_holds_nothing_named_by_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "here"
    (here / "lib").mkdir(parents=True)
    (tmp_path / "link").symlink_to(here)
    monkeypatch.chdir(here)
    kept = ["/usr/lib/python3/dist-packages", str(tmp_path / "elsewhere")]
    given = ["", ".", "lib", str(here), str(tmp_path / "link"), kept[0], "./x", kept[1]]
    monkeypatch.setattr(sys, "path", given)
    root = os.path.dirname(os.path.dirname(os.path.abspath(rexplan.__file__)))
    assert mux.daemon_path() == [root, *kept]
