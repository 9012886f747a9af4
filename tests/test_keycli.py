"""`rex_key` command line: subcommands, REX spellings, exit codes, and no secret in any output."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import pytest

from rexplan.cli.rex_key import main, modernize
from rexplan.trust.keys import KeyStore
from rexplan.wire.keyfile import parse_key_file


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def secrets_in(root: Path) -> list[str]:
    """Every spelling of every key under root that must never be printed."""
    found = []
    for path in root.rglob("*.key"):
        secret = parse_key_file(path.read_bytes())[2]
        found += [base64.b64encode(secret).decode(), secret.hex(), secret.hex().upper()]
    return found


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def test_create_list_revoke(capsys: pytest.CaptureFixture[str], keys: Path) -> None:
    code, out, err = run(capsys, "create", "--keys", str(keys), "web1.alice.app", "web1.alice")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("created web1.alice.app ")
    assert lines[1].startswith("created web1.alice ")
    assert lines[2] == "2 keys: 2 created, 0 rotated, 0 kept"
    kid = lines[0].split()[2]

    code, out, _ = run(capsys, "--keys", str(keys), "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["TRIPLE", "KEY_ID", "CREATED", "PATH"]
    assert [r.split()[0] for r in rows] == ["web1.alice", "web1.alice.app"]
    assert rows[1].split()[1] == kid
    assert rows[1].split()[3] == str(keys / "web1" / "alice" / "app.key")

    code, out, _ = run(capsys, "list", "--keys", str(keys), "--json")
    assert code == 0
    data = json.loads(out)
    assert [d["triple"] for d in data] == ["web1.alice", "web1.alice.app"]
    assert set(data[0]) == {
        "triple", "host", "user", "program", "key_id", "created", "path", "problem"
    }  # fmt: skip
    assert data[1]["key_id"] == kid and data[1]["program"] == "app" and data[1]["problem"] is None

    code, out, _ = run(capsys, "revoke", "--keys", str(keys), "web1.alice.app", "web9.bob")
    assert code == 0
    assert out.splitlines() == ["revoked web1.alice.app", "absent web9.bob"]
    code, out, _ = run(capsys, "list", "--keys", str(keys), "--json")
    assert [d["triple"] for d in json.loads(out)] == ["web1.alice"]


def test_kept_and_rotated(capsys: pytest.CaptureFixture[str], keys: Path) -> None:
    run(capsys, "create", "--keys", str(keys), "web1.alice.app")
    path = keys / "web1" / "alice" / "app.key"
    before = path.read_bytes()
    code, out, _ = run(capsys, "create", "--keys", str(keys), "web1.alice.app", "web2.bob")
    assert code == 0
    assert out.splitlines()[0].startswith("kept web1.alice.app ")
    assert out.splitlines()[-1] == "2 keys: 1 created, 0 rotated, 1 kept"
    assert path.read_bytes() == before
    code, out, _ = run(capsys, "create", "--keys", str(keys), "--force", "web1.alice.app")
    assert code == 0
    assert out.splitlines()[0].startswith("rotated web1.alice.app ")
    assert path.read_bytes() != before


def test_rex_keys_environment(
    capsys: pytest.CaptureFixture[str], keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REX_KEYS", str(keys))
    assert run(capsys, "create", "web1.alice")[0] == 0
    assert (keys / "web1" / "alice.key").is_file()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["--create", "a.b"], ["create", "a.b"]),
        (["--keys", "k", "--create", "a.b"], ["create", "--keys", "k", "a.b"]),
        (["--keys", "create", "--list"], ["list", "--keys", "create"]),
        (["--distribute", "-m", "m.yaml"], ["distribute", "-m", "m.yaml"]),
        (["-m", "m.yaml", "--distribute"], ["distribute", "-m", "m.yaml"]),
        (["--revoke", "a.b"], ["revoke", "a.b"]),
        (["create", "--list"], ["create", "--list"]),
    ],
)
def test_modernize(old: list[str], new: list[str]) -> None:
    assert modernize(old) == new


def test_historical_spellings(capsys: pytest.CaptureFixture[str], keys: Path) -> None:
    code, out, _ = run(capsys, "--keys", str(keys), "--create", "web1.alice.app")
    assert code == 0 and out.startswith("created web1.alice.app ")
    code, out, _ = run(capsys, "--list", "--keys", str(keys))
    assert code == 0 and "web1.alice.app" in out
    code, out, _ = run(capsys, "--keys", str(keys), "--revoke", "web1.alice.app")
    assert code == 0 and out == "revoked web1.alice.app\n"


def test_dotted_host_user_keys(capsys: pytest.CaptureFixture[str], keys: Path) -> None:
    code, out, _ = run(capsys, "create", "--keys", str(keys), "--user-key", "db.example.com.bob")
    assert code == 0 and out.startswith("created db.example.com.bob ")
    assert (keys / "db.example.com" / "bob.key").is_file()
    # what `list` prints can be revoked as printed
    code, out, _ = run(capsys, "revoke", "--keys", str(keys), "db.example.com.bob")
    assert out == "revoked db.example.com.bob\n"
    assert not (keys / "db.example.com" / "bob.key").exists()


@pytest.mark.parametrize(
    "triple", ["../x.alice", "web1/x.alice", "web1.alice;id", "web1.$(id)", "web 1.alice", "web1"]
)
@pytest.mark.parametrize("command", ["create", "revoke"])
def test_bad_names_exit_5_and_touch_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Path, triple: str, command: str
) -> None:
    code, out, err = run(capsys, command, "--keys", str(keys), "web1.alice", triple)
    assert code == 5
    assert out == ""
    assert err.startswith("rex_key: error: ") and "hint: " in err
    assert list(tmp_path.iterdir()) == []


def test_leading_dash_is_a_usage_error(capsys: pytest.CaptureFixture[str], keys: Path) -> None:
    assert run(capsys, "create", "--keys", str(keys), "-web1.alice")[0] == 5
    assert run(capsys, "create", "--keys", str(keys), "--", "-web1.alice")[0] == 5
    assert not keys.exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["list", "--bogus"],
        ["create"],
        ["create", "web1.alice", "-m", "x.yaml"],
        ["create", "web1.alice", "--program", "app"],
        ["revoke"],
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], keys: Path, argv: list[str]) -> None:
    code, _out, err = run(capsys, "--keys", str(keys), *argv)
    assert code == 5
    assert err.startswith("rex_key: error: ")
    assert "Traceback" not in err
    assert not keys.exists()


@pytest.mark.parametrize("command", [[], ["create"], ["list"], ["revoke"]])
def test_help(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "usage: rex_key" in out
    assert "--keys DIR" in out and "--insecure-keys" in out


def test_insecure_key(capsys: pytest.CaptureFixture[str], keys: Path) -> None:
    run(capsys, "create", "--keys", str(keys), "web1.alice")
    path = keys / "web1" / "alice.key"
    path.chmod(0o644)
    code, out, err = run(capsys, "create", "--keys", str(keys), "web1.alice")
    assert code == 6
    assert f"rex_key: error: {path}: mode 0644" in err and "hint: " in err
    code, out, err = run(capsys, "create", "--keys", str(keys), "--insecure-keys", "web1.alice")
    assert code == 0 and out.startswith("kept web1.alice ")
    assert f"rex_key: warning: using an insecure key (--insecure-keys): {path}" in err
    code, out, _ = run(capsys, "list", "--keys", str(keys))
    assert code == 0 and "PROBLEM" in out and "mode 0644" in out


def test_no_secret_in_any_output(capsys: pytest.CaptureFixture[str], keys: Path) -> None:
    outputs = []
    for argv in (
        ["create", "web1.alice.app", "web1.alice", "db.example.com.bob.pg"],
        ["create", "web1.alice.app"],
        ["create", "--force", "web1.alice"],
        ["list"],
        ["list", "--json"],
    ):
        code, out, err = run(capsys, "--keys", str(keys), *argv)
        assert code == 0
        outputs.append(out + err)
    (keys / "web1" / "alice.key").chmod(0o640)
    for argv in (["list"], ["create", "web1.alice"], ["--insecure-keys", "create", "web1.alice"]):
        outputs.append("".join(run(capsys, "--keys", str(keys), *argv)[1:]))
    secrets = secrets_in(keys)
    assert len(secrets) == 9
    for text in outputs:
        for secret in secrets:
            assert secret not in text
    code, out, _ = run(capsys, "revoke", "--keys", str(keys), "web1.alice")
    assert code == 0


def test_internal_error_goes_to_a_log(
    capsys: pytest.CaptureFixture[str],
    keys: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(self: KeyStore) -> list[object]:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(KeyStore, "list", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, _out, err = run(capsys, "list", "--keys", str(keys))
    assert code == 1
    assert err.startswith("rex_key: internal error (details in ")
    log = Path(err.split("details in ", 1)[1].split(")")[0])
    assert log.parent == tmp_path
    assert "RuntimeError: kaboom" in log.read_text()
    assert "Traceback" not in err


def test_interrupt_exits_130(
    capsys: pytest.CaptureFixture[str], keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: KeyStore) -> list[object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(KeyStore, "list", interrupted)
    code, _, err = run(capsys, "list", "--keys", str(keys))
    assert code == 130
    assert err == "rex_key: interrupted\n"


MANIFEST = """\
rex: 1
hosts:
  web1: {address: 127.0.0.10}
  web2: {address: 127.0.0.11}
  db.example.com: {address: 127.0.0.12}
