"""`rex_key`: create, list, distribute and revoke the keys of host.user[.program] triples."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from rexplan.cli.boundary import run_main, temp_log_dirs
from rexplan.core.model import Manifest
from rexplan.core.text import printable
from rexplan.errors import UsageError
from rexplan.trust.keys import KeyInfo, KeyStore, default_known_hosts, key_triple, parse_key_triple

if TYPE_CHECKING:
    from rexplan.trust.distribute import HostReport

PROG = "rex_key"
COMMANDS = ("create", "list", "distribute", "revoke")
#: REX spelled the subcommands as options; they are rewritten before parsing
HISTORICAL = {f"--{name}": name for name in COMMANDS}
#: options whose value must not be mistaken for a command while rewriting
_VALUED = {"--keys", "-m", "--manifest", "--program", "--limit", "--known-hosts"}

Triple = tuple[str, str, str | None]

_TRIPLE_HELP = (
    "host.user for a user key or host.user.program for a program key (read right to left: "
    "the last two parts are user and program)"
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become UsageError (exit 5) at the error boundary."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def _store_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # on subcommands the defaults are suppressed so they don't undo options given before them
    parser.add_argument(
        "--keys",
        metavar="DIR",
        default=None if top else argparse.SUPPRESS,
        help="the local key store (default: $REX_KEYS, else ./keys)",
    )
    parser.add_argument(
        "--insecure-keys",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="use key files with loose permissions or behind symlinks anyway, with a warning "
        "each time (malformed or misplaced key files are still refused)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `rex_key` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Manage the secret keys that host.user[.program] triples prove themselves "
        "with. Keys are shown by key_id, never by value.",
        epilog="REX's spellings --create, --list, --distribute and --revoke are accepted too.",
    )
    _store_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    create = sub.add_parser(
        "create",
        help="make keys (existing ones are kept unless --force)",
        description="Make a 32-byte key for each triple, mode 0600 in a 0700 tree. An existing "
        "key is kept unless --force, which rotates it.",
    )
    _store_options(create, top=False)
    create.add_argument("triples", nargs="*", metavar="TRIPLE", help=_TRIPLE_HELP)
    create.add_argument(
        "-m",
        "--manifest",
        metavar="MANIFEST",
        help="make one key per authorized host.user.program triple the manifest's steps need",
    )
    create.add_argument(
        "--program",
        action="append",
        default=[],
        metavar="P",
        help="with -m: only the steps of program P (repeatable)",
    )
    create.add_argument(
        "--run",
        action="store_true",
        help="with -m: make the host.user.run keys 'rex run' uses, for every host and user of "
        "the manifest whose .run triple it authorizes (with --program: those steps' keys too)",
    )
    create.add_argument("--force", action="store_true", help="replace existing keys (rotate)")
    create.add_argument(
        "--user-key",
        action="store_true",
        help="read each TRIPLE as host.user, for host names with dots (a.b.c is host a.b, user c)",
    )

    lst = sub.add_parser(
        "list",
        help="show the keys in the store",
        description="Show triple, key_id, creation time and path of every key in the store, "
        "with any problem (insecure, malformed, misplaced).",
    )
    _store_options(lst, top=False)
    lst.add_argument("--json", action="store_true", help="print a JSON list of objects")

    dist = sub.add_parser(
        "distribute",
        help="copy keys to the hosts that need them",
        description="Copy the key of every step of the manifest, and every other program key "
        "of the store whose triple the manifest authorizes on its hosts and users (such as the "
        "host.user.run keys of 'rex run'), to <rex home>/keys/ of the login on its host, "
        "over SFTP (never on a command line): directories 0700, "
        "files 0600, written atomically. Keys already in place are left alone, so a second "
        "run reports 0 changed. Nothing is ever removed.",
    )
    _store_options(dist, top=False)
    dist.add_argument("-m", "--manifest", metavar="MANIFEST", required=True, help="the manifest")
    dist.add_argument(
        "--dry-run",
        action="store_true",
        help="connect and compare, but change nothing on the hosts",
    )
    dist.add_argument(
        "--limit",
        metavar="PATTERN",
        help="only hosts matching PATTERN: comma-separated host globs and group:NAME terms",
    )
    _known_hosts_option(dist)

    revoke = sub.add_parser(
        "revoke",
        help="delete keys, locally and with --remote on the hosts",
        description="Delete each triple's key from the local store and, with -m MANIFEST "
        "--remote, from the triple's host (as the manifest user's login). A triple with no key "
        "is reported as absent, not an error.",
    )
    _store_options(revoke, top=False)
    revoke.add_argument("triples", nargs="+", metavar="TRIPLE", help=_TRIPLE_HELP)
    revoke.add_argument(
        "--user-key",
        action="store_true",
        help="read each TRIPLE as host.user, for host names with dots",
    )
    revoke.add_argument(
        "-m", "--manifest", metavar="MANIFEST", help="with --remote: where the hosts are"
    )
    revoke.add_argument(
        "--remote", action="store_true", help="also delete the keys on their hosts (needs -m)"
    )
    _known_hosts_option(revoke)
    return parser


def _known_hosts_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--known-hosts",
        metavar="FILE",
        help="pinned SSH host keys (default: known_hosts in the key store if present, else "
        "~/.ssh/known_hosts); unknown or changed host keys are refused",
    )


def modernize(argv: Sequence[str]) -> list[str]:
    """Rewrite REX's ``--create`` style into a subcommand, unless a subcommand is present."""
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or arg in COMMANDS:
            break
        if arg in HISTORICAL:
            return [HISTORICAL[arg], *args[:i], *args[i + 1 :]]
        i += 2 if arg in _VALUED else 1
    return args


