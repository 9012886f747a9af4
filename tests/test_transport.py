"""The transport seam against real sshds (the rig) and on this machine."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import resource
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from helpers_world import World
from sshrig import RigHost, SshdRig

from rexplan.core import schema
from rexplan.core.model import Host, Timeouts, User
from rexplan.errors import (
    AuthenticationError,
    HostKeyError,
    HostTimeoutError,
    TransportError,
    UnreachableError,
)
from rexplan.transport import base, handshake
from rexplan.transport.base import Gate, Result, Transport, command_line
from rexplan.transport.local import LocalTransport
from rexplan.transport.pinning import HostKeyInfo, host_key_status
from rexplan.transport.pool import TransportPool, connect
from rexplan.transport.scan import scan_host_key
from rexplan.transport.ssh import SSHTransport

FAST = Timeouts(connect=3.0, start=5.0)
ECHO_ARGV = "import json, sys; sys.stdout.write(json.dumps(sys.argv[1:]))"
NASTY = [
    "; touch {s}",
    "$(touch {s})",
    "`touch {s}`",
    "a'b\"c\\d",
    "line1\nline2\n",
    "",
    "  spaced  ",
    "*",
    "~",
    "-n",
    "&& touch {s} ||",
    "é ✓",
    "$HOME ${{PATH}} {{}}",
]


def _connect(host: RigHost, **kw: object) -> SSHTransport:
    kw.setdefault("known_hosts", host.known_hosts)
    kw.setdefault("timeouts", FAST)
    t = connect(host.model_host(), host.model_user(), **kw)  # type: ignore[arg-type]
    assert isinstance(t, SSHTransport)
    return t


@pytest.fixture(scope="module")
def host(sshd_rig: SshdRig) -> RigHost:
    return sshd_rig.hosts(1)[0]


@pytest.fixture(scope="module")
def ssh(host: RigHost) -> Iterator[SSHTransport]:
    t = _connect(host)
    yield t
    t.close()


Hosts = Callable[[int], list[RigHost]]
Spawn = Callable[[], RigHost]


@pytest.fixture
def scratch(host: RigHost, request: pytest.FixtureRequest) -> Iterator[str]:
    """A per-test path (not created) under the host's REX_HOME; the rig runs on this machine."""
    path = os.path.join(host.state_dir, "t-" + request.node.name[:40])
    yield path
    subprocess.run(["rm", "-rf", "--", path], check=True)


def _mkdir(ssh: SSHTransport, path: str) -> None:
    # created by the account, so an injected `touch` in it would succeed and be seen
    assert ssh.run(["mkdir", "-p", path], timeout=5).exit_status == 0


# --- run -------------------------------------------------------------------------------------


@pytest.mark.sshd
def test_stdin_round_trip(ssh: SSHTransport) -> None:
    data = b"hello\x00world\n" * 3
    assert ssh.run(["cat"], stdin=data, timeout=5) == Result(0, data, b"")


@pytest.mark.sshd
def test_argv_reaches_remote_byte_for_byte(ssh: SSHTransport, scratch: str) -> None:
    sentinel = os.path.join(scratch, "pwned")
    _mkdir(ssh, scratch)
    args = [a.format(s=sentinel) for a in NASTY]
    result = ssh.run(["python3", "-c", ECHO_ARGV, *args], timeout=5)
    assert result.exit_status == 0, result.stderr
    assert json.loads(result.stdout) == args
    assert not os.path.exists(sentinel)


@pytest.mark.sshd
def test_env_values_are_quoted(ssh: SSHTransport, scratch: str) -> None:
    _mkdir(ssh, scratch)
    value = f"a b; touch {scratch}/x $(touch {scratch}/y) 'q\""
    result = ssh.run(["sh", "-c", 'printf %s "$REX_T"'], env={"REX_T": value}, timeout=5)
    assert result.stdout.decode() == value
    assert os.listdir(scratch) == []


@pytest.mark.sshd
def test_exit_status_and_stderr(ssh: SSHTransport) -> None:
    result = ssh.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=5)
    assert result == Result(7, b"out\n", b"err\n")
    assert ssh.run(["no-such-program-rex"], timeout=5).exit_status == 127
    # the login shell itself killed: sshd reports exit-signal, not a status
    assert ssh.run(["sh", "-c", "kill -9 $PPID"], timeout=5).exit_status == -1


