"""Host-key pinning: known_hosts names and parsing, the strict policy, `rex hostkeys` status."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import NoReturn

import paramiko


def host_key_name(address: str, port: int) -> str:
    """The known_hosts name OpenSSH and paramiko use: ``addr``, or ``[addr]:port`` off port 22."""
    return address if port == 22 else f"[{address}]:{port}"


class UnknownHostKey(paramiko.SSHException):
    def __init__(self, name: str, key: paramiko.PKey) -> None:
        super().__init__(f"{name} not in known_hosts")
        self.name = name
        self.key = key


class StrictPolicy(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, raising a distinct exception so rex can name the phase."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise UnknownHostKey(hostname, key)


class _KnownHostsCache:
    """known_hosts files parsed once per content (path, mtime, size), not once per connection:
    paramiko takes its logging module lock for every line it parses, which serialised a
    64-host fan-out behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[tuple[int, int], paramiko.HostKeys]] = {}

    def get(self, path: str) -> paramiko.HostKeys | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._parsed.get(path)
            if hit is None or hit[0] != stamp:
                hit = (stamp, paramiko.HostKeys(path))
                self._parsed[path] = hit
            return hit[1]


KNOWN_HOSTS = _KnownHostsCache()


def load_known_hosts(client: paramiko.SSHClient, known_hosts: str) -> None:
    # Into the client's own HostKeys (not client.load_host_keys: no file to save back into);
    # entries are immutable once parsed, so the clients share them
    parsed = KNOWN_HOSTS.get(known_hosts)
    if parsed is None:
        return
    mine = client.get_host_keys()
    theirs, ours = getattr(parsed, "_entries", None), getattr(mine, "_entries", None)
    if isinstance(theirs, list) and isinstance(ours, list):
        ours.extend(theirs)
    else:  # a paramiko without that attribute: parse the file per client, as documented
        mine.load(known_hosts)


@dataclass(frozen=True)
class HostKeyInfo:
    """A host's public key as offered over SSH."""

    name: str  # known_hosts name: addr or [addr]:port
    key_type: str  # e.g. ssh-ed25519
    key_base64: str
    fingerprint: str  # SHA256:...

    @property
    def known_hosts_line(self) -> str:
        return f"{self.name} {self.key_type} {self.key_base64}\n"


def host_key_status(known_hosts: str | os.PathLike[str], key: HostKeyInfo) -> str:
    """``ok``, ``unknown`` (no entry for the name) or ``changed`` (entry with another key)."""
    keys = paramiko.HostKeys()
    with contextlib.suppress(FileNotFoundError):
        keys.load(os.fspath(known_hosts))
    pinned = keys.lookup(key.name)
    if pinned is None or not len(pinned):
        return "unknown"
    entry = pinned.get(key.key_type)
    return "ok" if entry is not None and entry.get_base64() == key.key_base64 else "changed"