def _parse_triples(texts: Sequence[str], *, user_key: bool) -> list[Triple]:
    return [parse_key_triple(text, user_key=user_key) for text in texts]


def manifest_triples(path: str, programs: Sequence[str]) -> list[Triple]:
    """The authorized host.user.program triples of a manifest's steps, in manifest order."""
    m = _load_manifest(path)
    names = [p.name for p in m.programs]
    unknown = [p for p in programs if p not in names]
    if unknown:
        raise UsageError(
            f"--program {unknown[0]!r} is not a program of {path}",
            hint=f"programs: {', '.join(names) or '(none)'}",
        )
    wanted: dict[Triple, None] = {}
    for prog in m.programs:
        if programs and prog.name not in programs:
            continue
        for host in prog.hosts:
            # the loader refuses unauthorized steps; this keeps keys off any that slip through
            if m.authorized(host, prog.user_on(host), prog.name):
                wanted[(host, prog.user_on(host), prog.name)] = None
    return list(wanted)


def run_triples(path: str) -> list[Triple]:
    """The host.user.run triples (``rex run``'s keys) a manifest authorizes, in manifest
    order; UsageError when it authorizes none."""
    from rexplan.engine.adhoc import PROGRAM

    m = _load_manifest(path)
    found: list[Triple] = [
        (host.name, user.name, PROGRAM)
        for host in m.hosts
        for user in m.users
        if m.authorized(host.name, user.name, PROGRAM)
    ]
    if not found:
        raise UsageError(
            f"{path} authorizes no host.user.{PROGRAM} triple",
            hint=f"add e.g. '*.USER.{PROGRAM}' to its authorize list",
        )
    return found


