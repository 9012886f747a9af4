"""`rex audit` against real sshds: all six states in one run, JSON schema, read-only, no secret."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import posixpath
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from sshrig import RigHost, SshdRig

from rexplan.cli import subcommands
from rexplan.core.manifest import load
from rexplan.core.model import Authorization, Manifest, Plan, Program, Step
from rexplan.transport.pool import connect
from rexplan.trust import audit
from rexplan.trust.distribute import distribute
from rexplan.trust.keys import KeyInfo, KeyStore
from rexplan.wire.keyfile import format_key_file, parse_key_file

Hosts = Callable[[int], list[RigHost]]

ROW_KEYS = {
    "triple", "host", "user", "program", "declared", "authorized", "key", "local_key_id",
    "remote_key_id", "remote_checked", "state", "detail", "become",
}  # fmt: skip


def rex(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``rex audit ...`` through a parser built with subcommands.add_audit, as rex does."""
    parser = argparse.ArgumentParser(prog="rex")
    subcommands.add_audit(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
    return port


class World:
    """A manifest over three rig hosts plus a dead one, with a manifest user of its own."""

    def __init__(self, rig: SshdRig, hosts: list[RigHost], tmp_path: Path) -> None:
        self.rig = rig
        self.hosts = hosts
        self.user = f"au{secrets.token_hex(4)}"
        self.keys = tmp_path / "keys"
        self.store = KeyStore(self.keys)
        self.tmp = tmp_path
        self.down_port = free_port(hosts[0].address)

    def manifest(
        self, name: str, programs: Mapping[str, Sequence[str]], authorize: Sequence[str]
    ) -> Path:
        lines = ["rex: 1", "hosts:"]
        lines += [f"  {h.name}: {{address: {h.address}, port: {h.port}}}" for h in self.hosts]
        lines.append(f"  down: {{address: {self.hosts[0].address}, port: {self.down_port}}}")
        lines += [
            "users:",
            f"  {self.user}: {{login: {self.rig.login}, identity: {self.rig.identity}}}",
            "programs:",
        ]
        for prog, on in programs.items():
            lines += [f"  {prog}:", "    run: [/bin/true]", f"    on: [{', '.join(on)}]"]
            lines += [f"    user: {self.user}", "    timeouts: {connect: 3}"]
        lines.append("authorize:")
        lines += [f'  - "{p.replace("U", self.user)}"' for p in authorize]
        path = self.tmp / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def remote_keys(self, host: RigHost) -> Path:
        return Path(host.state_dir_for(self.rig.login), "keys", host.name)

    def snapshot(self) -> dict[str, tuple[int, bytes]]:
        """Every file and directory (mode, content) of the local store and the hosts' keys."""
        roots = [self.keys, *(self.remote_keys(h) for h in self.hosts)]
        found: dict[str, tuple[int, bytes]] = {}
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                for name in [*dirnames, *filenames]:
                    path = os.path.join(dirpath, name)
                    st = os.lstat(path)
                    data = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else b""
                    found[path] = (st.st_mode, hashlib.sha256(data).digest())
        return found

    def secrets(self) -> list[str]:
        found = []
        roots = [self.keys, *(self.remote_keys(h) for h in self.hosts)]
        for root in roots:
            for path in root.rglob("*.key"):
                secret = parse_key_file(path.read_bytes())[2]
                found += [base64.b64encode(secret).decode(), secret.hex(), secret.hex().upper()]
        return found

    def cleanup(self) -> None:
        for host in self.hosts:
            shutil.rmtree(self.remote_keys(host) / self.user, ignore_errors=True)
            (self.remote_keys(host) / f"{self.user}.key").unlink(missing_ok=True)


@pytest.fixture
def world(sshd_rig: SshdRig, sshd_hosts: Hosts, tmp_path: Path) -> Iterator[World]:
    w = World(sshd_rig, sshd_hosts(3), tmp_path)
    yield w
    w.cleanup()


AUTHORIZE = ["h1?.U.web", "h10.U.db", "h11.U.api", "h12.U.cron", "down.U.job"]
PROGRAMS = {
    "web": ["h10", "h11", "h12"],
    "db": ["h10"],
    "api": ["h11"],
    "cron": ["h12"],
    "job": ["down"],
}


def six_states(world: World) -> Path:
    """Distribute, then break one thing per state; returns the manifest to audit."""
    h10, h11, h12 = world.hosts
    u = world.user
    first = world.manifest("first.yaml", {"web": PROGRAMS["web"], "cron": ["h12"]}, AUTHORIZE)
    for host in (h10, h11, h12):
        world.store.create(host.name, u, "web")
    world.store.create(h12.name, u)  # cron runs on the user key
    reports = list(distribute(load(first), world.store, known_hosts=world.rig.known_hosts))
    assert [r.error for r in reports] == [None, None, None]
    # MISMATCH: rotated locally after distribute
    world.store.create(h11.name, u, "web", force=True)
    # MISSING on the host: created but never distributed; db is MISSING locally (not created)
    world.store.create(h11.name, u, "api")
    # UNREACHABLE: a local key, but nothing listens on down's port
    world.store.create("down", u, "job")
    t = connect(h12.model_host(), world.rig.model_user(), known_hosts=world.rig.known_hosts)
    try:
        base = posixpath.join(t.rex_home(), "keys", h12.name, u)
        # UNAUTHORIZED: a key on the host for a triple no pattern matches
        rogue = format_key_file(f"{h12.name}.{u}.rogue", "2024-01-01T00:00:00Z", os.urandom(32))
        t.put(rogue, posixpath.join(base, "rogue.key"), 0o600)
        # INSECURE: a world-readable key on the host
        assert t.run(["chmod", "644", posixpath.join(base, "web.key")]).exit_status == 0
    finally:
        t.close()
    return world.manifest("m.yaml", PROGRAMS, AUTHORIZE)


def test_six_states_in_one_run(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = six_states(world)
    u = world.user
    before = world.snapshot()
    common = [str(manifest), "--keys", str(world.keys), "--known-hosts", world.rig.known_hosts]

    code, out, err = rex(capsys, "audit", "--remote", *common)
    assert code == 6, out + err
    header, *lines, summary = out.splitlines()
    assert header.split() == [
        "TRIPLE", "DECLARED", "AUTHORIZED", "KEY", "LOCAL_KEY_ID", "REMOTE_KEY_ID", "STATE",
        "DETAIL",
    ]  # fmt: skip
    got = {line.split()[0]: line.split()[6] for line in lines}
    assert got == {
        f"down.{u}.job": "UNREACHABLE",
        f"h10.{u}.db": "MISSING",
        f"h10.{u}.web": "OK",
        f"h11.{u}.api": "MISSING",
        f"h11.{u}.web": "MISMATCH",
        f"h12.{u}": "OK",
        f"h12.{u}.cron": "OK",
        f"h12.{u}.rogue": "UNAUTHORIZED",
        f"h12.{u}.web": "INSECURE",
    }
    assert [line.split()[0] for line in lines] == list(got)  # sorted, user key first
    assert summary == (
        "9 triples: 3 OK, 2 MISSING, 1 MISMATCH, 1 UNAUTHORIZED, 1 INSECURE, 1 UNREACHABLE"
    )
    text = out + err

    code, out, err = rex(capsys, "audit", "--remote", "--json", *common)
    assert code == 6
    text += out + err
    doc = json.loads(out)
    assert set(doc) == {"format", "manifest", "limit", "remote", "rows", "counts"}
    assert doc["format"] == 1 and doc["manifest"] == str(manifest) and doc["remote"] is True
    assert doc["limit"] is None
    assert doc["counts"] == {
        "OK": 3, "MISSING": 2, "MISMATCH": 1, "UNAUTHORIZED": 1, "INSECURE": 1, "UNREACHABLE": 1
    }  # fmt: skip
    rows = {r["triple"]: r for r in doc["rows"]}
    assert list(rows) == list(got)
    assert all(set(r) == ROW_KEYS for r in doc["rows"])
    assert {t: r["state"] for t, r in rows.items()} == got

    web10 = world.store.find("h10", u, "web")
    assert web10 is not None
    assert rows[f"h10.{u}.web"] == {
        "triple": f"h10.{u}.web", "host": "h10", "user": u, "program": "web", "declared": True,
        "authorized": True, "key": "program", "local_key_id": web10.key_id,
        "remote_key_id": web10.key_id, "remote_checked": True, "state": "OK", "detail": "",
        "become": None,
    }  # fmt: skip
    cron = rows[f"h12.{u}.cron"]
    user_key = rows[f"h12.{u}"]
    assert cron["key"] == "user" and cron["local_key_id"] == user_key["local_key_id"]
    assert cron["remote_key_id"] == cron["local_key_id"] and user_key["declared"] is True
    assert user_key["program"] is None
    rogue = rows[f"h12.{u}.rogue"]
    assert (rogue["declared"], rogue["authorized"], rogue["local_key_id"]) == (False, False, None)
    assert rogue["remote_key_id"] and "no authorize pattern matches" in rogue["detail"]
    mismatch = rows[f"h11.{u}.web"]
    assert mismatch["local_key_id"] != mismatch["remote_key_id"] is not None
    assert "mode 0644" in rows[f"h12.{u}.web"]["detail"]
    assert rows[f"h10.{u}.db"]["local_key_id"] is None
    assert "rex_key distribute" in rows[f"h11.{u}.api"]["detail"]
    assert rows[f"h11.{u}.api"]["remote_key_id"] is None
    down = rows[f"down.{u}.job"]
    assert "connection refused" in down["detail"] and down["remote_checked"] is False

    assert world.snapshot() == before, "audit wrote something"
    for secret in world.secrets():
        assert secret not in text


def test_local_audit(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    u = world.user
    manifest = world.manifest("m.yaml", {"web": ["h10", "h11"]}, ["h1?.U.web"])
    common = [str(manifest), "--keys", str(world.keys)]
    kid = world.store.create("h10", u, "web")[0].key_id
    code, out, _ = rex(capsys, "audit", *common)
    assert code == 2
    header, *lines, summary = out.splitlines()
    assert "REMOTE_KEY_ID" not in header
    assert [line.split()[:6] for line in lines] == [
        [f"h10.{u}.web", "yes", "yes", "program", kid, "OK"],
        [f"h11.{u}.web", "yes", "yes", "-", "-", "MISSING"],
    ]
    assert summary == "2 triples: 1 OK, 1 MISSING"

    world.store.create("h11", u, "web")
    assert rex(capsys, "audit", *common)[0] == 0
    # a local key of a manifest host no pattern authorizes, and a loose one
    world.store.create("h11", u, "extra")
    (world.keys / "h10" / u / "web.key").chmod(0o644)
    # keys of hosts outside the manifest are not this manifest's business
    world.store.create("elsewhere", u, "web")
    code, out, _ = rex(capsys, "audit", "--json", *common)
    assert code == 6
    states = {r["triple"]: (r["state"], r["declared"]) for r in json.loads(out)["rows"]}
    assert states == {
        f"h10.{u}.web": ("INSECURE", True),
        f"h11.{u}.extra": ("UNAUTHORIZED", False),
        f"h11.{u}.web": ("OK", True),
    }
    (world.keys / "h10" / u / "web.key").chmod(0o600)

    code, out, _ = rex(capsys, "audit", "--json", "--limit", "h10", *common)
    doc = json.loads(out)
    assert code == 0 and doc["limit"] == "h10" and doc["remote"] is False
    assert [r["triple"] for r in doc["rows"]] == [f"h10.{u}.web"]


def test_changed_host_key_is_unreachable_with_exit_6(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    h10, h11, _ = world.hosts
    u = world.user
    manifest = world.manifest("m.yaml", {"web": ["h10", "h11"]}, ["h1?.U.web"])
    world.store.create("h10", u, "web")
    world.store.create("h11", u, "web")
    list(distribute(load(manifest), world.store, known_hosts=world.rig.known_hosts))
    # h10 pinned with h11's key
    bad = world.tmp / "known_hosts"
    bad.write_text(
        f"[{h10.address}]:{h10.port} {h11.host_key}\n[{h11.address}]:{h11.port} {h11.host_key}\n"
    )
    code, out, _ = rex(
        capsys, "audit", "--remote", "--json", str(manifest), "--keys", str(world.keys),
        "--known-hosts", str(bad),
    )  # fmt: skip
    assert code == 6
    rows = {r["triple"]: r for r in json.loads(out)["rows"]}
    assert rows[f"h10.{u}.web"]["state"] == "UNREACHABLE"
    assert "host key CHANGED" in rows[f"h10.{u}.web"]["detail"]
    assert rows[f"h11.{u}.web"]["state"] == "OK"


def test_help_for_every_option() -> None:
    parser = argparse.ArgumentParser(prog="rex")
    sub = parser.add_subparsers(dest="command")
    subcommands.add_audit(sub)
    (command,) = sub.choices.values()
    for action in command._actions:
        assert action.help, action.dest
    text = command.format_help()
    for word in ("--remote", "--json", "--keys", "--known-hosts", "--limit", *audit.STATES):
        assert word in text


# --- pure rows and exit codes -----------------------------------------------------------------


def _manifest(authorize: Sequence[str]) -> Manifest:
    from rexplan.core.model import Host, User

    return Manifest(
        path="m.yaml",
        digest="0" * 64,
        hosts=(Host("a", "127.0.0.1"), Host("b", "127.0.0.1")),
        users=(User("alice", "alice"), User("bob", "bob")),
        programs=(Program("web", ("a",), "alice"),),
        authorize=tuple(Authorization(p, *p.split(".")) for p in authorize),
    )


def _step(host: str, user: str, program: str) -> Step:
    return Step(
        id=f"{program}@{host}", wave=0, host=host, address="127.0.0.1", port=22,
        transport="ssh", login=user, user=user, program=program,
        triple=f"{host}.{user}.{program}", argv=("/bin/true",), shell=None,
        ready=Program("x", (), "x").ready, kind="service",
    )  # fmt: skip


def _info(host: str, user: str, program: str | None, kid: str = "k1") -> KeyInfo:
    triple = f"{host}.{user}" + (f".{program}" if program else "")
    return KeyInfo(triple, host, user, program, kid, "2024", Path("/k"))


def test_stray_and_unreachable_rows() -> None:
    m = _manifest(["a.alice.web", "a.bob.*"])
    plan = Plan("0" * 64, ((_step("a", "alice", "web"), _step("a", "bob", "web")),))
    local = {("a", "alice", "web"): _info("a", "alice", "web")}
    stray = audit.RemoteKey("a", "alice", "web", "bob", "/x", "k1")
    held = [
        audit.Holdings("a", "alice", (audit.RemoteKey("a", "alice", "web", "alice", "/y", "k1"),)),
        audit.Holdings("a", "bob", (stray,)),
    ]
    rows = {r.triple: r for r in audit.audit_rows(m, plan, local, held)}
    assert rows["a.alice.web"].state == "UNAUTHORIZED"
    assert "login bob" in rows["a.alice.web"].detail
    assert rows["a.bob.web"].state == "MISSING"

    down = [audit.Holdings("a", "alice", error="a: connect: refused", exit_code=3)]
    only = Plan("0" * 64, ((_step("a", "alice", "web"),),))
    rows_down = audit.audit_rows(m, only, local, down)
    assert [r.state for r in rows_down] == ["UNREACHABLE"]
    assert audit.exit_code(rows_down, down) == 3
    refused = [audit.Holdings("a", "alice", error="a: hostkey: CHANGED", exit_code=6)]
    assert audit.exit_code(audit.audit_rows(m, only, local, refused), refused) == 6
    assert audit.exit_code(audit.audit_rows(m, only, local, None)) == 0
    assert audit.exit_code(audit.audit_rows(m, only, {}, None)) == 2


def test_program_key_wins_and_user_key_fallback_mismatch() -> None:
    m = _manifest(["a.alice.*"])
    plan = Plan("0" * 64, ((_step("a", "alice", "web"),),))
    local = {("a", "alice", "web"): _info("a", "alice", "web", "k1")}
    # the host has only the user key: the agent would load it, the launcher the program key
    held = [
        audit.Holdings("a", "alice", (audit.RemoteKey("a", "alice", None, "alice", "/u", "k2"),))
    ]
    rows = {r.triple: r for r in audit.audit_rows(m, plan, local, held)}
    web = rows["a.alice.web"]
    assert (web.state, web.key, web.remote_key_id) == ("MISMATCH", "program", "k2")
    assert "the host's user key, the store's program key" in web.detail
    assert rows["a.alice"].state == "MISMATCH" and not rows["a.alice"].declared


def test_remote_symlink_and_loose_directory_are_insecure(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    h10, h11, _ = world.hosts
    u = world.user
    manifest = world.manifest("m.yaml", {"web": ["h10", "h11"]}, ["h1?.U.web"])
    world.store.create("h10", u, "web")
    world.store.create("h11", u, "web")
    list(distribute(load(manifest), world.store, known_hosts=world.rig.known_hosts))
    (world.remote_keys(h10) / u).chmod(0o775)
    on11 = world.remote_keys(h11) / u / "web.key"
    target = on11.with_name("elsewhere")
    on11.rename(target)
    on11.symlink_to(target)
    code, out, _ = rex(
        capsys, "audit", "--remote", "--json", str(manifest), "--keys", str(world.keys),
        "--known-hosts", world.rig.known_hosts,
    )  # fmt: skip
    assert code == 6
    rows = {r["triple"]: r for r in json.loads(out)["rows"]}
    assert rows[f"h10.{u}.web"]["state"] == "INSECURE"
    assert "directory mode 0775" in rows[f"h10.{u}.web"]["detail"]
    assert rows[f"h11.{u}.web"]["state"] == "INSECURE"
    assert "symbolic link" in rows[f"h11.{u}.web"]["detail"]
    assert rows[f"h11.{u}.web"]["remote_key_id"] is None