@pytest.mark.sshd
def test_large_stdin_stdout_stderr_do_not_deadlock(ssh: SSHTransport) -> None:
    # more than paramiko's 2 MiB window each way, stdout and stderr interleaved
    data = os.urandom(3 * 1024 * 1024)
    script = (
        "import sys\n"
        "d = sys.stdin.buffer.read()\n"
        "for i in range(0, len(d), 65536):\n"
        "    sys.stdout.buffer.write(d[i:i+65536]); sys.stderr.buffer.write(d[i:i+65536])\n"
    )
    result = ssh.run(["python3", "-c", script], stdin=data, timeout=30)
    assert result.exit_status == 0
    # what a Result keeps is the tail of each stream, the rest counted
    tail, cut = data[-base.OUTPUT_TAIL :], len(data) - base.OUTPUT_TAIL
    assert (result.stdout, result.stdout_cut) == (tail, cut)
    assert (result.stderr, result.stderr_cut) == (tail, cut)


#: a command writing 300 MB to stdout, then 300 MB to stderr, then a last line on each
FLOOD = (
    "head -c 300000000 /dev/zero; head -c 300000000 /dev/zero >&2; "
    "echo; echo last; echo >&2; echo err >&2"
)
#: what comes before the kept tail: (stdout, stderr)
FLOODED = (300_000_006 - base.OUTPUT_TAIL, 300_000_005 - base.OUTPUT_TAIL)


@pytest.mark.sshd
def test_a_flood_of_output_keeps_its_tail_over_ssh_and_locally(
    ssh: SSHTransport, local: LocalTransport
) -> None:
    for t in (ssh, local):
        result = t.run(["sh", "-c", FLOOD], timeout=60)
        assert result.exit_status == 0
        assert len(result.stdout) == len(result.stderr) == base.OUTPUT_TAIL
        assert result.stdout.endswith(b"\0\nlast\n") and result.stderr.endswith(b"\0\nerr\n")
        assert (result.stdout_cut, result.stderr_cut) == FLOODED


@pytest.mark.sshd
def test_a_gate_sees_its_marker_after_a_flood(ssh: SSHTransport, local: LocalTransport) -> None:
    # the marker is looked for in each chunk as it comes (not in all the output so far, again),
    # also when it straddles two chunks
    gate = Gate(b"rex-go", 30.0)
    script = "head -c 200000001 /dev/zero; printf '\\nrex-'; sleep 0.2; echo go; read -r l; echo $l"
    for t in (ssh, local):
        result = t.run(["sh", "-c", script], stdin=b"fed\n", timeout=30, gate=gate)
        assert result.stdout.endswith(b"\0\nrex-go\nfed\n"), t


@pytest.mark.sshd
def test_get_reads_no_more_than_its_limit(
    ssh: SSHTransport, local: LocalTransport, host: RigHost
) -> None:
    account = pwd.getpwnam(host.login)
    path = Path(host.state_dir_for(host.login), f"big-{os.getpid()}")
    with open(path, "wb") as f:
        f.truncate(200_000_000)  # sparse: 200 MB that cost no disk
    os.chown(path, account.pw_uid, account.pw_gid)
    try:
        for t in (ssh, local):
            started = time.monotonic()
            with pytest.raises(OSError) as info:
                t.get(str(path))
            assert info.value.errno == errno.EFBIG, t
            assert time.monotonic() - started < 5, t  # a megabyte read, not 200
        path.write_bytes(b"x" * base.GET_LIMIT)
        for t in (ssh, local):
            assert t.get(str(path)) == b"x" * base.GET_LIMIT
            with pytest.raises(OSError) as info:
                t.get(str(path), limit=4)
            assert info.value.errno == errno.EFBIG
    finally:
        path.unlink()


#: ``python3 -c PEAK_RUNNER OUT REX-ARGS...``: rex's main() in a process of its own; writes
#: its exit code and peak resident set (VmHWM, kB) after the imports and at the end to OUT
PEAK_RUNNER = """
import json, sys
def peak():
    with open('/proc/self/status') as f:
        return next(int(x.split()[1]) for x in f if x.startswith('VmHWM:'))
from rexplan.engine import listener
from rexplan.cli import rex as cli
from rexplan.engine import executor
from rexplan.transport import persist as mux
from rexplan.transport import ssh as transport
from rexplan.engine import fanout as tree
before = peak()
code = cli.main(sys.argv[2:])
with open(sys.argv[1], 'w') as f:
    json.dump({'code': code, 'before': before, 'after': peak()}, f)
"""

