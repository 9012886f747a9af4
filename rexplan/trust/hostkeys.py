"""`rex hostkeys`: fetch the SSH host keys of a manifest's hosts, pin them, verify the pins."""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rexplan.core.model import Host, Manifest, Timeouts, User
from rexplan.core.text import format_columns, printable
from rexplan.errors import KeyStoreError, TransportError, UsageError
from rexplan.transport.base import kind
from rexplan.transport.pinning import HostKeyInfo, host_key_name, host_key_status
from rexplan.transport.route import Hop, route
from rexplan.transport.scan import Scanned, scan_route
from rexplan.trust.keys import KeyStore
from rexplan.trust.output import STDOUT, Output

FORMAT = 1
#: what ``scan`` shows for a key known_hosts does not hold yet (``verify`` says ``unknown``)
_SCAN_WORDS = {"unknown": "new"}


@dataclass(frozen=True)
class HostKeyReport:
    """What one manifest host offered and how it compares with known_hosts.

    ``status``: ``ok``, ``unknown``, ``changed``, ``local`` or ``unreachable``; ``action`` is
    ``recorded`` or ``replaced`` when scan wrote the key; ``pinned`` holds the fingerprints
    known_hosts had for the host.
    """

    host: Host
    name: str  # known_hosts name: addr or [addr]:port; "" for local hosts
    status: str
    key: HostKeyInfo | None = None
    pinned: tuple[str, ...] = ()
    detail: str = ""
    action: str = ""


def known_hosts_path(keys: str | None, known_hosts: str | None) -> Path:
    """``--known-hosts`` if given, else ``known_hosts`` in the key store (``--keys``/REX_KEYS),
    refused (KeyStoreError, exit 6) when it or the store is a symlink, another user's, or
    writable by others (KeyStore.pinned_hosts): scan writes pins there."""
    if known_hosts:
        return Path(known_hosts)
    return KeyStore(keys).pinned_hosts()


def _connect_timeout(manifest: Manifest, host: Host) -> float:
    return min(
        (p.timeouts.connect for p in manifest.programs if host.name in p.hosts),
        default=Timeouts().connect,
    )


def _login_user(manifest: Manifest, host: Host) -> User:
    """Who rex would log in as on ``host`` (its bastions are logged in to as the route says):
    the user of its first program, else defaults.user, else the first user."""
    for p in manifest.programs:
        if host.name in p.hosts:
            return manifest.user(p.user_on(host.name))
    if manifest.default_user is not None:
        return manifest.user(manifest.default_user)
    return manifest.users[0] if manifest.users else User("scan", "scan", login_set=False)


