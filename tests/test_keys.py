"""Key store: atomic creation, modes under any umask, the permission matrix, name validation."""

from __future__ import annotations

import base64
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rexplan.errors import KeyStoreError, UsageError
from rexplan.trust.keys import KeyStore, default_known_hosts, parse_key_triple
from rexplan.wire.keyfile import format_key_file, key_id, parse_key_file


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys")


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_round_trip(store: KeyStore) -> None:
    info, new = store.create("web1", "alice", "app")
    assert new
    assert info.triple == "web1.alice.app"
    assert info.path == store.root / "web1" / "alice" / "app.key"
    loaded, secret = store.load("web1", "alice", "app")
    assert loaded == info
    assert len(secret) == 32 and key_id(secret) == info.key_id
    triple, created, file_secret = parse_key_file(info.path.read_bytes())
    assert (triple, created, file_secret) == ("web1.alice.app", info.created, secret)
    assert store.list() == [info]
    assert store.revoke("web1", "alice", "app")
    assert not store.revoke("web1", "alice", "app")
    assert store.list() == []
    with pytest.raises(KeyStoreError) as e:
        store.load("web1", "alice", "app")
    assert e.value.exit_code == 6
    assert "web1.alice.app" in str(e.value)


def test_program_key_wins_over_user_key(store: KeyStore) -> None:
    user, _ = store.create("web1", "alice")
    assert store.load("web1", "alice", "app")[0] == user
    assert store.find("web1", "alice", "app") == user
    prog, _ = store.create("web1", "alice", "app")
    assert store.load("web1", "alice", "app")[0] == prog
    assert store.load("web1", "alice", "db")[0] == user
    assert store.find("web1", "alice", "app") == prog
    assert store.find("web2", "alice", "app") is None


def test_create_keeps_existing_key_unless_forced(store: KeyStore) -> None:
    first, new = store.create("web1", "alice", "app")
    before = first.path.read_bytes()
    again, new = store.create("web1", "alice", "app")
    assert not new and again == first
    assert first.path.read_bytes() == before
    rotated, new = store.create("web1", "alice", "app", force=True)
    assert new and rotated.key_id != first.key_id
    assert first.path.read_bytes() != before
    assert store.load("web1", "alice", "app")[0] == rotated
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]


def test_concurrent_creators_agree_on_one_key(store: KeyStore) -> None:
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def make() -> None:
        info, new = KeyStore(store.root).create("web1", "alice", "app")
        with lock:
            results.append((info.key_id, new))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({kid for kid, _ in results}) == 1
    assert [new for _, new in results].count(True) == 1


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o277])
def test_modes_whatever_the_umask(tmp_path: Path, umask: None, mask: int) -> None:
    os.umask(mask)
    store = KeyStore(tmp_path / "keys")
    info, _ = store.create("web1", "alice", "app")
    store.create("web1", "bob")
    rotated, _ = store.create("web1", "bob", force=True)
    for d in (store.root, store.root / "web1", store.root / "web1" / "alice"):
        assert mode(d) == 0o700, d
    assert mode(info.path) == 0o600
    assert mode(rotated.path) == 0o600
    assert store.load("web1", "alice", "app")[0] == info


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


def _symlink(path: Path) -> None:
    target = path.parents[3] / "elsewhere.key"
    path.rename(target)
    path.symlink_to(target)


def _chmod(m: int, up: int = 0) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        target = path
        for _ in range(up):
            target = target.parent
        target.chmod(m)

    return apply


# (name, how to break the key file, text the refusal must contain, loadable with insecure_ok)
MATRIX = [
    ("0640", _chmod(0o640), "mode 0640", True),
    ("0604", _chmod(0o604), "mode 0604", True),
    ("0644", _chmod(0o644), "mode 0644", True),
    ("symlink", _symlink, "symbolic link", True),
    ("fifo", _fifo, "not a regular file", False),
    ("group-writable parent", _chmod(0o770, up=1), "writable by group or other", True),
    ("other-writable root", _chmod(0o703, up=3), "writable by group or other", True),
]


@pytest.mark.parametrize(
    ("name", "breaker", "reason", "loadable"), MATRIX, ids=[m[0] for m in MATRIX]
)
def test_permission_matrix(
    tmp_path: Path, name: str, breaker: Callable[[Path], None], reason: str, loadable: bool
) -> None:
    store = KeyStore(tmp_path / "keys")
    info, _ = store.create("web1", "alice", "app")
    _, secret = store.load("web1", "alice", "app")
    breaker(info.path)

    with pytest.raises(KeyStoreError) as e:
        store.load("web1", "alice", "app")
    message = str(e.value)
    assert reason in message
    assert str(tmp_path / "keys") in message
    assert e.value.exit_code == 6
    assert store.check(info.path) is not None and reason in (store.check(info.path) or "")
    listed = store.list()
    assert [i.triple for i in listed] == ["web1.alice.app"]
    assert listed[0].problem is not None and reason in listed[0].problem

    warnings: list[str] = []
    lax = KeyStore(tmp_path / "keys", insecure_ok=True, warn=warnings.append)
    if loadable:
        got, got_secret = lax.load("web1", "alice", "app")
        assert got.key_id == info.key_id and got_secret == secret
        assert any(reason in w for w in warnings)
        n = len(warnings)
        lax.load("web1", "alice", "app")
        assert len(warnings) >= 2 * n, "warned again on every load"
    else:
        with pytest.raises(KeyStoreError, match=reason):
            lax.load("web1", "alice", "app")


