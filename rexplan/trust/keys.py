"""The launcher's key store: one secret per host.user[.program], created, checked and revoked."""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rexplan.core.model import parse_triple
from rexplan.errors import KeyStoreError, UsageError
from rexplan.trust import strictmodes
from rexplan.wire.keyfile import (
    KEY_BYTES,
    KeyFormatError,
    format_key_file,
    key_id,
    key_relpath,
    parse_key_file,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: a key file is ~150 bytes; anything much larger is not one, and is not read into memory
_MAX_KEY_FILE = 4096
_NAMES_HINT = (
    "hosts are hostname-like (letters, digits, '-', '_', dots); users and programs match "
    "[a-z_][a-z0-9_-]{0,31}"
)
_INSECURE_HINT = (
    "chmod 600 the key file and chmod 700 its directories (or rotate it with "
    "'rex_key create --force'); --insecure-keys loads it anyway"
)
_PLACE_HINT = (
    "the key store must be a directory of its own, the user's (or root's), in directories "
    "no other user can write to (as ssh's StrictModes); fix what is named, or move the store "
    "($REX_KEYS); --insecure-keys uses it anyway"
)
_KNOWN_HOSTS_HINT = (
    "the key store's known_hosts must be a file of its own, the user's (or root's), not "
    "writable by group or other, in a store that is safe too; fix what is named, or pass "
    "--known-hosts"
)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyInfo:
    """A key's public facts; the secret itself is never part of it.

    ``problem`` is set by ``list``/``find`` when the file is insecure, malformed or names
    another triple; ``key_id`` and ``created`` are empty when the file could not be read.
    """

    triple: str
    host: str
    user: str
    program: str | None
    key_id: str
    created: str
    path: Path
    problem: str | None = None


def key_triple(host: str, user: str, program: str | None) -> str:
    """``host.user`` for a user key, ``host.user.program`` for a program key."""
    return f"{host}.{user}" if program is None else f"{host}.{user}.{program}"


def parse_key_triple(text: str, *, user_key: bool = False) -> tuple[str, str, str | None]:
    """Parse a command-line ``host.user[.program]``; ``user_key`` reads ``a.b.c`` as host ``a.b``.

    Raises UsageError: a bad name is an input error, found before any file is touched.
    """
    try:
        host, user, program = parse_triple(text)
    except ValueError:
        raise UsageError(f"{text!r} is not host.user[.program]", hint=_NAMES_HINT) from None
    if user_key and program is not None:
        host, user, program = f"{host}.{user}", program, None
    relpath(host, user, program)
    return host, user, program


def relpath(host: str, user: str, program: str | None) -> str:
    """The key's path inside a store; raises UsageError for a name that could escape it."""
    try:
        return key_relpath(host, user, program)
    except KeyFormatError as e:
        raise UsageError(str(e), hint=_NAMES_HINT) from None


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dir_problems(st: os.stat_result, path: Path) -> list[str]:
    problems = []
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        problems.append(f"{path}: directory mode {mode:04o} is writable by group or other")
    if st.st_uid not in (os.geteuid(), 0):
        problems.append(f"{path}: directory owned by uid {st.st_uid}, not {os.geteuid()}")
    return problems


def _file_problems(st: os.stat_result, path: Path) -> list[str]:
    problems = []
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        problems.append(f"{path}: mode {mode:04o} gives group or other access (want 0600)")
    if st.st_uid != os.geteuid():
        problems.append(f"{path}: owned by uid {st.st_uid}, not {os.geteuid()}")
    return problems


def _lstat_at(dirfd: int, name: str, path: Path) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyStoreError(f"{path}: {e.strerror}") from None


def _read_fd(fd: int, path: Path) -> bytes:
    chunks = []
    size = 0
    while size <= _MAX_KEY_FILE:
        chunk = os.read(fd, _MAX_KEY_FILE + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > _MAX_KEY_FILE:
        raise KeyStoreError(f"{path}: malformed key file: larger than {_MAX_KEY_FILE} bytes")
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class KeyStore:
    """Keys under ``root`` (``$REX_KEYS`` or ``./keys``): files 0600, directories 0700.

    Every path is walked directory by directory with ``openat`` and ``O_NOFOLLOW``, so a
    symlink planted anywhere below the root is seen, not followed (unless ``insecure_ok``).
    The root itself must not be a symlink, and the directories above it must be safe as ssh's
    StrictModes wants them (rexplan.trust.strictmodes): else the store is insecure too.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        insecure_ok: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if root is None:
            root = os.environ.get("REX_KEYS") or "keys"
        self.root = Path(root)
        self.insecure_ok = insecure_ok
        self._warn = warn if warn is not None else _log.warning

    def __repr__(self) -> str:
        return f"KeyStore({str(self.root)!r}, insecure_ok={self.insecure_ok})"

    def path_for(self, host: str, user: str, program: str | None) -> Path:
        """Where the key of exactly this triple lives (validated; the file may not exist)."""
        return self.root / relpath(host, user, program)

    def create(
        self, host: str, user: str, program: str | None = None, *, force: bool = False
    ) -> tuple[KeyInfo, bool]:
        """Make a key unless one exists; ``force`` rotates it. Returns (info, new key written)."""
        parts = relpath(host, user, program).split("/")
        reasons: builtins.list[str] = []
        dirfd = self._dir_chain(parts[:-1], follow=self.insecure_ok, create=True, reasons=reasons)
        try:
            self._judge(reasons)
            name, path = parts[-1], self.root.joinpath(*parts)
            if not force:
                try:
                    return self._load_at(dirfd, name, path, host, user, program)[0], False
                except FileNotFoundError:
                    pass
            triple = key_triple(host, user, program)
            secret = secrets.token_bytes(KEY_BYTES)
            created = _now()
            tmp = f".{name}.{secrets.token_hex(6)}.tmp"
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dirfd,
            )
            try:
                try:
                    # the umask may have stripped bits from the requested mode, never added
                    os.fchmod(fd, 0o600)
                    _write_all(fd, format_key_file(triple, created, secret))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if force:
                    os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                else:
                    # link() fails if a concurrent creator got there first: never clobber
                    try:
                        os.link(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                    except FileExistsError:
                        return self._load_at(dirfd, name, path, host, user, program)[0], False
            finally:
                try:
                    os.unlink(tmp, dir_fd=dirfd)
                except FileNotFoundError:
                    pass
            os.fsync(dirfd)
        except OSError as e:
            raise KeyStoreError(f"{self.root.joinpath(*parts)}: {e.strerror}") from None
        finally:
            os.close(dirfd)
        info = KeyInfo(triple, host, user, program, key_id(secret), created, path)
        return info, True

    def load(self, host: str, user: str, program: str) -> tuple[KeyInfo, bytes]:
        """The key a step proves itself with: the program key, else the user key."""
        tried = []
        for prog in dict.fromkeys((program, None)):
            parts = relpath(host, user, prog).split("/")
            tried.append(str(self.root.joinpath(*parts)))
            reasons: builtins.list[str] = []
            try:
                dirfd = self._dir_chain(parts[:-1], follow=self.insecure_ok, reasons=reasons)
            except FileNotFoundError:
                continue
            try:
                self._judge(reasons)
                return self._load_at(dirfd, parts[-1], Path(tried[-1]), host, user, prog)
            except FileNotFoundError:
                continue
            finally:
                os.close(dirfd)
        triple = key_triple(host, user, program)
        raise KeyStoreError(
            f"no key for {triple} (looked for {' and '.join(tried)})",
            hint=f"create one with 'rex_key create {triple}'",
        )

    def find(self, host: str, user: str, program: str | None) -> KeyInfo | None:
        """The key ``load`` would pick, with ``problem`` set instead of raising; None if absent."""
        for prog in dict.fromkeys((program, None)):
            info = self._inspect(host, user, prog)
            if info is not None:
                return info
        return None

    def list(self) -> builtins.list[KeyInfo]:
        """Every key file in the store, sorted by triple; broken ones carry a ``problem``."""
        found: builtins.list[tuple[str, str, str | None]] = []
        for host in self._subdirs(self.root):
            for entry in self._entries(self.root / host):
                if entry.name.endswith(".key") and not entry.is_dir(follow_symlinks=False):
                    found.append((host, entry.name[:-4], None))
                elif entry.is_dir(follow_symlinks=False):
                    for sub in self._entries(Path(entry.path)):
                        if sub.name.endswith(".key") and not sub.is_dir(follow_symlinks=False):
                            found.append((host, entry.name, sub.name[:-4]))
        infos = []
        for host, user, program in found:
            try:
                relpath(host, user, program)
            except UsageError:
                continue
            info = self._inspect(host, user, program)
            if info is not None:
                infos.append(info)
        return sorted(infos, key=lambda i: (i.triple, str(i.path)))

    def revoke(self, host: str, user: str, program: str | None) -> bool:
        """Delete exactly this triple's key file; False when there was none."""
        parts = relpath(host, user, program).split("/")
        try:
            dirfd = self._dir_chain(parts[:-1], follow=self.insecure_ok, reasons=[])
        except FileNotFoundError:
            return False
        try:
            os.unlink(parts[-1], dir_fd=dirfd)
            os.fsync(dirfd)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise KeyStoreError(f"{self.root.joinpath(*parts)}: {e.strerror}") from None
        finally:
            os.close(dirfd)
        return True

    def check(self, path: str | os.PathLike[str]) -> str | None:
        """Why a key file (and its directories up to the root) is insecure, or None if it is not.

        Raises KeyStoreError when the file does not exist.
        """
        path = Path(path)
        root = Path(os.path.abspath(self.root))
        try:
            parts: Sequence[str] = Path(os.path.abspath(path)).relative_to(root).parts
            start = self.root
        except ValueError:
            parts, start = (path.name,), path.parent
        reasons: builtins.list[str] = []
        try:
            dirfd = self._dir_chain(parts[:-1], follow=False, reasons=reasons, root=start)
            try:
                os.close(self._open_file(dirfd, parts[-1], path, follow=False, reasons=reasons))
            finally:
                os.close(dirfd)
        except FileNotFoundError:
            raise KeyStoreError(f"{path}: no such key file") from None
        except KeyStoreError as e:
            return str(e)
        return "; ".join(reasons) or None

    def pinned_hosts(self) -> Path:
        """The store's ``known_hosts`` (it may not exist yet), checked before rex reads or
        writes it: the file and the store are not symbolic links, are the user's (or root's)
        and not writable by group or other, and neither is a directory above them (see
        rexplan.trust.strictmodes). Raises KeyStoreError (exit 6) unless ``insecure_ok``, which
        warns."""
        path = self.root / "known_hosts"
        reasons = self._root_problems()
        with contextlib.suppress(FileNotFoundError):
            reasons += strictmodes.entry_problems(self.root, directory=True)
            reasons += strictmodes.entry_problems(path, directory=False)
        self._judge(reasons, hint=_KNOWN_HOSTS_HINT)
        return path

    # -- internals ---------------------------------------------------------------------------

    def _root_problems(self, top: Path | None = None) -> builtins.list[str]:
        """The directories above the store (or ``top``), and the root not being a symlink."""
        top = self.root if top is None else top
        reasons = strictmodes.parent_problems(top)
        if os.path.islink(top):
            reasons.append(f"{top}: is a symbolic link (to {os.readlink(top)})")
        return reasons

    def _judge(self, reasons: builtins.list[str], *, hint: str = _INSECURE_HINT) -> None:
        if not reasons:
            return
        if not self.insecure_ok:
            raise KeyStoreError("; ".join(reasons), hint=hint)
        for reason in reasons:
            self._warn(f"using an insecure key (--insecure-keys): {reason}")

    def _make_root(self) -> None:
        try:
            os.mkdir(self.root, 0o700)
        except FileExistsError:
            return
        except FileNotFoundError:
            os.makedirs(self.root.parent, mode=0o700, exist_ok=True)
            try:
                os.mkdir(self.root, 0o700)
            except FileExistsError:
                return
        os.chmod(self.root, 0o700)

    def _dir_chain(
        self,
        names: Sequence[str],
        *,
        follow: bool,
        reasons: builtins.list[str],
        create: bool = False,
        root: Path | None = None,
    ) -> int:
        """Open the directory ``root/names...`` one level at a time; returns its fd."""
        path = self.root if root is None else root
        # a symlinked root or an unsafe directory above it: refused before anything is read
        # or made there; used only with insecure_ok (as a symlink below the root)
        problems = self._root_problems(path)
        if problems and not self.insecure_ok:
            raise KeyStoreError("; ".join(problems), hint=_PLACE_HINT)
        reasons.extend(problems)
        try:
            if create:
                self._make_root()
            fd = os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise KeyStoreError(f"{path}: {e.strerror}") from None
        try:
            reasons.extend(_dir_problems(os.fstat(fd), path))
            for name in names:
                path = path / name
                child = self._child_dir(fd, name, path, follow=follow, create=create)
                os.close(fd)
                fd = child
                reasons.extend(_dir_problems(os.fstat(fd), path))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _child_dir(self, dirfd: int, name: str, path: Path, *, follow: bool, create: bool) -> int:
        made = False
        if create:
            try:
                os.mkdir(name, 0o700, dir_fd=dirfd)
                made = True
            except FileExistsError:
                pass
            except OSError as e:
                raise KeyStoreError(f"{path}: {e.strerror}") from None
        st = _lstat_at(dirfd, name, path)
        flags = _DIR_FLAGS | os.O_NOFOLLOW
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                raise KeyStoreError(f"{path}: is a symbolic link", hint=_INSECURE_HINT)
            self._warn(f"following a symbolic link (--insecure-keys): {path}")
            flags = _DIR_FLAGS
        elif not stat.S_ISDIR(st.st_mode):
            raise KeyStoreError(f"{path}: is not a directory")
        try:
            fd = os.open(name, flags, dir_fd=dirfd)
        except OSError as e:
            raise KeyStoreError(f"{path}: {e.strerror}") from None
        if made:
            os.fchmod(fd, 0o700)
            os.fsync(dirfd)
        return fd

    def _open_file(
        self, dirfd: int, name: str, path: Path, *, follow: bool, reasons: builtins.list[str]
    ) -> int:
        st = _lstat_at(dirfd, name, path)
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                raise KeyStoreError(f"{path}: is a symbolic link", hint=_INSECURE_HINT)
            reasons.append(f"{path}: is a symbolic link")
            flags &= ~os.O_NOFOLLOW
        elif not stat.S_ISREG(st.st_mode):
            raise KeyStoreError(f"{path}: is not a regular file")
        try:
            # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the open
            fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=dirfd)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise KeyStoreError(f"{path}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise KeyStoreError(f"{path}: is not a regular file")
        reasons.extend(_file_problems(st, path))
        return fd

    def _load_at(
        self, dirfd: int, name: str, path: Path, host: str, user: str, program: str | None
    ) -> tuple[KeyInfo, bytes]:
        """Strictly read one key file: insecure, malformed or misplaced files raise."""
        reasons: builtins.list[str] = []
        fd = self._open_file(dirfd, name, path, follow=self.insecure_ok, reasons=reasons)
        try:
            self._judge(reasons)
            data = _read_fd(fd, path)
        finally:
            os.close(fd)
        triple = key_triple(host, user, program)
        try:
            file_triple, created, secret = parse_key_file(data)
        except KeyFormatError as e:
            raise KeyStoreError(
                f"{path}: malformed key file: {e}",
                hint=f"replace it with 'rex_key create --force {triple}'",
            ) from None
        if file_triple != triple:
            raise KeyStoreError(
                f"{path}: the file names triple {file_triple!r}, not {triple!r}",
                hint="a key file was moved or copied; recreate it with 'rex_key create --force'",
            )
        return KeyInfo(triple, host, user, program, key_id(secret), created, path), secret

    def _inspect(self, host: str, user: str, program: str | None) -> KeyInfo | None:
        """Read a key file's public facts without following links; None if it is absent."""
        parts = relpath(host, user, program).split("/")
        path = self.root.joinpath(*parts)
        triple = key_triple(host, user, program)
        reasons: builtins.list[str] = []
        try:
            dirfd = self._dir_chain(parts[:-1], follow=False, reasons=reasons)
            try:
                fd = self._open_file(dirfd, parts[-1], path, follow=False, reasons=reasons)
            finally:
                os.close(dirfd)
            try:
                data = _read_fd(fd, path)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None
        except KeyStoreError as e:
            return KeyInfo(triple, host, user, program, "", "", path, str(e))
        try:
            file_triple, created, secret = parse_key_file(data)
        except KeyFormatError as e:
            bad = "; ".join([*reasons, f"{path}: malformed key file: {e}"])
            return KeyInfo(triple, host, user, program, "", "", path, bad)
        if file_triple != triple:
            reasons.append(f"{path}: the file names triple {file_triple!r}, not {triple!r}")
        problem = "; ".join(reasons) or None
        return KeyInfo(triple, host, user, program, key_id(secret), created, path, problem)

    def _subdirs(self, path: Path) -> builtins.list[str]:
        return sorted(e.name for e in self._entries(path) if e.is_dir(follow_symlinks=False))

    def _entries(self, path: Path) -> builtins.list[os.DirEntry[str]]:
        try:
            with os.scandir(path) as it:
                # dot files are the temporaries of in-flight atomic writes
                return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise KeyStoreError(f"{path}: {e.strerror}") from None


def default_known_hosts(store: KeyStore, explicit: str | None) -> str | None:
    """``--known-hosts`` if given, else the store's ``known_hosts`` if present, else None.

    None means ~/.ssh/known_hosts (the transport's default). ``rex hostkeys scan --accept``
    records into the store's file, so pinning once there is enough for every command. The
    store's file is checked first (KeyStore.pinned_hosts: KeyStoreError when insecure).
    """
    if explicit:
        return str(explicit)
    pinned = store.pinned_hosts()
    return str(pinned) if pinned.is_file() else None