def _cmd_create(args: argparse.Namespace, store: KeyStore) -> int:
    if args.manifest and args.triples:
        raise UsageError("give TRIPLEs or -m MANIFEST, not both")
    if args.program and not args.manifest:
        raise UsageError("--program needs -m MANIFEST")
    if args.run and not args.manifest:
        raise UsageError("--run needs -m MANIFEST")
    if args.run:
        triples = manifest_triples(args.manifest, args.program) if args.program else []
        triples += run_triples(args.manifest)
    elif args.manifest:
        triples = manifest_triples(args.manifest, args.program)
    elif args.triples:
        triples = _parse_triples(args.triples, user_key=args.user_key)
    else:
        raise UsageError("nothing to create", hint="give TRIPLEs or -m MANIFEST")
    counts = {"created": 0, "rotated": 0, "kept": 0}
    for host, user, program in dict.fromkeys(triples):
        existed = os.path.lexists(store.path_for(host, user, program))
        info, new = store.create(host, user, program, force=args.force)
        verb = ("rotated" if existed else "created") if new else "kept"
        counts[verb] += 1
        print(f"{verb} {info.triple} {info.key_id}")
    total = sum(counts.values())
    summary = ", ".join(f"{n} {verb}" for verb, n in counts.items())
    print(f"{total} key{'s' if total != 1 else ''}: {summary}")
    return 0