def scan_hosts(
    manifest: Manifest,
    known_hosts: Path,
    *,
    accept: bool = False,
    replace: Sequence[str] = (),
) -> list[HostKeyReport]:
    """Fetch every SSH host's key once, serially, in manifest order, and compare it with the pin.

    A host behind bastions reports each bastion first (once per run), then itself, fetched
    through them: rex logs in to a bastion only when its key is pinned, or new and ``accept``,
    or it is named in ``replace``.
    Hosts reached directly at the same known_hosts name share one fetch. Nothing is written.
    """
    text = _read(known_hosts)
    fetched: dict[str, HostKeyInfo | TransportError] = {}
    reports: list[HostKeyReport] = []
    shown: set[str] = set()  # bastions already reported

    def trust(hop: Hop, info: HostKeyInfo, status: str) -> bool:
        # the keys scan is about to pin: new ones with --accept, a replaced bastion's
        return (status == "unknown" and (accept or hop.label in replace)) or (
            status == "changed" and hop.label in replace
        )

    for host in manifest.hosts:
        if not kind(host.transport).pins_host_keys:
            reports.append(HostKeyReport(host, "", "local"))
            continue
        timeout = _connect_timeout(manifest, host)
        user = _login_user(manifest, host)
        try:
            path = route(host, user)
        except TransportError:
            path = None  # scan_route reports it
        direct = None if path is None or path.jumps else path.target
        if direct is not None:
            name = host_key_name(direct.address, direct.port)
            if name in fetched:  # another host of the manifest on the same sshd
                scanned = [Scanned(direct, False, *_split_got(fetched[name]))]
            else:
                scanned = scan_route(
                    host, user, os.fspath(known_hosts), timeout=timeout, trust=trust
                )
        else:
            scanned = scan_route(host, user, os.fspath(known_hosts), timeout=timeout, trust=trust)
        for seen in scanned:
            hop = seen.hop
            name = host_key_name(hop.address, hop.port)
            if seen.bastion:
                if name in shown:
                    continue
                shown.add(name)
            if seen.bastion:
                row = Host(hop.label, hop.address, hop.port)
            else:  # the address and port dialled (ssh_config's HostName and Port applied)
                row = dataclasses.replace(host, address=hop.address, port=hop.port)
            got = seen.key or seen.error
            if got is not None and direct is not None:
                fetched.setdefault(name, got)
            note = f"bastion of {host.name}" if seen.bastion else ""
            if not isinstance(got, HostKeyInfo):
                detail = str(got) if got is not None else "not scanned"
                reports.append(HostKeyReport(row, name, "unreachable", detail=detail))
                continue
            pinned = tuple(_fingerprint(b64) for _, b64 in pinned_keys(text, name))
            status = host_key_status(known_hosts, got)
            reports.append(HostKeyReport(row, name, status, got, pinned, detail=note))
    return reports


def _split_got(
    got: HostKeyInfo | TransportError,
) -> tuple[HostKeyInfo | None, TransportError | None]:
    return (got, None) if isinstance(got, HostKeyInfo) else (None, got)


# --- known_hosts, stdlib only (OpenSSH's format; paramiko stays in rexplan.transport) -------------


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise KeyStoreError(f"{path}: {e.strerror}") from None


def _fingerprint(b64: str) -> str:
    try:
        blob = base64.b64decode(b64, validate=True)
    except binascii.Error:
        return "(malformed)"
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _matches(entry: str, name: str) -> bool:
    """Whether one known_hosts host entry (plain or ``|1|salt|hash`` hashed) names ``name``."""
    if not entry.startswith("|1|"):
        return entry == name
    try:
        _, _, salt, digest = entry.split("|")
        want = base64.b64decode(digest, validate=True)
        mac = hmac.new(base64.b64decode(salt, validate=True), name.encode(), hashlib.sha1)
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(mac.digest(), want)


def _split(line: str) -> tuple[list[str], str] | None:
    """(host entries, "type key [comment]") of a plain key line; None for anything else."""
    stripped = line.strip()
    # comments, blank lines and @cert-authority/@revoked lines are never touched
    if not stripped or stripped.startswith(("#", "@")):
        return None
    fields = stripped.split(None, 1)
    if len(fields) < 2 or len(fields[1].split()) < 2:
        return None
    return fields[0].split(","), fields[1]


def pinned_keys(text: str, name: str) -> list[tuple[str, str]]:
    """(key type, base64) of every known_hosts line naming ``name``."""
    found = []
    for line in text.splitlines():
        parsed = _split(line)
        if parsed is not None and any(_matches(e, name) for e in parsed[0]):
            key_type, b64 = parsed[1].split()[:2]
            found.append((key_type, b64))
    return found