#: a host's interpreter that floods the session (as a login script could) before it runs: 300 MB
#: of lines on stdout and on stderr
FLOOD_PYTHON = """#!/bin/sh
yes | head -c 300000000
yes | head -c 300000000 >&2
exec python3 "$@"
"""


@pytest.mark.sshd
def test_a_host_flooding_its_output_costs_the_launcher_little(
    world: World, sshd_hosts: Hosts, tmp_path: Path
) -> None:
    flood, honest = sshd_hosts(2)
    account = pwd.getpwnam(world.rig.login)
    remote_python = Path(account.pw_dir, f"flood-{world.tag}")
    local_python = tmp_path / "flood"
    for path in (remote_python, local_python):
        path.write_text(FLOOD_PYTHON)
        path.chmod(0o755)
    os.chown(remote_python, account.pw_uid, account.pw_gid)
    world.leftovers.append(remote_python)
    programs = {"job": {"on": [flood.name, honest.name], "kind": "job", "run": ["echo", "done"]}}
    defaults = {"timeouts": {"connect": 5, "start": 60, "callback": 5, "ready": 3}}
    world.distribute(world.manifest([flood, honest], programs, defaults=defaults))
    # then a local host too (its key is made at the launch, in the launcher's REX_HOME)
    m = tmp_path / "m.yaml"
    doc = json.loads(m.read_text())
    doc["hosts"][flood.name]["python"] = str(remote_python)
    here = {"address": "127.0.0.1", "transport": "local", "python": str(local_python)}
    doc["hosts"]["here"] = here
    doc["programs"]["job"]["on"].append("here")
    m.write_text(json.dumps(doc))
    out, events = tmp_path / "peak.json", tmp_path / "events.jsonl"
    argv = ["apply", str(m), "-y", "--events", str(events), "--keys", str(world.keys)]
    argv += ["--known-hosts", world.rig.known_hosts]
    env = {**os.environ, "REX_HOME": str(tmp_path / "rex")}
    subprocess.run([sys.executable, "-c", PEAK_RUNNER, str(out), *argv], env=env, timeout=300)
    run = json.loads(out.read_text())
    final = {e["step"]: e for e in map(json.loads, events.read_text().splitlines()) if "step" in e}
    # every step ran, the flooding ones too (their agents started after the flood)
    assert {s: e["state"] for s, e in final.items()} == {
        f"job@{h}": "ready" for h in (flood.name, honest.name, "here")
    }, final
    assert run["code"] == 0
    grown = (run["after"] - run["before"]) // 1024
    # 1.2 GB of output came in; what the launcher kept of it is two megabytes per command
    assert grown < 100, f"the launcher grew by {grown} MB"


@pytest.mark.sshd
def test_run_timeout_then_connection_still_usable(ssh: SSHTransport) -> None:
    with pytest.raises(HostTimeoutError) as e:
        ssh.run(["sleep", "3"], timeout=0.3)
    assert e.value.phase == "exec"
    assert e.value.host == "h10"
    assert ssh.run(["echo", "ok"], timeout=5).stdout == b"ok\n"


@pytest.mark.sshd
def test_parallel_runs_share_one_connection(ssh: SSHTransport) -> None:
    results: dict[int, Result] = {}

    def work(i: int) -> None:
        results[i] = ssh.run(["cat"], stdin=str(i).encode(), timeout=10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in results.items()} == {i: str(i).encode() for i in range(16)}


@pytest.mark.sshd
def test_runs_do_not_leak_descriptors(ssh: SSHTransport) -> None:
    ssh.run(["true"], timeout=5)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        ssh.run(["true"], stdin=b"x", timeout=5)
    assert len(os.listdir("/proc/self/fd")) == before


def test_command_line_quotes_and_validates() -> None:
    assert command_line(["echo", "a b", "$(x)"]) == "echo 'a b' '$(x)'"
    assert command_line(["id"], {"A": "1 2"}) == "env 'A=1 2' id"
    for argv, env in ([[], None], [["x"], {"A=B": "1"}], [["a=b"], {"A": "1"}], [["a\0"], None]):
        with pytest.raises(ValueError):
            command_line(argv, env)


# --- files -----------------------------------------------------------------------------------