@pytest.mark.parametrize("m", [0o600, 0o400])
def test_private_modes_are_accepted(store: KeyStore, m: int) -> None:
    info, _ = store.create("web1", "alice", "app")
    info.path.chmod(m)
    assert store.check(info.path) is None
    assert store.load("web1", "alice", "app")[0] == info
    assert store.list()[0].problem is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_key_owned_by_another_uid_is_refused(store: KeyStore) -> None:
    info, _ = store.create("web1", "alice", "app")
    os.chown(info.path, 4242, -1)
    with pytest.raises(KeyStoreError, match="owned by uid 4242"):
        store.load("web1", "alice", "app")


def test_symlinked_directory_is_not_followed(store: KeyStore, tmp_path: Path) -> None:
    store.create("web1", "alice", "app")
    (store.root / "web1").rename(tmp_path / "outside")
    (store.root / "web1").symlink_to(tmp_path / "outside")
    with pytest.raises(KeyStoreError, match="symbolic link"):
        store.load("web1", "alice", "app")
    with pytest.raises(KeyStoreError, match="symbolic link"):
        store.create("web1", "alice", "db")
    assert not (tmp_path / "outside" / "alice" / "db.key").exists()


def test_insecure_store_refuses_new_keys(store: KeyStore) -> None:
    store.create("web1", "alice", "app")
    (store.root / "web1").chmod(0o777)
    with pytest.raises(KeyStoreError, match="writable by group or other"):
        store.create("web1", "bob")
    assert not (store.root / "web1" / "bob.key").exists()


def test_malformed_and_misplaced_files_are_refused_even_when_lax(store: KeyStore) -> None:
    lax = KeyStore(store.root, insecure_ok=True, warn=lambda _m: None)
    info, _ = store.create("web1", "alice", "app")
    info.path.write_bytes(b"rex-key 1\ntriple: web1.alice.app\n")
    with pytest.raises(KeyStoreError, match="malformed key file"):
        lax.load("web1", "alice", "app")
    other, _ = store.create("web1", "bob", "app")
    info.path.write_bytes(other.path.read_bytes())
    with pytest.raises(KeyStoreError, match=r"names triple 'web1\.bob\.app'"):
        lax.load("web1", "alice", "app")
    found = store.find("web1", "alice", "app")
    assert found is not None and found.problem
    info.path.write_bytes(b"x" * 100_000)
    with pytest.raises(KeyStoreError, match="larger than"):
        lax.load("web1", "alice", "app")


def test_list_is_sorted_and_ignores_temporaries(store: KeyStore) -> None:
    for host, user, program in [
        ("web2", "bob", None),
        ("db.example.com", "alice", "pg"),
        ("web1", "alice", "app"),
        ("web1", "alice", None),
    ]:
        store.create(host, user, program)
    (store.root / "web1" / ".alice.key.abc.tmp").write_bytes(b"partial")
    (store.root / "web1" / "notes.txt").write_bytes(b"x")
    triples = [i.triple for i in store.list()]
    assert triples == sorted(triples)
    assert set(triples) == {"web2.bob", "db.example.com.alice.pg", "web1.alice.app", "web1.alice"}
    assert KeyStore(store.root / "missing").list() == []


BAD_NAMES = [
    ("..", "alice", None),
    ("web1", "..", None),
    ("web1", "alice", ".."),
    ("a/b", "alice", None),
    ("web1", "al/ice", None),
    ("web1", "alice;id", None),
    ("web1", "$(id)", None),
    ("web1", "alice", "$(id)"),
    ("-web1", "alice", None),
    ("web1", "-alice", None),
    ("web 1", "alice", None),
    ("web1", "alice", "my app"),
    ("", "alice", None),
]


