"""The launch's key: the program key under REX_HOME/keys, else the host.user key; refused
unless it is a regular 0600 file of the user (no symlink) under directories no other user
can write."""

from __future__ import annotations

import errno
import os
import stat

from rexplan.remote.agent.failure import EXIT_KEY, Failure
from rexplan.wire import keyfile
from rexplan.wire.launch import Launch


def _check_dir(path: str, follow: bool) -> None:
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise Failure(EXIT_KEY, f"{path} is not a directory")
    if st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o022:
        raise Failure(EXIT_KEY, f"{path} is writable by others or owned by another user")


def load_key(home: str, launch: Launch) -> bytes:
    """The triple's secret: the program key, else the host.user key; refuses insecure files."""
    host, user, _ = launch.triple.rsplit(".", 2)
    parts = launch.key_path.split("/")
    candidates = [(launch.key_path, launch.triple)]
    if len(parts) == 3:
        candidates.append((f"{parts[0]}/{parts[1]}.key", f"{host}.{user}"))
    keys = os.path.join(home, "keys")
    for rel, owner in candidates:
        path = os.path.join(keys, rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Failure(EXIT_KEY, f"key {rel} is a symlink; refusing it") from None
            raise Failure(EXIT_KEY, f"cannot open key {rel}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Failure(EXIT_KEY, f"key {rel} is not a regular file")
            if st.st_uid != os.getuid():
                raise Failure(EXIT_KEY, f"key {rel} is owned by another user")
            if st.st_mode & 0o077:
                mode = stat.S_IMODE(st.st_mode)
                raise Failure(EXIT_KEY, f"key {rel} has mode {mode:04o}; it must be 0600")
            _check_dir(home, follow=True)
            directory = keys
            _check_dir(directory, follow=False)
            for part in rel.split("/")[:-1]:
                directory = os.path.join(directory, part)
                _check_dir(directory, follow=False)
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            named, _, secret = keyfile.parse_key_file(data)
        except keyfile.KeyFormatError as exc:
            raise Failure(EXIT_KEY, f"key {rel} is malformed: {exc}") from None
        if named != owner:
            raise Failure(EXIT_KEY, f"key {rel} names {named}, not {owner}")
        return secret
    raise Failure(EXIT_KEY, f"no key for {launch.triple} under {keys}")