def format_table(infos: Sequence[KeyInfo]) -> str:
    """Plain aligned columns: triple, key_id, created, path (and problem when any has one)."""
    header = ["TRIPLE", "KEY_ID", "CREATED", "PATH"]
    rows = [[i.triple, i.key_id or "-", i.created or "-", str(i.path)] for i in infos]
    if any(i.problem for i in infos):
        header.append("PROBLEM")
        for row, info in zip(rows, infos, strict=True):
            row.append(info.problem or "")
    table = [header, *rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def format_json(infos: Sequence[KeyInfo]) -> str:
    """A stable JSON list: one object per key, fixed keys, sorted by triple."""
    return json.dumps(
        [
            {
                "triple": i.triple,
                "host": i.host,
                "user": i.user,
                "program": i.program,
                "key_id": i.key_id or None,
                "created": i.created or None,
                "path": str(i.path),
                "problem": i.problem,
            }
            for i in infos
        ],
        indent=2,
        sort_keys=True,
    )


def _cmd_list(args: argparse.Namespace, store: KeyStore) -> int:
    infos = store.list()
    if args.json:
        print(format_json(infos))
    elif infos:
        print(format_table(infos))
    else:
        print(f"no keys in {store.root}")
    return 0


def _known_hosts(args: argparse.Namespace, store: KeyStore) -> str | None:
    return default_known_hosts(store, args.known_hosts)


_DRY_VERBS = {"new": "would put", "replaced": "would replace", "fixed": "would fix"}


def format_host_report(report: HostReport, *, dry_run: bool = False) -> str:
    """A line per host, then a line per changed key file or directory; never a secret."""
    who = f"{report.host} as {report.login}"
    if report.error is not None:
        return f"{who}: FAILED: {printable(report.error)}"
    counts = f"{report.changed} {'to change' if dry_run else 'changed'}"
    lines = [f"{who}: {counts}, {report.unchanged} unchanged"]
    for a in report.actions:
        if a.changed:
            verb = _DRY_VERBS.get(a.action, a.action) if dry_run else a.action
            what = f"{a.triple} {a.key_id} " if a.key_id else (f"{a.triple} " if a.triple else "")
            why = f" ({printable(a.reason)})" if a.reason else ""
            lines.append(f"  {verb} {what}{printable(a.path)}{why}")
    return "\n".join(lines)


def format_totals(reports: Sequence[HostReport], *, dry_run: bool = False) -> str:
    """The closing lines: counts over all hosts, then each failed host with its reason."""
    changed = sum(r.changed for r in reports)
    unchanged = sum(r.unchanged for r in reports)
    failed = [r for r in reports if r.error is not None]
    hosts = len({r.host for r in reports})
    lines = [
        f"{'dry run: ' if dry_run else ''}{hosts} host{'s' if hosts != 1 else ''}: "
        f"{changed} {'to change' if dry_run else 'changed'}, {unchanged} unchanged, "
        f"{len(failed)} failed"
    ]
    lines += [f"failed: {r.host} as {r.login}: {printable(r.error or '')}" for r in failed]
    return "\n".join(lines)


def _print_reports(reports: Iterator[HostReport], *, dry_run: bool, total: int = 0) -> int:
    from rexplan.cli import ui  # rich is only loaded by commands that show progress

    done = []
    label = "checking keys" if dry_run else "distributing keys"
    with ui.HostProgress(ui.make_console(), total, label) as progress:
        for report in reports:
            done.append(report)
            progress.host_done(format_host_report(report, dry_run=dry_run))
    print(format_totals(done, dry_run=dry_run))
    from rexplan.trust.distribute import exit_code

    return exit_code(done)


def _load_manifest(path: str) -> Manifest:
    # the manifest stack (YAML, JSON Schema) is only loaded when a command needs it
    from rexplan.core import manifest

    return manifest.load(path)


def _cmd_distribute(args: argparse.Namespace, store: KeyStore) -> int:
    m = _load_manifest(args.manifest)
    from rexplan.core import plan

    # the transports: only when connecting
    from rexplan.trust.distribute import authorized_keys, distribute

    reports = distribute(
        m, store, known_hosts=_known_hosts(args, store), dry_run=args.dry_run, limit=args.limit
    )
    targets = {(s.host, s.user) for s in plan.compile(m, limit=args.limit).steps}
    targets |= {(h, u) for h, u, _ in authorized_keys(m, store, args.limit)}
    return _print_reports(reports, dry_run=args.dry_run, total=len(targets))


def _cmd_revoke(args: argparse.Namespace, store: KeyStore) -> int:
    if args.remote and not args.manifest:
        raise UsageError("--remote needs -m MANIFEST (it says where the hosts are)")
    if args.manifest and not args.remote:
        raise UsageError("-m MANIFEST is only used with --remote")
    m = _load_manifest(args.manifest) if args.remote else None
    texts: list[tuple[str, list[Triple]]] = []
    for text in args.triples:
        first = parse_key_triple(text, user_key=args.user_key)
        candidates = [first]
        # a.b.c may also be host a.b's user-c key; the store (or manifest) knows which is meant
        if first[2] is not None and not args.user_key:
            candidates.append(parse_key_triple(text, user_key=True))
        if m is not None:
            known = [c for c in candidates if _in_manifest(m, c)]
            if not known:
                raise UsageError(
                    f"{text}: no host and user of {args.manifest} match it",
                    hint="revoke keys of other hosts without --remote",
                )
            candidates = known
        texts.append((text, candidates))
    remote: list[Triple] = []
    for text, candidates in texts:
        for candidate in candidates:
            if store.revoke(*candidate):
                print(f"revoked {key_triple(*candidate)}")
                remote.append(candidate)
                break
        else:
            print(f"absent {text}")
            remote.append(candidates[0])
    if m is None:
        return 0
    from rexplan.trust.distribute import revoke_remote

    reports = revoke_remote(m, remote, known_hosts=_known_hosts(args, store))
    return _print_reports(reports, dry_run=False)


def _in_manifest(m: Manifest, triple: Triple) -> bool:
    host, user, _program = triple
    return any(h.name == host for h in m.hosts) and any(u.name == user for u in m.users)


_HANDLERS = {
    "create": _cmd_create,
    "list": _cmd_list,
    "distribute": _cmd_distribute,
    "revoke": _cmd_revoke,
}


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {printable(message)}", file=sys.stderr)


def _run(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(modernize(argv))
    except SystemExit as e:
        # only --help gets here: usage errors raise UsageError instead of exiting
        return e.code if isinstance(e.code, int) else 0
    store = KeyStore(args.keys, insecure_ok=args.insecure_keys, warn=_warn)
    return _HANDLERS[args.command](args, store)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rex_key`: the exit code; errors pass the boundary ``rex`` has too."""
    return run_main(
        PROG,
        _run,
        sys.argv[1:] if argv is None else argv,
        log_dirs=temp_log_dirs,
        name_internal_error=False,
    )


if __name__ == "__main__":
    sys.exit(main())
