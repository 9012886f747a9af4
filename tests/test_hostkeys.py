"""`rex hostkeys scan|verify` on real sshds: pin only on request, never clobber a changed key."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from sshrig import RigHost, SshdRig

from rexplan.cli import subcommands
from rexplan.errors import KeyStoreError, UsageError
from rexplan.transport.pinning import HostKeyInfo
from rexplan.transport.pool import connect
from rexplan.trust import hostkeys

Hosts = Callable[[int], list[RigHost]]


def rex(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``rex hostkeys ...`` through a parser built with subcommands.add_hostkeys."""
    parser = argparse.ArgumentParser(prog="rex")
    subcommands.add_hostkeys(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def fingerprint(host_key: str) -> str:
    blob = base64.b64decode(host_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def pin(host: RigHost, key: str | None = None) -> str:
    return f"[{host.address}]:{host.port} {key or host.host_key}\n"


def write_manifest(path: Path, rig: SshdRig, hosts: list[RigHost], extra: str = "") -> Path:
    lines = ["rex: 1", "hosts:"]
    lines += [f"  {h.name}: {{address: {h.address}, port: {h.port}}}" for h in hosts]
    lines += ["  lo: {transport: local}", extra] if extra else ["  lo: {transport: local}"]
    lines += [
        "users:",
        f"  u: {{login: {rig.login}, identity: {rig.identity}}}",
        "programs:",
        "  web:",
        "    run: [/bin/true]",
        f"    on: [{', '.join(h.name for h in hosts)}]",
        "    user: u",
        "authorize:",
        '  - "*.u.*"',
    ]
    path.write_text("\n".join(line for line in lines if line) + "\n")
    return path


def rows(out: str) -> dict[str, list[str]]:
    """Table lines by host name (the header and closing lines are left out)."""
    lines = out.splitlines()
    assert lines[0].split() == ["HOST", "NAME", "TYPE", "FINGERPRINT", "STATUS", "DETAIL"]
    found = {}
    for line in lines[1:]:
        if " host: " in line or " hosts: " in line:
            break
        found[line.split()[0]] = line.split()
    return found


def test_scan_records_only_with_accept_then_verify(
    sshd_rig: SshdRig, sshd_hosts: Hosts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h10, h11 = sshd_hosts(2)
    manifest = write_manifest(tmp_path / "m.yaml", sshd_rig, [h10, h11])
    keys = tmp_path / "keys"
    known = keys / "known_hosts"
    common = ["-m", str(manifest), "--keys", str(keys)]

    code, out, _ = rex(capsys, "hostkeys", "scan", *common)
    assert code == 0
    table = rows(out)
    for host in (h10, h11):
        assert table[host.name] == [
            host.name, f"[{host.address}]:{host.port}", "ssh-ed25519",
            fingerprint(host.host_key), "new",
        ]  # fmt: skip
    assert table["lo"] == ["lo", "-", "-", "-", "local"]
    assert "3 hosts: 2 new, 1 local" in out
    assert "2 new host keys not recorded" in out and "--accept" in out
    assert not known.exists() and not keys.exists()

    code, out, _ = rex(capsys, "hostkeys", "verify", *common)
    assert code == 6
    assert rows(out)[h10.name][4] == "unknown"

    code, out, _ = rex(capsys, "hostkeys", "scan", "--accept", *common)
    assert code == 0
    assert rows(out)[h10.name][4:6] == ["new,", "recorded"]
    assert f"recorded 2 new host keys in {known}" in out
    assert known.read_text() == pin(h10) + pin(h11)
    assert stat.S_IMODE(os.stat(known).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    assert not [p for p in keys.iterdir() if p.name.startswith(".")]

    code, out, _ = rex(capsys, "hostkeys", "verify", *common)
    assert code == 0, out
    assert {r[4] for r in rows(out).values()} == {"ok", "local"}
    code, out, _ = rex(capsys, "hostkeys", "verify", "--json", *common)
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"format", "manifest", "known_hosts", "hosts", "counts"}
    assert doc["format"] == 1 and doc["known_hosts"] == str(known)
    assert doc["counts"] == {"ok": 2, "unknown": 0, "changed": 0, "local": 1, "unreachable": 0}
    first = doc["hosts"][0]
    assert first == {
        "host": h10.name, "name": f"[{h10.address}]:{h10.port}", "address": h10.address,
        "port": h10.port, "transport": "ssh", "key_type": "ssh-ed25519",
        "fingerprint": fingerprint(h10.host_key), "pinned": [fingerprint(h10.host_key)],
        "status": "ok", "detail": "",
    }  # fmt: skip

    # what scan pinned is what rex's strict transport accepts
    t = connect(h10.model_host(), sshd_rig.model_user(), known_hosts=known)
    try:
        assert t.run(["true"], timeout=10).exit_status == 0
    finally:
        t.close()
    before = known.read_bytes()
    code, out, _ = rex(capsys, "hostkeys", "scan", "--accept", *common)
    assert code == 0 and "3 hosts: 2 ok, 1 local" in out and "recorded" not in out
    assert known.read_bytes() == before


def test_changed_key_refused_unless_replaced(
    sshd_rig: SshdRig, sshd_hosts: Hosts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h10, h11 = sshd_hosts(2)
    manifest = write_manifest(tmp_path / "m.yaml", sshd_rig, [h10, h11])
    known = tmp_path / "known_hosts"
    # h10 pinned with h11's key, on a line that also names another host
    other = "[127.0.0.99]:2222"
    known.write_text(
        f"# pins\n[{h10.address}]:{h10.port},{other} {h11.host_key}\n" + pin(h11),
    )
    os.chmod(known, 0o600)
    before = known.read_bytes()
    common = ["-m", str(manifest), "--known-hosts", str(known)]

    for extra in ([], ["--accept"], ["--replace", h11.name]):
        code, out, _ = rex(capsys, "hostkeys", "scan", *common, *extra)
        assert code == 6, out
        table = rows(out)
        assert table[h10.name][4] == "changed"
        assert table[h10.name][5:] == ["pinned", fingerprint(h11.host_key)]
        assert f"{h10.name}: host key CHANGED" in out and f"--replace {h10.name}" in out
        assert known.read_bytes() == before

    code, out, _ = rex(capsys, "hostkeys", "verify", *common)
    assert code == 6 and rows(out)[h10.name][4] == "changed"

    code, out, _ = rex(capsys, "hostkeys", "scan", *common, "--replace", h10.name)
    assert code == 0, out
    assert rows(out)[h10.name][4:6] == ["changed,", "replaced"]
    assert known.read_text() == (f"# pins\n{other} {h11.host_key}\n" + pin(h11) + pin(h10))
    assert stat.S_IMODE(os.stat(known).st_mode) == 0o600
    assert rex(capsys, "hostkeys", "verify", *common)[0] == 0


def test_unreachable_host_is_listed_and_exits_3(
    sshd_rig: SshdRig, sshd_hosts: Hosts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (h10,) = sshd_hosts(1)
    with socket.socket() as s:
        s.bind((h10.address, 0))
        closed = s.getsockname()[1]
    down = f"  down: {{address: {h10.address}, port: {closed}}}"
    manifest = write_manifest(tmp_path / "m.yaml", sshd_rig, [h10], extra=down)
    known = tmp_path / "known_hosts"
    known.write_text(pin(h10))
    common = ["-m", str(manifest), "--known-hosts", str(known)]
    for action in ("scan", "verify"):
        code, out, _ = rex(capsys, "hostkeys", action, *common)
        assert code == 3, out
        assert rows(out)["down"][4] == "unreachable"
        assert "connection refused" in out
        assert "3 hosts: 1 ok, 1 local, 1 unreachable" in out


def test_replace_must_name_an_ssh_host_of_the_manifest(
    sshd_rig: SshdRig, sshd_hosts: Hosts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (h10,) = sshd_hosts(1)
    manifest = write_manifest(tmp_path / "m.yaml", sshd_rig, [h10])
    known = tmp_path / "known_hosts"
    for name, why in (("nosuch", "no such host"), ("lo", "local host")):
        with pytest.raises(UsageError, match=why):
            rex(capsys, "hostkeys", "scan", "-m", str(manifest), "--known-hosts", str(known),
                "--replace", name)  # fmt: skip
    assert not known.exists()


def test_pinned_text_handles_hashed_and_shared_lines() -> None:
    key = HostKeyInfo("[10.0.0.1]:2222", "ssh-ed25519", "AAAAnew", "SHA256:x")
    hashed = paramiko.HostKeys.hash_host("[10.0.0.1]:2222")
    other_hashed = paramiko.HostKeys.hash_host("[10.0.0.2]:2222")
    text = (
        "# comment\n"
        f"{hashed} ssh-ed25519 AAAAold\n"
        f"{other_hashed} ssh-ed25519 AAAAkeep\n"
        "[10.0.0.3]:22,[10.0.0.1]:2222 ssh-rsa AAAArsa comment\n"
        "@cert-authority [10.0.0.1]:2222 ssh-ed25519 AAAAca\n"
        "[10.0.0.1]:22 ssh-ed25519 AAAAport22"
    )
    assert hostkeys.pinned_keys(text, "[10.0.0.1]:2222") == [
        ("ssh-ed25519", "AAAAold"),
        ("ssh-rsa", "AAAArsa"),
    ]
    assert hostkeys.pinned_text(text, [], [key]) == (
        "# comment\n"
        f"{other_hashed} ssh-ed25519 AAAAkeep\n"
        "[10.0.0.3]:22 ssh-rsa AAAArsa comment\n"
        "@cert-authority [10.0.0.1]:2222 ssh-ed25519 AAAAca\n"
        "[10.0.0.1]:22 ssh-ed25519 AAAAport22\n"
        "[10.0.0.1]:2222 ssh-ed25519 AAAAnew\n"
    )
    assert hostkeys.pinned_text("", [key, key], []) == key.known_hosts_line


def test_help_for_every_option() -> None:
    parser = argparse.ArgumentParser(prog="rex")
    sub = parser.add_subparsers(dest="command")
    subcommands.add_hostkeys(sub)
    command = sub.choices["hostkeys"]
    actions = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction))
    assert set(actions.choices) == {"scan", "verify"}
    for action_parser in actions.choices.values():
        for action in action_parser._actions:
            assert action.help, (action_parser.prog, action.dest)
    scan_help = actions.choices["scan"].format_help()
    for word in ("--accept", "--replace", "--known-hosts", "--keys", "exit codes"):
        assert word in scan_help


def test_scan_never_writes_through_a_symlinked_known_hosts_in_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "rex: 1\n"
        "hosts: {web1: {address: 127.0.0.1, port: 1}}\n"
        "users: {u: {login: nobody}}\n"
        "programs: {web: {on: [web1], user: u, run: [/bin/true]}}\n"
        "authorize: ['*.u.*']\n"
    )
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("theirs\n")
    (keys / "known_hosts").symlink_to(victim)  # planted: scan --accept would write there
    with pytest.raises(KeyStoreError, match=f"{keys / 'known_hosts'}: is a symbolic link"):
        rex(capsys, "hostkeys", "scan", "-m", str(manifest), "--keys", str(keys), "--accept")
    assert victim.read_text() == "theirs\n"
    assert (keys / "known_hosts").is_symlink()
