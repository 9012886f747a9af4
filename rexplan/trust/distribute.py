"""Keys onto hosts and off them again: SFTP only, atomic, idempotent, one connection per login."""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from rexplan.core import plan as plans
from rexplan.core.model import Host, Manifest, Timeouts, User
from rexplan.errors import RexError, TransportError, UsageError
from rexplan.transport.base import Transport
from rexplan.transport.pool import connect
from rexplan.trust.keys import KeyInfo, KeyStore, key_triple, relpath
from rexplan.wire.keyfile import KeyFormatError, format_key_file, key_id, parse_key_file

#: a remote key file larger than this is not fetched, just replaced
MAX_KEY_FILE = 4096

Connector = Callable[[Host, User, Timeouts], Transport]


@dataclass(frozen=True)
class KeyAction:
    """What happened (or, in a dry run, would happen) to one key file on one host.

    ``action``: ``new``, ``replaced`` or ``unchanged`` (distribute); ``removed`` or
    ``absent`` (revoke); ``fixed`` for a key directory whose mode was tightened to 0700.
    """

    triple: str
    key_id: str
    path: str
    action: str
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.action in ("new", "replaced", "removed", "fixed")


@dataclass(frozen=True)
class HostReport:
    """One host as one login: its key actions, or why it could not be done."""

    host: str
    login: str
    actions: tuple[KeyAction, ...] = ()
    error: str | None = None
    exit_code: int = 0

    @property
    def changed(self) -> int:
        return sum(a.changed for a in self.actions)

    @property
    def unchanged(self) -> int:
        return sum(not a.changed for a in self.actions)


@dataclass
class _Target:
    host: Host
    user: User
    timeouts: Timeouts
    keys: dict[str, tuple[KeyInfo, bytes]] = field(default_factory=dict)
    triples: dict[tuple[str, str, str | None], None] = field(default_factory=dict)


def default_connector(known_hosts: str | os.PathLike[str] | None) -> Connector:
    """A Connector opening strict-host-key transports checked against ``known_hosts``."""

    def open_transport(host: Host, user: User, timeouts: Timeouts) -> Transport:
        return connect(host, user, known_hosts=known_hosts, timeouts=timeouts)

    return open_transport


def distribute(
    manifest: Manifest,
    store: KeyStore,
    *,
    known_hosts: str | os.PathLike[str] | None,
    dry_run: bool = False,
    limit: str | None = None,
    connector: Connector | None = None,
) -> Iterator[HostReport]:
    """Copy every key the manifest's steps need to ``<rex_home>/keys/`` of the step's login,
    and every other program key of the local store whose triple the manifest authorizes on
    one of its hosts and users (``host.user.run`` for ``rex run``, say).

    All local keys are loaded (and checked) before any host is contacted, so a missing or
    insecure key stops the run with KeyStoreError and nothing half-done. Reports come in
    manifest host order while hosts are worked on in parallel (``manifest.forks``).
    """
    targets: dict[tuple[str, str], _Target] = {}
    for step in plans.compile(manifest, limit=limit).steps:
        target = targets.get((step.host, step.user))
        if target is None:
            host, user = manifest.host(step.host), manifest.user(step.user)
            target = targets[(step.host, step.user)] = _Target(host, user, step.timeouts)
        info, secret = store.load(step.host, step.user, step.program)
        target.keys[str(info.path)] = (info, secret)
    for host_name, user_name, program in authorized_keys(manifest, store, limit):
        target = targets.get((host_name, user_name))
        if target is None:
            host, user = manifest.host(host_name), manifest.user(user_name)
            timeouts = _timeouts_of(manifest, host_name, user_name)
            target = targets[(host_name, user_name)] = _Target(host, user, timeouts)
        info, secret = store.load(host_name, user_name, program)
        target.keys[str(info.path)] = (info, secret)
    work = _ordered(manifest, targets)
    opener = connector or default_connector(known_hosts)
    return _run_all(work, manifest.forks, lambda t: _host_report(t, opener, dry_run, _sync))


