"""`rex audit`: the triples a manifest needs against the keys held locally and on its hosts."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fnmatch
import json
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from rexplan.core import plan as plans
from rexplan.core.model import Host, Manifest, Plan, Timeouts, User
from rexplan.core.text import format_columns, printable
from rexplan.errors import RexError, UsageError
from rexplan.transport.base import Transport
from rexplan.trust import union
from rexplan.trust.distribute import MAX_KEY_FILE, Connector, default_connector, key_dirs
from rexplan.trust.keys import KeyInfo, KeyStore, default_known_hosts, key_triple, relpath
from rexplan.trust.output import STDOUT, Output
from rexplan.wire.keyfile import KeyFormatError, key_id, parse_key_file

FORMAT = 1
STATES = ("OK", "MISSING", "MISMATCH", "UNAUTHORIZED", "INSECURE", "UNREACHABLE")
#: states that mean a key is where it must not be, or would fail authentication
_TRUST_STATES = ("MISMATCH", "UNAUTHORIZED", "INSECURE")

Triple = tuple[str, str, str | None]


@dataclasses.dataclass(frozen=True)
class RemoteKey:
    """A key file found on a host; ``key_id`` is None when it could not be read as a key.

    ``problem``: why its permissions are insecure; ``fault``: why it is not a usable key.
    """

    host: str
    user: str
    program: str | None
    login: str
    path: str
    key_id: str | None
    problem: str | None = None
    fault: str | None = None


@dataclasses.dataclass(frozen=True)
class Holdings:
    """The keys one host holds in one login's rex home, or why they could not be read."""

    host: str
    login: str
    keys: tuple[RemoteKey, ...] = ()
    error: str | None = None
    exit_code: int = 0