@pytest.mark.sshd
def test_put_is_0600_in_0700_dirs_under_umask_022(
    ssh: SSHTransport, host: RigHost, scratch: str
) -> None:
    path = f"{scratch}/keys/a/b.key"
    ssh.put(b"secret-bytes", path)
    owner = os.stat(host.state_dir).st_uid
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == owner
    for d in (scratch, f"{scratch}/keys", f"{scratch}/keys/a"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert Path(path).read_bytes() == b"secret-bytes"
    ssh.put(b"v2", path, mode=0o640)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert ssh.get(path) == b"v2"
    assert os.listdir(f"{scratch}/keys/a") == ["b.key"]  # no temp file left


@pytest.mark.sshd
def test_put_never_exposes_a_partial_file(ssh: SSHTransport, scratch: str) -> None:
    path = f"{scratch}/big"
    ssh.put(b"old", path)
    seen: set[bytes] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.add(Path(path).read_bytes()[:4])
            except FileNotFoundError:
                seen.add(b"<missing>")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            ssh.put(b"new!" * 100_000, path)
            ssh.put(b"old", path)
    finally:
        done.set()
        watcher.join()
    assert seen <= {b"old", b"new!"}


@pytest.mark.sshd
def test_get_stat_remove_listdir(ssh: SSHTransport, scratch: str) -> None:
    assert ssh.stat(f"{scratch}/nope") is None
    assert ssh.listdir(f"{scratch}/nope") == []
    assert ssh.remove(f"{scratch}/nope") is False
    with pytest.raises(FileNotFoundError):
        ssh.get(f"{scratch}/nope")
    ssh.put(b"12345", f"{scratch}/f")
    os.symlink(f"{scratch}/f", f"{scratch}/link")
    mode, size = ssh.stat(f"{scratch}/f") or (0, 0)
    assert stat.S_ISREG(mode) and size == 5
    mode, _ = ssh.stat(f"{scratch}/link") or (0, 0)
    assert stat.S_ISLNK(mode)
    mode, _ = ssh.stat(scratch) or (0, 0)
    assert stat.S_ISDIR(mode)
    assert ssh.listdir(scratch) == ["f", "link"]
    assert ssh.remove(f"{scratch}/link") is True
    assert ssh.listdir(scratch) == ["f"]


@pytest.mark.sshd
def test_put_refuses_a_file_where_a_dir_belongs(ssh: SSHTransport, scratch: str) -> None:
    ssh.put(b"x", f"{scratch}/file")
    with pytest.raises(NotADirectoryError):
        ssh.put(b"y", f"{scratch}/file/child")


@pytest.mark.sshd
def test_rex_home_is_the_sshd_setenv(ssh: SSHTransport, host: RigHost) -> None:
    assert ssh.rex_home() == host.state_dir
    assert ssh.rex_home() == host.state_dir  # cached


@pytest.mark.sshd
def test_rex_home_differs_per_host(sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(2)
    homes = []
    for h in hosts:
        t = _connect(h)
        try:
            homes.append(t.rex_home())
        finally:
            t.close()
    assert homes == [h.state_dir for h in hosts]
    assert homes[0] != homes[1]


# --- connect failures ------------------------------------------------------------------------


@pytest.mark.sshd
def test_refused_port_is_unreachable(host: RigHost) -> None:
    with socket.socket() as s:
        s.bind((host.address, 0))
        port = s.getsockname()[1]
    with pytest.raises(UnreachableError) as e:
        connect(Host(name="gone", address=host.address, port=port), host.model_user(),
                known_hosts=host.known_hosts, timeouts=FAST)  # fmt: skip
    assert e.value.phase == "connect" and e.value.host == "gone"
    assert "refused" in str(e.value)


@pytest.mark.sshd
def test_wrong_key_is_authentication_error(host: RigHost, tmp_path: Path) -> None:
    key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    user = User(name="tester", login=host.login, identity=str(key))
    with pytest.raises(AuthenticationError) as e:
        connect(host.model_host(), user, known_hosts=host.known_hosts, timeouts=FAST)
    assert e.value.phase == "auth" and e.value.exit_code == 6


@pytest.mark.sshd
def test_runs_work_with_descriptors_past_fd_setsize(host: RigHost) -> None:
    """A launcher with hundreds of connections holds descriptors past 1024, where select()
    raises ValueError: rex waits with poll(2)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler: list[int] = []
    try:
        while len(filler) < 1100:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        t = _connect(host)
        try:
            assert t.run(["sh", "-c", "cat; echo done"], stdin=b"in\n").stdout == b"in\ndone\n"
            gated = t.run(["sh", "-c", "echo go; cat"], stdin=b"fed\n", gate=Gate(b"go", 10))
            assert gated.stdout == b"go\nfed\n"
        finally:
            t.close()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.sshd
def test_aes_gcm_is_negotiated_with_openssh(ssh: SSHTransport) -> None:
    """rex offers the AEAD ciphers first (paramiko checks other ciphers' MACs in Python)."""
    t = ssh._client.get_transport()
    assert t is not None
    assert (t.local_cipher, t.remote_cipher) == ("aes128-gcm@openssh.com",) * 2


@pytest.mark.sshd
def test_connections_never_write_the_shared_fabric_config(
    sshd_hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads read the one Config while others build Connections: nothing may write it (a
    write re-merges it, emptying it for a moment: 'No attribute or config key ...')."""
    import fabric

    shared = handshake._FABRIC_CONFIG.get()
    merges: list[object] = []
    real = fabric.Config.merge

    def merge(self: fabric.Config, *args: object, **kwargs: object) -> None:
        if self is shared:
            merges.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(fabric.Config, "merge", merge)
    hosts = sshd_hosts(4)
    opened: list[Transport] = []
    threads = [threading.Thread(target=lambda h=h: opened.append(_connect(h))) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in opened:
        t.run(["true"])
        t.close()
    assert len(opened) == 4 and merges == []


@pytest.mark.sshd
def test_identity_is_parsed_once_per_content(
    host: RigHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "id"
    key.write_bytes(Path(host.identity).read_bytes())
    key.chmod(0o600)
    loads: list[str] = []
    real = paramiko.PKey.from_path

    def counting(path: object, *args: object, **kwargs: object) -> paramiko.PKey:
        loads.append(str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(paramiko.PKey, "from_path", staticmethod(counting))
    user = User(name="tester", login=host.login, identity=str(key))
    for _ in range(3):
        connect(host.model_host(), user, known_hosts=host.known_hosts, timeouts=FAST).close()
    assert loads == [str(key)]
    # another key in the same file: loaded again, and it is the one offered
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k2")])
    key.write_bytes((tmp_path / "k2").read_bytes() + b"\n")
    with pytest.raises(AuthenticationError):
        connect(host.model_host(), user, known_hosts=host.known_hosts, timeouts=FAST)
    assert loads == [str(key)] * 2


@pytest.mark.sshd
def test_encrypted_identity_reports_as_before(host: RigHost, tmp_path: Path) -> None:
    """A key rex cannot load itself goes to paramiko's key_filename path and its errors."""
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret", "-f", str(key)])
    user = User(name="tester", login=host.login, identity=str(key))
    with pytest.raises(AuthenticationError) as e:
        connect(host.model_host(), user, known_hosts=host.known_hosts, timeouts=FAST)
    assert e.value.phase == "auth" and "s3cret" not in str(e.value)


@pytest.mark.sshd
def test_ssh_config_identity_does_not_leak_between_hosts(
    sshd_hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections share one fabric Config; a host's IdentityFile stays that host's (fabric
    extends the config's own connect_kwargs when a Connection is given none)."""
    a, b = sshd_hosts(2)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "config").write_text(f"Host {a.address}\n  IdentityFile {tmp_path}/nokey\n")
    monkeypatch.setenv("HOME", str(home))
    anon = User(name="anon", login=b.login)  # no identity: ssh_config's apply
    for h in (a, b):
        with contextlib.suppress(TransportError):  # neither has a usable key here
            connect(h.model_host(), anon, known_hosts=h.known_hosts, timeouts=FAST).close()
    assert "key_filename" not in handshake._FABRIC_CONFIG.get().connect_kwargs


@pytest.mark.sshd
def test_unknown_host_key_runs_nothing(host: RigHost, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    sentinel = tmp_path / "ran"
    with pytest.raises(HostKeyError) as e:
        t = connect(host.model_host(), host.model_user(), known_hosts=known, timeouts=FAST)
        t.run(["touch", str(sentinel)])
    assert e.value.phase == "hostkey"
    assert "unknown host key" in str(e.value)
    assert e.value.hint is not None and "rex hostkeys scan -m MANIFEST --accept" in e.value.hint
    assert not sentinel.exists()
    assert known.read_text() == ""


@pytest.mark.sshd
def test_missing_known_hosts_file_means_unknown(host: RigHost, tmp_path: Path) -> None:
    with pytest.raises(HostKeyError):
        _connect(host, known_hosts=tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


@pytest.mark.sshd
def test_changed_host_key_refused_and_known_hosts_untouched(host: RigHost, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[{host.address}]:{host.port} {Path(f'{other}.pub').read_text()}")
    before = known.read_bytes()
    sentinel = tmp_path / "ran"
    with pytest.raises(HostKeyError) as e:
        t = connect(host.model_host(), host.model_user(), known_hosts=known, timeouts=FAST)
        t.run(["touch", str(sentinel)])
    assert "CHANGED" in str(e.value) and e.value.phase == "hostkey"
    assert known.read_bytes() == before
    assert not sentinel.exists()


@pytest.mark.sshd
def test_hashed_known_hosts_entry_is_accepted(host: RigHost, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(Path(host.known_hosts).read_text())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert host.address not in known.read_text()
    t = _connect(host, known_hosts=known)
    try:
        assert t.run(["true"], timeout=5).exit_status == 0
    finally:
        t.close()


@pytest.mark.sshd
def test_stopped_sshd_times_out_in_banner_phase(sshd_rig: SshdRig, fresh_sshd: Spawn) -> None:
    h = fresh_sshd()
    sshd_rig.pause(h)
    try:
        with pytest.raises(HostTimeoutError) as e:
            _connect(h, banner_timeout=0.5)
        assert e.value.phase == "banner"
    finally:
        sshd_rig.resume(h)
    t = _connect(h)
    t.close()


@pytest.mark.sshd
def test_connection_lost_mid_run_raises(sshd_rig: SshdRig, fresh_sshd: Spawn) -> None:
    h = fresh_sshd()
    t = _connect(h)
    try:
        killer = threading.Timer(0.3, sshd_rig.stop, args=(h,))
        killer.start()
        with pytest.raises(TransportError) as e:
            t.run(["sleep", "10"], timeout=20)
        killer.join()
        assert not isinstance(e.value, HostTimeoutError)
        assert e.value.phase == "exec"
    finally:
        t.close()


@pytest.mark.sshd
def test_every_connection_uses_reject_policy(sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(2)
    with TransportPool(known_hosts=hosts[0].known_hosts, timeouts=FAST) as pool:
        transports = [pool.get(h.model_host(), h.model_user()) for h in hosts]
        for t in transports:
            assert isinstance(t, SSHTransport)
            policy = t.connection.client._policy
            assert isinstance(policy, paramiko.RejectPolicy)
            assert policy is t.missing_host_key_policy
            assert t.run(["true"], timeout=5).exit_status == 0


# --- host keys -------------------------------------------------------------------------------


@pytest.mark.sshd
def test_scan_host_key_and_status(host: RigHost, tmp_path: Path) -> None:
    info = scan_host_key(host.model_host(), timeout=3)
    assert info.name == f"[{host.address}]:{host.port}"
    assert f"{info.key_type} {info.key_base64}" == host.host_key
    assert info.fingerprint.startswith("SHA256:")
    assert host_key_status(host.known_hosts, info) == "ok"
    assert host_key_status(tmp_path / "none", info) == "unknown"
    key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    key_type, blob = Path(f"{key}.pub").read_text().split()[:2]
    other = HostKeyInfo(info.name, key_type, blob, "unused")
    (tmp_path / "kh").write_text(other.known_hosts_line)
    assert host_key_status(tmp_path / "kh", info) == "changed"


# --- pool ------------------------------------------------------------------------------------


class _Fake:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_pool_connects_once_per_host_and_login() -> None:
    calls: list[tuple[str, str]] = []
    lock = threading.Lock()

    def connector(host: Host, user: User) -> Transport:
        with lock:
            calls.append((host.name, user.login))
        time.sleep(0.01)
        return _Fake(host)  # type: ignore[return-value]

    pool = TransportPool(known_hosts=None, connector=connector)
    a, b = Host(name="a", address="127.0.0.1"), Host(name="b", address="127.0.0.1")
    u, v = User(name="u", login="u"), User(name="v", login="v")
    got: list[Transport] = []
    threads = [threading.Thread(target=lambda: got.append(pool.get(a, u))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(t) for t in got}) == 1
    assert pool.get(b, u) is not got[0] and pool.get(a, v) is not got[0]
    assert sorted(calls) == [("a", "u"), ("a", "v"), ("b", "u")]
    pool.close_all()
    assert all(t.closed for t in got)  # type: ignore[attr-defined]


def test_pool_remembers_a_failed_host() -> None:
    calls = 0

    def connector(host: Host, user: User) -> Transport:
        nonlocal calls
        calls += 1
        raise UnreachableError("refused", host=host.name, phase="connect")

    pool = TransportPool(known_hosts=None, connector=connector)
    h, u = Host(name="a", address="127.0.0.1"), User(name="u", login="u")
    for _ in range(3):
        with pytest.raises(UnreachableError):
            pool.get(h, u)
    assert calls == 1
    pool.discard(h, u)
    with pytest.raises(UnreachableError):
        pool.get(h, u)
    assert calls == 2


# --- local -----------------------------------------------------------------------------------


@pytest.fixture
def local() -> LocalTransport:
    t = connect(Host(name="here", address="localhost", transport="local"),
                User(name="me", login="me"), known_hosts=None)  # fmt: skip
    assert isinstance(t, LocalTransport)
    return t


def test_local_run(local: LocalTransport, tmp_path: Path) -> None:
    args = [a.format(s=tmp_path / "pwned") for a in NASTY]
    result = local.run([sys.executable, "-c", ECHO_ARGV, *args], timeout=10)
    assert json.loads(result.stdout) == args
    assert not (tmp_path / "pwned").exists()
    assert local.run(["cat"], stdin=b"abc\0") == Result(0, b"abc\0", b"")
    assert local.run(["sh", "-c", "echo e >&2; exit 3"]) == Result(3, b"", b"e\n")
    assert (
        local.run(["sh", "-c", 'printf %s "$REX_T"'], env={"REX_T": "$(x) y"}).stdout == b"$(x) y"
    )
    assert local.run([str(tmp_path / "missing")]).exit_status == 127


def test_local_run_timeout_kills_the_group(local: LocalTransport, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(HostTimeoutError) as e:
        local.run(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert e.value.phase == "exec" and e.value.host == "here"
    child = int(pidfile.read_text())
    for _ in range(200):
        if not Path(f"/proc/{child}").exists():
            break
        if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"background child {child} survived the timeout")


def test_local_files(local: LocalTransport, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        local.put(b"k", str(tmp_path / "a/b/key"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a/b/key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
    assert local.get(str(tmp_path / "a/b/key")) == b"k"
    local.put(b"k2", str(tmp_path / "a/b/key"), mode=0o644)
    assert stat.S_IMODE(os.stat(tmp_path / "a/b/key").st_mode) == 0o644
    assert local.listdir(str(tmp_path / "a/b")) == ["key"]
    (tmp_path / "a/b/ln").symlink_to("key")
    mode, _ = local.stat(str(tmp_path / "a/b/ln")) or (0, 0)
    assert stat.S_ISLNK(mode)
    assert local.stat(str(tmp_path / "nope")) is None
    assert local.listdir(str(tmp_path / "nope")) == []
    assert local.remove(str(tmp_path / "a/b/ln")) is True
    assert local.remove(str(tmp_path / "a/b/ln")) is False
    with pytest.raises(FileNotFoundError):
        local.get(str(tmp_path / "nope"))


def test_local_rex_home(
    local: LocalTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REX_HOME", raising=False)
    assert local.rex_home() == str(tmp_path / ".rex")
    monkeypatch.setenv("REX_HOME", "/srv/rex")
    assert local.rex_home() == "/srv/rex"


def test_transport_kinds_are_the_ones_the_manifest_schema_accepts() -> None:
    # core validates a host's transport against its schema and cannot import transport: the
    # registry of kinds and the schema's list must name the same kinds
    assert sorted(base.KINDS) == sorted(schema.document()["$defs"]["transport"]["enum"])
    assert base.kind("local").is_local and not base.kind("ssh").is_local
    with pytest.raises(ValueError, match="unknown transport 'telnet'"):
        base.kind("telnet")


def test_last_report_is_the_last_json_object_line() -> None:
    out = b'{"early": 1}\nmotd noise\n{"ok": true, "pid": 7}\n[1, 2]\n\xff not json\n'
    assert base.last_report(out) == {"ok": True, "pid": 7}
    assert base.last_report(b"no report\n") == {}