def revoke_remote(
    manifest: Manifest,
    triples: Sequence[tuple[str, str, str | None]],
    *,
    known_hosts: str | os.PathLike[str] | None,
    connector: Connector | None = None,
) -> Iterator[HostReport]:
    """Delete exactly these triples' key files on their hosts, as the manifest user's login.

    Every triple's host and user must be in the manifest (UsageError before any connection).
    """
    hosts = {h.name: h for h in manifest.hosts}
    users = {u.name: u for u in manifest.users}
    targets: dict[tuple[str, str], _Target] = {}
    for host, user, program in triples:
        text = key_triple(host, user, program)
        if host not in hosts:
            raise UsageError(f"{text}: host {host!r} is not in {manifest.path}")
        if user not in users:
            raise UsageError(f"{text}: user {user!r} is not in {manifest.path}")
        target = targets.get((host, user))
        if target is None:
            timeouts = _timeouts_of(manifest, host, user)
            target = targets[(host, user)] = _Target(hosts[host], users[user], timeouts)
        target.triples[(host, user, program)] = None
    work = _ordered(manifest, targets)
    opener = connector or default_connector(known_hosts)
    return _run_all(work, manifest.forks, lambda t: _host_report(t, opener, False, _remove))


def authorized_keys(
    manifest: Manifest, store: KeyStore, limit: str | None = None
) -> list[tuple[str, str, str]]:
    """The (host, user, program) of every program key in ``store`` whose host and user the
    manifest declares (its hosts ``limit`` keeps) and whose triple it authorizes."""
    hosts = {h.name: h for h in manifest.hosts}
    users = {u.name for u in manifest.users}
    keep = plans.limit_filter(manifest, limit) if limit is not None else None
    out = []
    for info in store.list():
        program = info.program
        if program is None or info.host not in hosts or info.user not in users:
            continue
        if keep is not None and not keep(hosts[info.host]):
            continue
        if manifest.authorized(info.host, info.user, program):
            out.append((info.host, info.user, program))
    return out


def _timeouts_of(manifest: Manifest, host: str, user: str) -> Timeouts:
    """The shortest connect timeouts of the manifest's programs on ``host`` as ``user``."""
    return min(
        (p.timeouts for p in manifest.programs if host in p.hosts and p.user_on(host) == user),
        key=lambda t: t.connect,
        default=Timeouts(),
    )


def exit_code(reports: Iterable[HostReport]) -> int:
    """0 when every host was done; 3 if any was unreachable, else the worst failure's code."""
    codes = {r.exit_code for r in reports if r.error is not None}
    if not codes:
        return 0
    return 3 if 3 in codes else max(codes)


def _ordered(manifest: Manifest, targets: dict[tuple[str, str], _Target]) -> list[_Target]:
    order = {h.name: i for i, h in enumerate(manifest.hosts)}
    return [targets[k] for k in sorted(targets, key=lambda k: (order[k[0]], k[1]))]


def _run_all(
    work: list[_Target], forks: int, job: Callable[[_Target], HostReport]
) -> Iterator[HostReport]:
    if not work:
        return iter(())

    def results() -> Iterator[HostReport]:
        with ThreadPoolExecutor(max_workers=max(1, min(forks, len(work)))) as pool:
            futures: list[Future[HostReport]] = [pool.submit(job, t) for t in work]
            try:
                for future in futures:
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()

    return results()


def _host_report(
    target: _Target,
    opener: Connector,
    dry_run: bool,
    act: Callable[[Transport, _Target, bool], list[KeyAction]],
) -> HostReport:
    name, login = target.host.name, target.user.login
    try:
        transport = opener(target.host, target.user, target.timeouts)
    except RexError as e:
        return HostReport(name, login, error=str(e), exit_code=e.exit_code)
    try:
        actions = act(transport, target, dry_run)
    except TransportError as e:
        return HostReport(name, login, error=str(e), exit_code=e.exit_code)
    except _HostProblem as e:
        return HostReport(name, login, error=f"{name}: {e}", exit_code=3)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        reason = e.strerror or str(e)
        return HostReport(name, login, error=f"{name}: {where}{reason}", exit_code=3)
    finally:
        transport.close()
    return HostReport(name, login, tuple(actions))