@dataclasses.dataclass(frozen=True)
class Row:
    """One triple's audit result; key ids only, never a secret."""

    triple: str
    host: str
    user: str
    program: str | None
    declared: bool
    authorized: bool
    key: str | None  # "program" | "user": which local key file serves the triple
    local_key_id: str | None
    remote_key_id: str | None
    remote_checked: bool  # the host was read as the triple's user's login (--remote)
    state: str
    detail: str
    #: the account the triple's program runs as through sudo -n (``become``); None: the login
    become: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The row of the JSON document: every field, in declaration order."""
        return dataclasses.asdict(self)


# --- pure: facts in, rows out ---------------------------------------------------------------


def _authorized(manifest: Manifest, host: str, user: str, program: str | None) -> bool:
    if program is not None:
        return manifest.authorized(host, user, program)
    # a user key serves any program of host.user, and rex only launches authorized ones
    return any(
        fnmatch.fnmatchcase(host, a.host) and fnmatch.fnmatchcase(user, a.user)
        for a in manifest.authorize
    )


def _order(t: Triple) -> tuple[str, str, str]:
    return t[0], t[1], t[2] or ""


def audited_hosts(manifest: Manifest, plan: Plan) -> set[str]:
    """The manifest's hosts, or with ``--limit`` those of the limited plan's steps."""
    if plan.limit is None:
        return {h.name for h in manifest.hosts}
    return {s.host for s in plan.steps}


def audit_rows(
    manifest: Manifest,
    plan: Plan,
    local: Mapping[Triple, KeyInfo],
    remote: Sequence[Holdings] | None,
) -> list[Row]:
    """One row per triple a step needs, the local store holds for an audited host, or a
    scanned host holds; sorted by host, user, program (user key first).

    ``local`` maps exact triples (program None: the user key) to the store's key files;
    ``remote`` is None without ``--remote``.
    """
    hosts = audited_hosts(manifest, plan)
    logins = {u.name: u.login for u in manifest.users}
    declared = {(s.host, s.user, s.program): s for s in plan.steps}
    scans = {(h.host, h.login): h for h in remote or ()}
    copies: dict[Triple, list[RemoteKey]] = {}
    for holding in remote or ():
        for k in holding.keys:
            copies.setdefault((k.host, k.user, k.program), []).append(k)
    used = {
        (h, u, None) for h, u, p in declared if (h, u, p) not in local and (h, u, None) in local
    }
    triples = {*declared, *(t for t in local if t[0] in hosts), *copies}
    rows = []
    for t in sorted(triples, key=_order):
        host, user, program = t
        login = logins.get(user)
        scan = scans.get((host, login)) if login is not None else None
        held = copies.get(t, [])
        # a step's agent loads the program key, else the user key, from its own login's home
        found = next((k for k in held if k.login == login), None)
        info = local.get(t)
        if t in declared:
            if found is None:
                found = next(
                    (k for k in copies.get((host, user, None), []) if k.login == login), None
                )
            if info is None:
                info = local.get((host, user, None))
        needed = t in declared or t in used
        authorized = _authorized(manifest, host, user, program)
        state, detail = _judge(
            declared=needed,
            authorized=authorized,
            info=info,
            scan=scan,
            found=found,
            strays=sorted({k.login for k in held if k.login != login}),
            login=login,
        )
        rows.append(
            Row(
                triple=key_triple(host, user, program),
                host=host,
                user=user,
                program=program,
                declared=needed,
                authorized=authorized,
                key=None if info is None else _kind(info.program),
                local_key_id=(info.key_id or None) if info else None,
                remote_key_id=found.key_id if found else None,
                remote_checked=scan is not None and scan.error is None,
                state=state,
                detail=detail,
                become=declared[t].become if t in declared else None,
            )
        )
    return rows


def _judge(
    *,
    declared: bool,
    authorized: bool,
    info: KeyInfo | None,
    scan: Holdings | None,
    found: RemoteKey | None,
    strays: Sequence[str],
    login: str | None,
) -> tuple[str, str]:
    """The state of one triple and why, worst first: trust, then presence, then drift.

    ``scan`` is the read of the triple's host as its user's login (None: not read).
    """
    where = [w for w, there in (("locally", info), ("on the host", found or strays)) if there]
    if not authorized and where:
        return "UNAUTHORIZED", f"a key exists {' and '.join(where)}; no authorize pattern matches"
    if strays:
        owner = f"login {login}" if login else "a manifest user's login"
        return "UNAUTHORIZED", f"held in the rex home of login {', '.join(strays)}, not {owner}"
    if declared and info is None:
        return "MISSING", "no key in the local store (rex_key create)"
    if info is not None and info.problem:
        return "INSECURE", info.problem
    if scan is not None:
        if scan.error is not None:
            return "UNREACHABLE", scan.error
        if found is not None and found.problem:
            return "INSECURE", f"on the host: {found.problem}"
        if found is None and declared:
            return (
                "MISSING",
                f"not on the host in the rex home of {scan.login} (rex_key distribute)",
            )
        if found is not None and found.fault:
            return "MISMATCH", f"on the host: {found.fault}"
        if found is not None and info is None:
            return "MISMATCH", f"{found.path} is on the host but not in the local store"
        if found is not None and info is not None and found.key_id != info.key_id:
            kinds = ""
            if (found.program is None) != (info.program is None):
                kinds = f" (the host's {_kind(found.program)} key, the store's "
                kinds += f"{_kind(info.program)} key)"
            return "MISMATCH", f"the host has {found.key_id}, the store {info.key_id}{kinds}"
    return "OK", "" if declared else "not needed by any step"


def _kind(program: str | None) -> str:
    return "user" if program is None else "program"


def counts(rows: Iterable[Row]) -> dict[str, int]:
    """Rows per state; every state present, in STATES order."""
    found = dict.fromkeys(STATES, 0)
    for row in rows:
        found[row.state] += 1
    return found


def exit_code(rows: Sequence[Row], holdings: Sequence[Holdings] = ()) -> int:
    """0 all OK; 6 trust problems (or a host-key/auth refusal); 3 only UNREACHABLE; else 2."""
    bad = {r.state for r in rows if r.state != "OK"}
    if bad & set(_TRUST_STATES) or any(h.exit_code == 6 for h in holdings):
        return 6
    if not bad:
        return 0
    return 3 if bad == {"UNREACHABLE"} else 2


def to_json(manifest: Manifest, plan: Plan, rows: Sequence[Row], *, remote: bool) -> str:
    """The stable JSON document, format 1: keys always present, rows sorted as in the table."""
    doc = {
        "format": FORMAT,
        "manifest": manifest.path,
        "limit": plan.limit,
        "remote": remote,
        "rows": [r.to_dict() for r in rows],
        "counts": counts(rows),
    }
    return json.dumps(doc, indent=2)


def format_table(rows: Sequence[Row], *, remote: bool) -> str:
    """Aligned plain columns; ``-`` for no key, ``?`` for a host key that was not checked.
    A BECOME column (the account a program runs as, ``-``: the login) when any step has one."""
    becomes = any(r.become for r in rows)
    header = ["TRIPLE", "DECLARED", "AUTHORIZED", "KEY", "LOCAL_KEY_ID"]
    if remote:
        header.append("REMOTE_KEY_ID")
    if becomes:
        header.append("BECOME")
    header += ["STATE", "DETAIL"]
    table = []
    for r in rows:
        cells = [
            r.triple,
            "yes" if r.declared else "no",
            "yes" if r.authorized else "no",
            r.key or "-",
            r.local_key_id or "-",
        ]
        if remote:
            cells.append(r.remote_key_id or ("-" if r.remote_checked else "?"))
        if becomes:
            cells.append(r.become or "-")
        cells += [r.state, printable(r.detail)]
        table.append(cells)
    return "\n".join(format_columns(header, table))


def format_summary(rows: Sequence[Row]) -> str:
    """``N triples: 3 OK, 1 MISSING`` (states that occur, in STATES order)."""
    n = len(rows)
    parts = [f"{c} {s}" for s, c in counts(rows).items() if c]
    return f"{n} triple{'s' if n != 1 else ''}: {', '.join(parts) or 'nothing to audit'}"


# --- I/O: the local store and the hosts, read only ------------------------------------------


def local_keys(store: KeyStore, manifest: Manifest, plan: Plan) -> dict[Triple, KeyInfo]:
    """Every key file of the store for an audited host, plus what each step would load.

    ``find`` also sees keys the directory walk skips (behind a symlinked directory), with the
    reason as ``problem``.
    """
    hosts = audited_hosts(manifest, plan)
    found: dict[Triple, KeyInfo] = {
        (i.host, i.user, i.program): i for i in store.list() if i.host in hosts
    }
    for s in plan.steps:
        info = store.find(s.host, s.user, s.program)
        if info is not None:
            found[(info.host, info.user, info.program)] = info
    return found


def _dir_problem(transport: Transport, path: str) -> str | None:
    st = transport.stat(path)
    if st is None:
        return None
    mode = st[0]
    if stat.S_ISLNK(mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISDIR(mode):
        return f"{path} is not a directory"
    if mode & 0o022:
        return f"{path}: directory mode {stat.S_IMODE(mode):04o} is writable by group or other"
    return None


def _remote_key(
    transport: Transport,
    base: str,
    host: str,
    user: str,
    program: str | None,
    login: str,
    dirs: dict[str, str | None],
) -> RemoteKey | None:
    rel = relpath(host, user, program)
    path = posixpath.join(base, rel)
    st = transport.stat(path)
    if st is None or stat.S_ISDIR(st[0]):
        return None
    problems = []
    for d in key_dirs(base, rel):
        if d not in dirs:
            dirs[d] = _dir_problem(transport, d)
        if dirs[d]:
            problems.append(dirs[d])
    mode, size = st
    digest: str | None = None
    fault: str | None = None
    if stat.S_ISLNK(mode):
        problems.append(f"{path} is a symbolic link")
    elif not stat.S_ISREG(mode):
        problems.append(f"{path} is not a regular file")
    else:
        # only regular files are opened: a symlink or FIFO could lead anywhere, or block
        if mode & 0o077:
            problems.append(f"{path}: mode {stat.S_IMODE(mode):04o} gives group or other access")
        if size > MAX_KEY_FILE:
            fault = f"{path} is not a key file (larger than {MAX_KEY_FILE} bytes)"
        else:
            try:
                named, _created, secret = parse_key_file(transport.get(path, MAX_KEY_FILE))
            except KeyFormatError as e:
                fault = f"{path}: malformed key file: {e}"
            except OSError as e:
                if e.errno != errno.EFBIG:
                    raise
                # it grew past MAX_KEY_FILE since its stat
                fault = f"{path} is not a key file (larger than {MAX_KEY_FILE} bytes)"
            else:
                digest = key_id(secret)
                if named != key_triple(host, user, program):
                    fault = f"{path} names triple {named!r}"
    problem = "; ".join(p for p in problems if p) or None
    return RemoteKey(host, user, program, login, path, digest, problem, fault)


def _names(transport: Transport, path: str, suffix: str | None) -> list[str]:
    """Entry names of directory ``path``, dot files skipped; [] if it is absent or a file.

    ``suffix``: only names ending in it, stripped; None: names without a dot (user dirs).
    """
    st = transport.stat(path)
    # a symlinked directory is listed (its keys are then reported INSECURE), a file is not
    if st is None or not (stat.S_ISDIR(st[0]) or stat.S_ISLNK(st[0])):
        return []
    out = []
    for entry in transport.listdir(path):
        if entry.startswith("."):
            continue  # temporaries of in-flight atomic writes
        if suffix is None:
            if "." not in entry:
                out.append(entry)
        elif entry.endswith(suffix):
            out.append(entry[: -len(suffix)])
    return out


def holdings(transport: Transport, host: str, login: str) -> Holdings:
    """The keys under ``<rex home>/keys/<host>/`` of ``login`` on ``host``; reads only."""
    base = posixpath.join(transport.rex_home(), "keys")
    top = posixpath.join(base, host)
    dirs: dict[str, str | None] = {}
    found = []
    triples: list[Triple] = [(host, u, None) for u in _names(transport, top, ".key")]
    for user in _names(transport, top, None):
        triples += [(host, user, p) for p in _names(transport, posixpath.join(top, user), ".key")]
    for h, user, program in triples:
        try:
            relpath(h, user, program)
        except UsageError:
            continue  # not a name rex could have written
        key = _remote_key(transport, base, h, user, program, login, dirs)
        if key is not None:
            found.append(key)
    return Holdings(host, login, tuple(found))


def _read_host(connector: Connector, host: Host, user: User, timeouts: Timeouts) -> Holdings:
    try:
        transport = connector(host, user, timeouts)
    except RexError as e:
        return Holdings(host.name, user.login, error=str(e), exit_code=e.exit_code)
    try:
        return holdings(transport, host.name, user.login)
    except RexError as e:
        return Holdings(host.name, user.login, error=str(e), exit_code=e.exit_code)
    except OSError as e:
        reason = f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
        return Holdings(host.name, user.login, error=f"cannot read keys: {reason}", exit_code=3)
    finally:
        transport.close()


def remote_holdings(manifest: Manifest, plan: Plan, connector: Connector) -> list[Holdings]:
    """Read every (host, login) the plan's steps use, at most ``manifest.forks`` at a time."""
    targets: dict[tuple[str, str], tuple[Host, User, Timeouts]] = {}
    for s in plan.steps:
        key = (s.host, s.login)
        if key not in targets:
            targets[key] = (manifest.host(s.host), manifest.user(s.user), s.timeouts)
        elif s.timeouts.connect < targets[key][2].connect:
            targets[key] = (*targets[key][:2], s.timeouts)
    if not targets:
        return []
    work = [targets[k] for k in sorted(targets)]
    workers = max(1, min(manifest.forks, len(work)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda t: _read_host(connector, *t), work))


