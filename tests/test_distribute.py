"""`rex_key distribute` and `revoke --remote` against real sshds (the rig)."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from sshrig import RigHost, SshdRig, descendants

from rexplan.cli.rex_key import main
from rexplan.core.manifest import load
from rexplan.core.model import Host, Timeouts, User
from rexplan.transport.base import GET_LIMIT, Result, Transport
from rexplan.transport.pool import connect
from rexplan.trust.distribute import distribute
from rexplan.trust.keys import KeyStore
from rexplan.wire.keyfile import key_id, parse_key_file

Hosts = Callable[[int], list[RigHost]]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class Setup:
    """A manifest over rig hosts with a manifest user of its own, so tests never share keys."""

    def __init__(self, rig: SshdRig, hosts: list[RigHost], tmp_path: Path) -> None:
        self.rig = rig
        self.hosts = hosts
        self.user = f"kd{secrets.token_hex(4)}"
        self.keys = tmp_path / "keys"
        self.manifest = tmp_path / "m.yaml"
        self.store = KeyStore(self.keys)

    def write(self, programs: Mapping[str, Sequence[str]], extra_hosts: Sequence[str] = ()) -> None:
        lines = ["rex: 1", "hosts:"]
        lines += [f"  {h.name}: {{address: {h.address}, port: {h.port}}}" for h in self.hosts]
        lines += list(extra_hosts)
        lines += [
            "users:",
            f"  {self.user}: {{login: {self.rig.login}, identity: {self.rig.identity}}}",
        ]
        lines.append("programs:")
        for name, on in programs.items():
            lines += [f"  {name}:", "    run: [/bin/true]", f"    on: [{', '.join(on)}]"]
            lines.append(f"    user: {self.user}")
        lines += ["authorize:", '  - "*.*.*"']
        self.manifest.write_text("\n".join(lines) + "\n")

    def remote(self, host: RigHost, *parts: str) -> Path:
        """The local path of a file under the rig login's REX_HOME/keys on ``host``."""
        return Path(host.state_dir_for(self.rig.login), "keys", *parts)

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        common = ["--keys", str(self.keys), "-m", str(self.manifest)]
        if argv[0] != "create":
            common += ["--known-hosts", self.rig.known_hosts]
        return run(capsys, *argv, *common)

    def secrets(self) -> list[str]:
        found = []
        for path in self.keys.rglob("*.key"):
            secret = parse_key_file(path.read_bytes())[2]
            found += [base64.b64encode(secret).decode(), secret.hex()]
        return found

    def mkdirs(self, path: Path) -> None:
        """Make ``path`` and its missing parents 0700, owned by the rig login as sshd would."""
        if path.exists():
            return
        self.mkdirs(path.parent)
        path.mkdir(mode=0o700)
        account = self.rig.accounts[0]
        os.chown(path, account.uid, account.gid)

    def cleanup(self) -> None:
        for host in self.hosts:
            mine = self.remote(host, host.name, self.user)
            if mine.is_symlink():
                mine.unlink()
            shutil.rmtree(mine, ignore_errors=True)
            self.remote(host, host.name, f"{self.user}.key").unlink(missing_ok=True)


@pytest.fixture
def setup(sshd_rig: SshdRig, sshd_hosts: Hosts, tmp_path: Path) -> Iterator[Setup]:
    s = Setup(sshd_rig, sshd_hosts(3), tmp_path)
    yield s
    s.cleanup()


def test_distribute_to_three_hosts_then_nothing_changes(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    h10, h11, h12 = setup.hosts
    setup.write({"web": [h10.name, h11.name], "db": [h12.name]})
    assert setup.cli(capsys, "create")[0] == 0

    code, out, err = setup.cli(capsys, "distribute")
    assert code == 0, out + err
    assert out.splitlines()[-1] == "3 hosts: 3 changed, 0 unchanged, 0 failed"
    assert f"{h10.name} as {setup.rig.login}: 1 changed, 0 unchanged" in out
    outputs = [out + err]

    account = setup.rig.accounts[0]
    for host, program in ((h10, "web"), (h11, "web"), (h12, "db")):
        path = setup.remote(host, host.name, setup.user, f"{program}.key")
        # the rig's sshds run with umask 022; rex's files must not care
        assert mode(path) == 0o600
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (account.uid, account.gid)
        for d in (path.parent, path.parent.parent, path.parent.parent.parent):
            assert mode(d) == 0o700, d
        triple, _, secret = parse_key_file(path.read_bytes())
        local, local_secret = setup.store.load(host.name, setup.user, program)
        assert triple == local.triple and secret == local_secret
        assert f"new {local.triple} {local.key_id} " in out
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]

    code, out, err = setup.cli(capsys, "distribute")
    assert code == 0
    assert out.splitlines()[-1] == "3 hosts: 0 changed, 3 unchanged, 0 failed"
    outputs.append(out + err)
    historical = ["--distribute", "-m", str(setup.manifest), "--keys", str(setup.keys)]
    code, out, err = run(capsys, *historical, "--known-hosts", setup.rig.known_hosts)
    assert code == 0 and "0 changed" in out
    outputs.append(out + err)
    for text in outputs:
        for secret in setup.secrets():
            assert secret not in text