class _HostProblem(Exception):
    """Something on the host stops rex from touching its keys (e.g. a symlinked directory)."""


def key_dirs(base: str, rel: str) -> list[str]:
    """``base`` and each directory below it on the way to the key file at ``base/rel``."""
    parts = rel.split("/")[:-1]
    return [base] + [posixpath.join(base, *parts[: i + 1]) for i in range(len(parts))]


def _check_dirs(
    transport: Transport, dirs: Iterable[str], dry_run: bool, actions: list[KeyAction]
) -> None:
    """Refuse links or files where key directories belong; tighten loose ones to 0700."""
    for path in dirs:
        st = transport.stat(path)
        if st is None:
            continue  # put() creates it 0700
        mode = st[0]
        if stat.S_ISLNK(mode):
            raise _HostProblem(f"{path} is a symbolic link; refusing to write keys through it")
        if not stat.S_ISDIR(mode):
            raise _HostProblem(f"{path} is not a directory")
        if stat.S_IMODE(mode) & 0o077:
            if not dry_run:
                result = transport.run(["chmod", "700", "--", path], timeout=30)
                if result.exit_status != 0:
                    raise _HostProblem(f"chmod 700 {path} failed")
            actions.append(
                KeyAction("", "", path, "fixed", f"directory mode {stat.S_IMODE(mode):04o}")
            )


def _sync(transport: Transport, target: _Target, dry_run: bool) -> list[KeyAction]:
    base = posixpath.join(transport.rex_home(), "keys")
    keys = [
        (info, secret, relpath(info.host, info.user, info.program))
        for info, secret in target.keys.values()
    ]
    actions: list[KeyAction] = []
    dirs = dict.fromkeys(d for *_, rel in keys for d in key_dirs(base, rel))
    _check_dirs(transport, dirs, dry_run, actions)
    for info, secret, rel in keys:
        path = posixpath.join(base, rel)
        action, reason = _compare(transport, path, info)
        if action != "unchanged" and not dry_run:
            transport.put(format_key_file(info.triple, info.created, secret), path, 0o600)
        actions.append(KeyAction(info.triple, info.key_id, path, action, reason))
    return actions


def _compare(transport: Transport, path: str, info: KeyInfo) -> tuple[str, str]:
    """(``new``|``replaced``|``unchanged``, why) for the remote file at ``path``."""
    st = transport.stat(path)
    if st is None:
        return "new", ""
    mode, size = st
    if not stat.S_ISREG(mode):
        return "replaced", "not a regular file"
    if size > MAX_KEY_FILE:
        return "replaced", "not a key file"
    try:
        remote_triple, _created, remote_secret = parse_key_file(transport.get(path, MAX_KEY_FILE))
    except KeyFormatError as e:
        return "replaced", f"malformed: {e}"
    except OSError as e:
        if e.errno != errno.EFBIG:
            raise
        return "replaced", "not a key file"  # it grew past MAX_KEY_FILE since its stat
    remote_id = key_id(remote_secret)
    if remote_id != info.key_id:
        return "replaced", f"was {remote_id}"
    if remote_triple != info.triple:
        return "replaced", f"named {remote_triple}"
    if stat.S_IMODE(mode) != 0o600:
        return "replaced", f"mode {stat.S_IMODE(mode):04o}"
    return "unchanged", ""


def _remove(transport: Transport, target: _Target, dry_run: bool) -> list[KeyAction]:
    base = posixpath.join(transport.rex_home(), "keys")
    actions = []
    for host, user, program in target.triples:
        path = posixpath.join(base, relpath(host, user, program))
        text = key_triple(host, user, program)
        st = transport.stat(path)
        if st is None:
            actions.append(KeyAction(text, "", path, "absent"))
        elif stat.S_ISDIR(st[0]):
            raise _HostProblem(f"{path} is a directory, not a key file; left alone")
        else:
            removed = dry_run or transport.remove(path)
            actions.append(KeyAction(text, "", path, "removed" if removed else "absent"))
    return actions