def audit(
    manifest: Manifest,
    store: KeyStore,
    *,
    remote: bool,
    known_hosts: str | os.PathLike[str] | None,
    limit: str | None = None,
    connector: Connector | None = None,
    plan: Plan | None = None,
) -> tuple[Plan, list[Row], list[Holdings]]:
    """Compile (unless given the ``plan``), read the store (and with ``remote`` the hosts),
    and judge every triple."""
    if plan is None:
        plan = plans.compile(manifest, limit=limit)
    local = local_keys(store, manifest, plan)
    held = None
    if remote:
        held = remote_holdings(manifest, plan, connector or default_connector(known_hosts))
    return plan, audit_rows(manifest, plan, local, held), held or []


# --- command --------------------------------------------------------------------------------


def _known_hosts(args: argparse.Namespace, store: KeyStore) -> str | None:
    return default_known_hosts(store, args.known_hosts)


def cmd_audit(args: argparse.Namespace, out: Output = STDOUT) -> int:
    """``rex audit MANIFEST``: the table (or ``--json``) to ``out`` (default stdout); with
    several (``-m A -m B``) against their union."""
    from rexplan.core import manifest as manifests

    paths = ([args.manifest] if args.manifest else []) + list(args.manifests)
    if not paths:
        raise UsageError("no manifest to audit", hint="rex audit MANIFEST, or -m A -m B ...")
    loaded = [manifests.load(p) for p in dict.fromkeys(paths)]
    m = union.union(loaded)
    store = KeyStore(args.keys)
    plan, rows, held = audit(
        m,
        store,
        remote=args.remote,
        known_hosts=_known_hosts(args, store),
        limit=args.limit,
        plan=union.union_plan(loaded, args.limit) if len(loaded) > 1 else None,
    )
    if args.json:
        out.text(to_json(m, plan, rows, remote=args.remote))
    else:
        if rows:
            out.text(format_table(rows, remote=args.remote))
        out.text(format_summary(rows))
    return exit_code(rows, held)