def pinned_text(text: str, add: Sequence[HostKeyInfo], replace: Sequence[HostKeyInfo]) -> str:
    """known_hosts ``text`` without any pin of the ``replace`` names, plus lines for all keys.

    A line that also names other hosts keeps them; only the replaced name leaves it.
    """
    drop = {k.name for k in replace}
    lines = []
    for line in text.splitlines(keepends=True):
        parsed = _split(line)
        if parsed is None or not drop:
            lines.append(line)
            continue
        entries, rest = parsed
        kept = [e for e in entries if not any(_matches(e, n) for n in drop)]
        if len(kept) == len(entries):
            lines.append(line)
        elif kept:
            lines.append(f"{','.join(kept)} {rest}\n")
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    added = dict.fromkeys(k.known_hosts_line for k in (*replace, *add))
    return "".join(lines) + "".join(added)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: 0600 temp file in the same directory, fsync, rename.

    A symlinked ``--known-hosts`` is followed, so the file it points to is updated (the key
    store's own known_hosts is never a symlink: known_hosts_path refuses it); a missing key
    store directory is created 0700.
    """
    target = Path(os.path.realpath(path))
    tmp = target.parent / f".{target.name}.rex-{secrets.token_hex(6)}.tmp"
    try:
        if not target.parent.is_dir():
            target.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            # the umask may have stripped bits from the requested mode, never added
            os.fchmod(fd, 0o600)
            data = memoryview(text.encode("utf-8", "surrogateescape"))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        dirfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise KeyStoreError(f"cannot write {path}: {e.strerror or e}") from None


# --- output ---------------------------------------------------------------------------------


def _status_word(report: HostKeyReport, words: dict[str, str]) -> str:
    word = words.get(report.status, report.status)
    return f"{word}, {report.action}" if report.action else word


def _detail(report: HostKeyReport) -> str:
    if report.status == "changed" and report.pinned:
        return f"pinned {', '.join(report.pinned)}"
    return printable(report.detail)


def format_reports(reports: Sequence[HostKeyReport], *, words: dict[str, str]) -> str:
    """The table: host, known_hosts name, key type, fingerprint, status, detail."""
    rows = [
        [
            r.host.name,
            r.name or "-",
            r.key.key_type if r.key else "-",
            r.key.fingerprint if r.key else "-",
            _status_word(r, words),
            _detail(r),
        ]
        for r in reports
    ]
    header = ["HOST", "NAME", "TYPE", "FINGERPRINT", "STATUS", "DETAIL"]
    return "\n".join(format_columns(header, rows))


def counts(reports: Sequence[HostKeyReport]) -> dict[str, int]:
    """Hosts per status, every status present, in a fixed order."""
    found = {s: 0 for s in ("ok", "unknown", "changed", "local", "unreachable")}
    for r in reports:
        found[r.status] += 1
    return found


def format_summary(reports: Sequence[HostKeyReport], *, words: dict[str, str]) -> str:
    """``N hosts: 1 new, 2 ok, ...`` (statuses that occur, in a fixed order)."""
    n = len(reports)
    parts = [f"{c} {words.get(s, s)}" for s, c in counts(reports).items() if c]
    return f"{n} host{'s' if n != 1 else ''}: {', '.join(parts) or 'none'}"


def report_to_dict(report: HostKeyReport) -> dict[str, object]:
    """One host of ``verify --json``; the same keys every time."""
    return {
        "host": report.host.name,
        "name": report.name or None,
        "address": report.host.address,
        "port": report.host.port,
        "transport": report.host.transport,
        "key_type": report.key.key_type if report.key else None,
        "fingerprint": report.key.fingerprint if report.key else None,
        "pinned": list(report.pinned),
        "status": report.status,
        "detail": report.detail,
    }


# --- commands -------------------------------------------------------------------------------


def _load(path: str) -> Manifest:
    # the manifest stack (YAML, JSON Schema) is only imported when a command needs it
    from rexplan.core import manifest

    return manifest.load(path)


def bastions(m: Manifest) -> list[str]:
    """The bastions of the manifest's SSH hosts, as ``hostkeys scan`` lists them."""
    found: dict[str, None] = {}
    for host in m.hosts:
        if kind(host.transport).pins_host_keys:
            try:
                jumps = route(host, _login_user(m, host)).jumps
            except TransportError:
                continue
            found.update(dict.fromkeys(j.label for j in jumps))
    return list(found)


def _check_replace(m: Manifest, names: Sequence[str]) -> None:
    hosts = {h.name: h for h in m.hosts}
    jumps = bastions(m) if any(n not in hosts for n in names) else []
    for name in names:
        if name in jumps:
            continue
        if name not in hosts:
            raise UsageError(
                f"--replace {name!r}: no such host or bastion in {m.path}",
                hint=f"hosts: {', '.join(hosts) or '(none)'}"
                + (f"; bastions: {', '.join(jumps)}" if jumps else ""),
            )
        if not kind(hosts[name].transport).pins_host_keys:
            raise UsageError(f"--replace {name!r}: a local host has no SSH host key")


def _scan(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    m = _load(args.manifest)
    _check_replace(m, args.replace)
    known = known_hosts_path(args.keys, args.known_hosts)
    reports = scan_hosts(m, known, accept=args.accept, replace=args.replace)
    replace = set(args.replace)
    add: dict[str, HostKeyInfo] = {}
    swap: dict[str, HostKeyInfo] = {}
    for r in reports:
        if r.key is None:
            continue
        if r.status == "changed" and r.host.name in replace:
            swap[r.name] = r.key
        elif r.status == "unknown" and (args.accept or r.host.name in replace):
            add[r.name] = r.key
    if add or swap:
        write_atomically(known, pinned_text(_read(known), list(add.values()), list(swap.values())))
    done = [
        dataclasses.replace(r, action="replaced" if r.name in swap else "recorded")
        if r.name in swap or r.name in add
        else r
        for r in reports
    ]
    out(format_reports(done, words=_SCAN_WORDS))
    out(format_summary(done, words=_SCAN_WORDS))
    lines = []
    if add:
        lines.append(f"recorded {len(add)} new host key{'s' if len(add) != 1 else ''} in {known}")
    if swap:
        lines.append(f"replaced the pinned key of {', '.join(sorted(swap))} in {known}")
    waiting = [r for r in done if r.status == "unknown" and not r.action]
    if waiting:
        lines.append(
            f"{len(waiting)} new host key{'s' if len(waiting) != 1 else ''} not recorded: "
            "compare the fingerprints with the hosts' own (ssh-keygen -lf "
            "/etc/ssh/ssh_host_ed25519_key.pub), then run again with --accept"
        )
    refused = [r for r in done if r.status == "changed" and not r.action]
    hosts = {h.name for h in m.hosts}
    for r in refused:
        if r.host.name not in hosts:  # a bastion, named as its jump is written
            lines.append(
                f"bastion {r.host.name}: host key CHANGED; {known} left unchanged. If it was "
                f"really rebuilt, check its new fingerprint, then: rex hostkeys scan -m "
                f"{args.manifest} --replace {r.host.name}"
            )
            continue
        lines.append(
            f"{r.host.name}: host key CHANGED; {known} left unchanged. If {r.host.name} was "
            f"really rebuilt, check its new fingerprint, then: rex hostkeys scan -m "
            f"{args.manifest} --replace {r.host.name}"
        )
    if lines:
        out("\n".join(lines))
    if refused:
        return 6
    return 3 if any(r.status == "unreachable" for r in done) else 0


def _verify(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    m = _load(args.manifest)
    known = known_hosts_path(args.keys, args.known_hosts)
    reports = scan_hosts(m, known)
    if args.json:
        doc = {
            "format": FORMAT,
            "manifest": m.path,
            "known_hosts": str(known),
            "hosts": [report_to_dict(r) for r in reports],
            "counts": counts(reports),
        }
        out(json.dumps(doc, indent=2))
    else:
        out(format_reports(reports, words={}))
        out(format_summary(reports, words={}))
        if any(r.status == "unknown" for r in reports):
            out(
                f"unknown host keys: check their fingerprints, then pin them: "
                f"rex hostkeys scan -m {args.manifest} --accept"
            )
    if any(r.status in ("unknown", "changed") for r in reports):
        return 6
    return 3 if any(r.status == "unreachable" for r in reports) else 0


def cmd_hostkeys(args: argparse.Namespace, out: Output = STDOUT) -> int:
    """``rex hostkeys scan|verify``: output to ``out`` (default stdout); the exit code."""
    if args.hostkeys_command == "scan":
        return _scan(args, out.text)
    return _verify(args, out.text)