users:
  app: {login: www}
programs:
  web:
    run: [/bin/true]
    on: [web1, web2]
    user: app
  db:
    run: [/bin/true]
    on: db.example.com
    user: app
authorize:
  - "web*.app.web"
  - "db.example.com.app.db"
"""


def test_create_from_manifest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    keys = tmp_path / "keys"
    code, out, err = run(capsys, "create", "--keys", str(keys), "-m", str(manifest))
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()[:-1]] == [
        ["created", "web1.app.web"],
        ["created", "web2.app.web"],
        ["created", "db.example.com.app.db"],
    ]
    assert (keys / "db.example.com" / "app" / "db.key").is_file()
    code, out, _ = run(
        capsys, "create", "--keys", str(keys), "-m", str(manifest), "--program", "db"
    )
    assert code == 0
    assert out.splitlines()[0].startswith("kept db.example.com.app.db ")
    assert out.splitlines()[-1] == "1 key: 0 created, 0 rotated, 1 kept"


def test_manifest_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    keys = tmp_path / "keys"
    code, _, err = run(capsys, "create", "--keys", str(keys), "-m", str(manifest), "--program", "x")
    assert code == 5 and "'x' is not a program" in err
    manifest.write_text(MANIFEST.replace("on: db.example.com", "on: nowhere"))
    code, _, err = run(capsys, "create", "--keys", str(keys), "-m", str(manifest))
    assert code == 4 and f"{manifest}:" in err
    assert not keys.exists()


def test_remote_revoke_usage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    keys = ["--keys", str(tmp_path / "keys")]
    assert (
        run(capsys, "revoke", *keys, "--remote", "-m", str(manifest), "elsewhere.bob.web")[0] == 5
    )
    assert run(capsys, "revoke", *keys, "--remote", "web1.app")[0] == 5
    assert run(capsys, "revoke", *keys, "-m", str(manifest), "web1.app")[0] == 5
    assert run(capsys, "distribute", *keys)[0] == 5
    code, _, err = run(capsys, "distribute", *keys, "-m", str(manifest), "--limit", "nosuch")
    assert code == 4 and "matches no host" in err
    assert not (tmp_path / "keys").exists()