def test_dry_run_changes_nothing(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    h10 = setup.hosts[0]
    setup.write({"web": [h10.name]})
    setup.cli(capsys, "create")
    code, out, _ = setup.cli(capsys, "distribute", "--dry-run")
    assert code == 0
    assert "would put" in out
    assert out.splitlines()[-1] == "dry run: 1 host: 1 to change, 0 unchanged, 0 failed"
    assert not setup.remote(h10, h10.name, setup.user).exists()


def test_rotated_or_loosened_keys_are_replaced(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    h10, h11, _ = setup.hosts
    setup.write({"web": [h10.name, h11.name]})
    setup.cli(capsys, "create")
    setup.cli(capsys, "distribute")
    on10 = setup.remote(h10, h10.name, setup.user, "web.key")
    on11 = setup.remote(h11, h11.name, setup.user, "web.key")
    old = key_id(parse_key_file(on10.read_bytes())[2])

    assert setup.cli(capsys, "create", "--force", "--program", "web")[0] == 0
    on11.chmod(0o644)
    on11.parent.chmod(0o755)
    code, out, _ = setup.cli(capsys, "distribute")
    assert code == 0
    new = setup.store.load(h10.name, setup.user, "web")[0].key_id
    assert f"replaced {h10.name}.{setup.user}.web {new} {on10} (was {old})" in out
    assert f"fixed {on11.parent} (directory mode 0755)" in out
    assert key_id(parse_key_file(on10.read_bytes())[2]) == new
    assert mode(on11) == 0o600 and mode(on11.parent) == 0o700
    assert "0 changed" in setup.cli(capsys, "distribute")[1].splitlines()[-1]


def test_limit(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    h10, h11, h12 = setup.hosts
    setup.write({"web": [h10.name, h11.name, h12.name]})
    setup.cli(capsys, "create")
    code, out, _ = setup.cli(capsys, "distribute", "--limit", h11.name)
    assert code == 0
    assert out.splitlines()[-1] == "1 host: 1 changed, 0 unchanged, 0 failed"
    assert setup.remote(h11, h11.name, setup.user, "web.key").exists()
    assert not setup.remote(h10, h10.name, setup.user).exists()
    code, _, err = setup.cli(capsys, "distribute", "--limit", "nosuch*")
    assert code == 4 and "matches no host" in err


def test_unreachable_host_is_listed_and_exits_3(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    h10 = setup.hosts[0]
    with socket.socket() as s:
        s.bind((h10.address, 0))
        closed = s.getsockname()[1]
    setup.write(
        {"web": [h10.name, "down"]},
        extra_hosts=[f"  down: {{address: {h10.address}, port: {closed}}}"],
    )
    setup.cli(capsys, "create")
    code, out, _ = setup.cli(capsys, "distribute")
    assert code == 3
    assert f"down as {setup.rig.login}: FAILED: down: connect: connection refused" in out
    assert out.splitlines()[-2] == "2 hosts: 1 changed, 0 unchanged, 1 failed"
    assert f"failed: down as {setup.rig.login}: down: connect: connection refused" in out
    assert setup.remote(h10, h10.name, setup.user, "web.key").exists()


def test_symlinked_key_directory_is_refused(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    h10 = setup.hosts[0]
    setup.write({"web": [h10.name]})
    setup.cli(capsys, "create")
    link = setup.remote(h10, h10.name, setup.user)
    setup.mkdirs(link.parent)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link.symlink_to(elsewhere)
    code, out, _ = setup.cli(capsys, "distribute")
    assert code == 3
    assert "is a symbolic link; refusing" in out
    assert list(elsewhere.iterdir()) == []


def test_missing_local_key_stops_before_any_host(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    h10, h11, _ = setup.hosts
    setup.write({"web": [h10.name, h11.name]})
    run(capsys, "create", "--keys", str(setup.keys), f"{h10.name}.{setup.user}.web")
    code, _, err = setup.cli(capsys, "distribute")
    assert code == 6
    assert f"no key for {h11.name}.{setup.user}.web" in err
    assert not setup.remote(h10, h10.name, setup.user).exists()


def test_user_key_is_distributed_for_its_programs(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    h10 = setup.hosts[0]
    setup.write({"web": [h10.name], "db": [h10.name]})
    run(capsys, "create", "--keys", str(setup.keys), f"{h10.name}.{setup.user}")
    code, out, _ = setup.cli(capsys, "distribute")
    assert code == 0
    assert out.splitlines()[-1] == "1 host: 1 changed, 0 unchanged, 0 failed"
    assert mode(setup.remote(h10, h10.name, f"{setup.user}.key")) == 0o600


def test_revoke_remote(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    h10, h11, _ = setup.hosts
    setup.write({"web": [h10.name, h11.name], "db": [h10.name]})
    setup.cli(capsys, "create")
    setup.cli(capsys, "distribute")
    web10 = f"{h10.name}.{setup.user}.web"
    code, out, _ = setup.cli(capsys, "revoke", "--remote", web10, f"{h11.name}.{setup.user}")
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == [f"revoked {web10}", f"absent {h11.name}.{setup.user}"]
    assert f"removed {web10}" in out and f"absent {h11.name}.{setup.user}" in out
    assert not setup.remote(h10, h10.name, setup.user, "web.key").exists()
    # nothing else is touched
    assert setup.remote(h10, h10.name, setup.user, "db.key").exists()
    assert setup.remote(h11, h11.name, setup.user, "web.key").exists()
    assert setup.store.find(h10.name, setup.user, "web") is None
    code, out, _ = setup.cli(capsys, "revoke", "--remote", web10)
    assert code == 0 and f"absent {web10}" in out and "1 host: 0 changed, 1 unchanged" in out


class _Spy:
    """A real SSH transport that records every command line and stdin it sends, and can
    kill its connection (the sshd side) just before its ``cut_at``-th put."""

    def __init__(self, inner: Transport, sshd_pid: int = 0, cut_at: int = 0) -> None:
        self.inner = inner
        self.host = inner.host
        self.sshd_pid = sshd_pid
        self.cut_at = cut_at
        self.puts = 0
        self.sent: list[str] = []

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        self.puts += 1
        self.sent.append(path)
        if self.puts == self.cut_at:
            for pid in descendants(self.sshd_pid):
                os.kill(pid, signal.SIGKILL)
        self.inner.put(data, path, mode)

    def run(self, argv: Sequence[str], **kw: object) -> Result:
        self.sent += [*argv, repr(kw)]
        return self.inner.run(argv, **kw)  # type: ignore[arg-type]

    def get(self, path: str, limit: int = GET_LIMIT) -> bytes:
        return self.inner.get(path, limit)

    def stat(self, path: str) -> tuple[int, int] | None:
        return self.inner.stat(path)

    def remove(self, path: str) -> bool:
        return self.inner.remove(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def rex_home(self) -> str:
        return self.inner.rex_home()

    def close(self) -> None:
        self.inner.close()


def test_no_secret_in_any_command_line(setup: Setup) -> None:
    h10, h11, _ = setup.hosts
    setup.write({"web": [h10.name, h11.name]})
    manifest = load(setup.manifest)
    setup.store.create(h10.name, setup.user, "web")
    setup.store.create(h11.name, setup.user, "web")
    list(distribute(manifest, setup.store, known_hosts=setup.rig.known_hosts))
    old = setup.secrets()
    setup.store.create(h10.name, setup.user, "web", force=True)
    setup.store.create(h11.name, setup.user, "web", force=True)
    # a loose directory makes distribute run chmod on the host
    setup.remote(h11, h11.name, setup.user).chmod(0o775)
    spies: list[_Spy] = []

    def spying(h: Host, u: User, t: Timeouts) -> Transport:
        spies.append(_Spy(connect(h, u, known_hosts=setup.rig.known_hosts, timeouts=t)))
        return spies[-1]

    reports = list(distribute(manifest, setup.store, known_hosts=None, connector=spying))
    assert [r.changed for r in reports] == [1, 2]
    sent = "\n".join(x for spy in spies for x in spy.sent)
    assert "chmod" in sent
    for secret in old + setup.secrets():
        assert secret not in sent


def test_cut_connection_leaves_old_or_complete_keys(
    sshd_rig: SshdRig, fresh_sshd: Callable[[], RigHost], tmp_path: Path
) -> None:
    host = fresh_sshd()
    setup = Setup(sshd_rig, [host], tmp_path)
    setup.write({"a": [host.name], "b": [host.name]})
    manifest = load(setup.manifest)
    for prog in ("a", "b"):
        setup.store.create(host.name, setup.user, prog)
    list(distribute(manifest, setup.store, known_hosts=host.known_hosts))
    old = {p: setup.remote(host, host.name, setup.user, f"{p}.key").read_bytes() for p in "ab"}
    for prog in ("a", "b"):
        setup.store.create(host.name, setup.user, prog, force=True)

    def cutting(h: Host, u: User, t: Timeouts) -> Transport:
        inner = connect(h, u, known_hosts=host.known_hosts, timeouts=t)
        return _Spy(inner, sshd_pid=host.pid, cut_at=2)

    (report,) = distribute(manifest, setup.store, known_hosts=None, connector=cutting)
    assert report.error is not None and report.exit_code == 3
    a_now = setup.remote(host, host.name, setup.user, "a.key").read_bytes()
    b_now = setup.remote(host, host.name, setup.user, "b.key").read_bytes()
    assert parse_key_file(a_now)[2] == setup.store.load(host.name, setup.user, "a")[1]
    assert b_now == old["b"]
    (report,) = distribute(manifest, setup.store, known_hosts=host.known_hosts)
    assert report.error is None and [a.action for a in report.actions] == ["unchanged", "replaced"]