@pytest.mark.parametrize(("host", "user", "program"), BAD_NAMES)
def test_bad_names_are_usage_errors_before_any_file(
    tmp_path: Path, host: str, user: str, program: str | None
) -> None:
    store = KeyStore(tmp_path / "keys")
    for call in (
        lambda: store.create(host, user, program),
        lambda: store.create(host, user, program, force=True),
        lambda: store.load(host, user, program or "app"),
        lambda: store.find(host, user, program),
        lambda: store.revoke(host, user, program),
        lambda: store.path_for(host, user, program),
    ):
        with pytest.raises(UsageError) as e:
            call()
        assert e.value.exit_code == 5
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text",
    [
        "../x.alice",
        "web1/x.alice",
        "web1.alice;id",
        "web1.$(id)",
        "-web1.alice",
        "a b.c",
        "web1",
        "web1..app",
    ],
)
def test_bad_triples(text: str) -> None:
    with pytest.raises(UsageError):
        parse_key_triple(text)


def test_parse_key_triple() -> None:
    assert parse_key_triple("web1.alice") == ("web1", "alice", None)
    assert parse_key_triple("a.b.alice.app") == ("a.b", "alice", "app")
    assert parse_key_triple("a.b.alice", user_key=True) == ("a.b", "alice", None)


def test_no_secret_in_reprs_or_errors(store: KeyStore) -> None:
    info, _ = store.create("web1", "alice", "app")
    _, secret = store.load("web1", "alice", "app")
    info.path.chmod(0o644)
    with pytest.raises(KeyStoreError) as e:
        store.load("web1", "alice", "app")
    texts = [repr(info), repr(store), str(e.value), repr(store.list()), str(e.value.hint)]
    for text in texts:
        assert base64.b64encode(secret).decode() not in text
        assert secret.hex() not in text


def test_key_file_format_is_the_protocol_one(store: KeyStore) -> None:
    info, _ = store.create("web1", "alice")
    _, secret = store.load("web1", "alice", "x")
    assert info.path.read_bytes() == format_key_file("web1.alice", info.created, secret)


def test_check(store: KeyStore, tmp_path: Path) -> None:
    info, _ = store.create("web1", "alice", "app")
    assert store.check(info.path) is None
    with pytest.raises(KeyStoreError, match="no such key file"):
        store.check(store.root / "web1" / "bob.key")
    # a file outside the store is checked with its own directory
    outside = tmp_path / "loose.key"
    outside.write_bytes(info.path.read_bytes())
    outside.chmod(0o644)
    assert "mode 0644" in (store.check(outside) or "")


# --- StrictModes: the store, its known_hosts and the directories above them -------------------


def test_a_store_below_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename keys/ away and put their own in its place
    store = KeyStore(shared / "keys")
    with pytest.raises(KeyStoreError, match=f"{shared}: mode 0777 .*chmod go-w {shared}"):
        store.create("web1", "alice", "app")
    assert not (shared / "keys").exists()
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot rename or remove what is ours
    store.create("web1", "alice", "app")
    assert store.load("web1", "alice", "app")[1]
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 4242, -1)
    (other / "keys").mkdir(mode=0o700)
    with pytest.raises(KeyStoreError, match=f"{other}: owned by uid 4242.*chown"):
        KeyStore(other / "keys").load("web1", "alice", "app")


def test_a_symlinked_store_is_refused_unless_insecure_keys(tmp_path: Path) -> None:
    real = KeyStore(tmp_path / "real")
    real.create("web1", "alice", "app")
    (tmp_path / "keys").symlink_to(tmp_path / "real")
    store = KeyStore(tmp_path / "keys")
    with pytest.raises(KeyStoreError, match="keys: is a symbolic link"):
        store.load("web1", "alice", "app")
    with pytest.raises(KeyStoreError, match="symbolic link"):
        store.create("web1", "bob")
    assert not (tmp_path / "real" / "web1" / "bob.key").exists()
    warned: list[str] = []
    lax = KeyStore(tmp_path / "keys", insecure_ok=True, warn=warned.append)
    assert lax.load("web1", "alice", "app")[1]
    assert any("is a symbolic link" in w for w in warned)


@pytest.mark.parametrize(
    "spoil, problem",
    [
        (lambda p: p.chmod(0o664), "mode 0664 lets group or other write"),
        (lambda p: os.chown(p, 4242, -1), "owned by uid 4242"),
        (lambda p: (p.rename(p.parent / "elsewhere"), p.symlink_to("elsewhere")), "symbolic link"),
    ],
    ids=["group-writable", "another-owner", "symlink"],
)
def test_the_stores_known_hosts_is_refused_when_unsafe(
    store: KeyStore, spoil: Callable[[Path], object], problem: str
) -> None:
    store.create("web1", "alice", "app")
    pinned = store.root / "known_hosts"
    pinned.write_text("[127.0.0.1]:22 ssh-ed25519 AAAA\n")
    pinned.chmod(0o644)  # ssh's own mode for it: fine
    assert default_known_hosts(store, None) == str(pinned)
    spoil(pinned)
    with pytest.raises(KeyStoreError, match=f"{pinned}: .*{problem}"):
        default_known_hosts(store, None)
    assert default_known_hosts(store, "/elsewhere/known_hosts") == "/elsewhere/known_hosts"
