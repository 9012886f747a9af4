"""The parsers of the commands whose work lives in the engine and trust packages: ``rex run``,
``status``, ``stop``, ``audit`` and ``hostkeys`` (their help texts are the face's)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from rexplan.cli import options
from rexplan.cli.completion import SHELLS
from rexplan.core import selection
from rexplan.core.model import MAX_LOG_LINES

if TYPE_CHECKING:
    from rexplan.cli.options import Subparsers

_RUN_EPILOG = """\
exit codes:
  N    the worst exit status of the command on the hosts (a signal N: 128+N)
  2    a launch failed (or the job was lost) and no host reported a worse status
  3    a host was unreachable
  4    the manifest or the plan is invalid (e.g. host.user.run is not authorized)
  5    usage error
  6    authentication or host key failure
  130  interrupted (the jobs are killed)
"""

_AUDIT_EPILOG = """\
states (one row per triple a step needs, or a key exists for):
  OK            nothing to do
  MISSING       a step needs the key, but the local store (or, with --remote,
                the host) lacks it
  MISMATCH      the host's key differs from the local one, is malformed, or is
                not in the local store
  UNAUTHORIZED  a key exists for a triple no authorize pattern matches, or in
                the rex home of a login other than the triple user's
  INSECURE      a key file open to group/other, a group/other-writable
                directory, a symlink, or a local key file rex_key would refuse
  UNREACHABLE   --remote: the host could not be reached or its keys read

A program key (host.user.program) wins over its user key (host.user): a step
whose program key is absent uses the user key (KEY column: user). Local keys
are audited for the manifest's hosts only. --remote reads each host as each
login its steps run as, under <rex home>/keys/<host>/ only (shared homes hold
other hosts' keys too). Nothing is ever written.

exit codes:
  0  every row is OK
  2  a key is MISSING (and nothing worse)
  3  only UNREACHABLE rows are not OK
  4  the manifest is invalid
  5  usage error
  6  a MISMATCH, UNAUTHORIZED or INSECURE row, or a host refused rex's
     host key check or login
"""

_HOSTKEYS_EPILOG = """\
statuses:
  ok           the offered key is the pinned one
  new/unknown  known_hosts pins no key for the host (scan: new, verify: unknown)
  changed      known_hosts pins another key: a man-in-the-middle, or a rebuilt
               host
  local        transport: local, no SSH host key
  unreachable  no key exchange (refused, timed out, no banner)

exit codes:
  0  scan: no changed key was refused; verify: every key is pinned and matches
  3  only unreachable hosts are wrong
  5  usage error (e.g. --replace names no SSH host of the manifest)
  6  scan: a changed key was left as pinned; verify: a key is unknown or changed
"""

_STATUS_EPILOG = """\
statuses:
  running      alive (checked by pid and process start time) with the manifest's spec
               ("running (resumed at boot)": an autostart program its host's boot
               entry started again)
  drifted      alive, but started from another spec (argv, env, cwd, probe, kind,
               restart): rex apply restarts it
  restarting   its supervisor waits out a backoff before restarting it
  exited(N)    it ended by itself with exit status N (negative: killed by signal -N)
  stopped      rex stop (or SIGTERM to its supervisor) ended it
  failed       its launch was not verified, or a restart could not start it
  declined     the host refused to start it: a `when` precondition did not hold
  absent       never launched as this login on this host
  unknown      recorded as running, but neither program nor supervisor lives
  unreachable  the host could not be asked

exit codes:
  0    every step runs with the manifest's spec
  2    any other status
  4    the manifest or the plan is invalid
  5    usage error
"""

_STOP_EPILOG = """\
exit codes:
  0    every step is stopped (or had never run)
  2    a step could not be stopped
  3    a host was unreachable
  4    the manifest or the plan is invalid
  5    usage error
"""

_BLAME_EPILOG = """\
phases (from the step's state changes in the run's stored events):
  connect   connecting -> starting: SSH connection (reused per host), key
  start     starting -> awaiting-callback: agent upload and start, readiness
            probe, and the agent's callback handshake
  callback  awaiting-callback -> ready or failed: the launcher's verdict
  run       running -> ready or failed: a job's run after its callback

The critical chain lists, for each wave, the step that finished last: the
step the next wave waited for. Runs are stored by 'rex apply' in .rex/runs
under the directory it ran in ($REX_STATE_DIR/runs when set); the last 20
are kept.

exit codes:
  0  the report was printed
  5  usage error: no stored run, or RUN is unknown or an ambiguous prefix
"""

_LOGS_EPILOG = """\
Each line is printed as 'STEP | text' (the step's prefix coloured on a terminal).
A program's output is kept on its host in logs/HOST.USER.PROGRAM.log of the
login's rex home (~/.rex, or $REX_HOME); when that file holds fewer than N lines
the newest rotated file, HOST.USER.PROGRAM.log.1, is read too. Host text is
shown with control characters escaped, at most 4096 characters a line.

--since WHEN: WHEN is a duration back from now (90, 30s, 10m, 2h, 1d) or a local
time (2026-12-06T14:30, 2026-12-06 14:30:00, 2026-12-06). Log lines carry no
time stamps; rex knows a line's time only from the marker the agent writes
before each start and restart ('--- rex: run RUN step STEP starting'), whose run
id begins with the launcher's local time of that apply. A line is shown when the
last marker before it names a run begun at or after WHEN: the output of the
applies since WHEN, restarts included.

exit codes:
  0    the logs were printed
  3    a host was unreachable, or its agent gave no logs (the others are printed)
  4    the manifest or the plan is invalid
  5    usage error: a pattern that matches no step, a bad -n or --since
  6    authentication or host key failure
  130  interrupted (the normal end of -f)
  141  the output pipe was closed early (rex logs -f ... | head)
"""


LINES = options.number(
    int, "a whole number", 0, MAX_LOG_LINES, f"must be from 0 to {MAX_LOG_LINES}"
)


class _Intermixed(argparse.ArgumentParser):
    """Options may come after PATTERN and before ``-- CMD``: plain argparse would bind the
    empty CMD list as soon as it met PATTERN (intermixed parsing sees every option first)."""

    _inside = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._inside:  # parse_known_intermixed_args calls back here, twice
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_run(sub: Subparsers) -> None:
    """``rex run PATTERN -m MANIFEST -- CMD``."""
    parser = options.command(
        sub,
        "run",
        "run a command once on the hosts a pattern matches, verified like any launch",
        "Run CMD as a job (the program 'run', as --user) on every host of the "
        "manifest that PATTERN matches, with the same keys, authorization (host.user.run) "
        "and callback proof as rex apply. Each host's exit status and the tail of its "
        "output come back over the verified connection; hosts with identical output are "
        "shown once (dshbak -c). If rex is interrupted or killed, the jobs are killed.",
        _RUN_EPILOG,
        options.Lazy("rexplan.engine.adhoc", "cmd_run"),
    )
    parser.add_argument(
        "pattern",
        metavar="PATTERN",
        help="hosts to run on: comma-separated host globs and group:NAME ('*' for all)",
    )
    options.manifest_flag(parser)
    parser.add_argument(
        "--user",
        metavar="USER",
        help="the manifest user to run as on every host (default: each host's hosts.*.user, "
        "else defaults.user)",
    )
    options.forks(parser, "hosts at once (default: defaults.forks, 64)")
    parser.add_argument(
        "--events", metavar="FILE", help="write every event as one JSON object per line"
    )
    options.flag(
        parser,
        "--json",
        "print each host's status and output, and the folded groups, as JSON (format 1)",
    )
    options.keys(parser, insecure="load keys with loose permissions anyway")
    options.persist(parser)
    parser.add_argument(
        "command",
        nargs="*",
        metavar="CMD",
        help="the command and its arguments; put -- before them",
    )
    # the subcommand parser keeps its class (the error boundary's); only its parsing changes
    parser.__class__ = type("RunParser", (_Intermixed, type(parser)), {})


def add_audit(sub: Subparsers) -> None:
    """``rex audit MANIFEST``."""
    parser = options.command(
        sub,
        "audit",
        "compare the triples a manifest needs with the keys held locally and on hosts",
        "One row per host.user.program triple a step of MANIFEST needs, or a key "
        "exists for: is it declared, authorized, is there a local key (key_id) and, with "
        "--remote, a key on the host; and its state. Read-only, sorted, secrets never shown.",
        _AUDIT_EPILOG,
        options.Lazy("rexplan.trust.audit", "cmd_audit"),
    )
    parser.add_argument("manifest", metavar="MANIFEST", nargs="?", help="the manifest to audit")
    parser.add_argument(
        "-m",
        "--manifest",
        dest="manifests",
        action="append",
        default=[],
        metavar="MANIFEST",
        help="a manifest to audit (repeatable): several are audited against their union "
        "(hosts, users, steps and authorize patterns), for a key store they share",
    )
    options.flag(
        parser,
        "--remote",
        "also read the keys on each host, as each login its steps run as (in parallel, "
        "at most 'forks' hosts at a time)",
    )
    options.flag(parser, "--json", options.JSON_DOC)
    options.keys(
        parser,
        "the local key store (default: $REX_KEYS, else ./keys)",
        "with --remote: " + options.KNOWN_HOSTS,
    )
    options.limit(parser, options.LIMIT_HOSTS)


def _pins(parser: argparse.ArgumentParser) -> None:
    options.manifest_flag(
        parser, "the manifest whose hosts to contact (transport: local hosts are skipped)"
    )
    options.keys(
        parser,
        "the key store whose known_hosts is the default (default: $REX_KEYS, else ./keys)",
        "the known_hosts file holding the pins (default: known_hosts in the key store)",
    )


def add_hostkeys(sub: Subparsers) -> None:
    """``rex hostkeys scan`` and ``rex hostkeys verify``."""
    parser = options.command(
        sub,
        "hostkeys",
        "fetch, pin and verify the SSH host keys of a manifest's hosts",
        "Fetch the SSH host key of each host of a manifest (key exchange only: no "
        "login, nothing run), pin it in a known_hosts file, or verify the pins. rex never adds "
        "a host key on its own when it connects.",
        _HOSTKEYS_EPILOG,
        options.Lazy("rexplan.trust.hostkeys", "cmd_hostkeys"),
    )
    actions = parser.add_subparsers(dest="hostkeys_command", metavar="ACTION", required=True)
    scan = options.command(
        actions,
        "scan",
        "show each host's key fingerprint; pin new keys with --accept",
        "Fetch each SSH host's key once, one host after the other, and show its "
        "type, SHA256 fingerprint and status (new, ok, changed). known_hosts is only written "
        "with --accept (new keys) or --replace HOST (that host's changed key), atomically and "
        "with mode 0600. A changed key is never overwritten otherwise.",
        _HOSTKEYS_EPILOG,
    )
    _pins(scan)
    options.flag(
        scan, "--accept", "record the new keys in known_hosts (compare their fingerprints first)"
    )
    scan.add_argument(
        "--replace",
        action="append",
        default=[],
        metavar="HOST",
        help="pin the key manifest host HOST offers now, replacing the key pinned for it (for "
        "a rebuilt host; repeatable)",
    )
    verify = options.command(
        actions,
        "verify",
        "check that every host's key is pinned and unchanged",
        "Fetch each SSH host's key and report keys known_hosts does not pin "
        "(unknown) or pins differently (changed). Nothing is written.",
        _HOSTKEYS_EPILOG,
    )
    _pins(verify)
    options.flag(verify, "--json", options.JSON_DOC)


def _on_hosts(
    parser: argparse.ArgumentParser,
    manifest: bool = True,
    forks_type: Callable[[str], int] = int,
) -> None:
    if manifest:
        parser.add_argument("manifest", metavar="MANIFEST")
    options.limit(parser)
    options.forks(
        parser, "hosts asked at once (default: the manifest's defaults.forks, 64)", forks_type
    )
    options.keys(parser, "the key store, for its known_hosts (default: $REX_KEYS, else ./keys)")
    selection.add_options(parser)
    options.persist(parser)


def add_lifecycle(sub: Subparsers) -> None:
    """``rex status`` and ``rex stop``."""
    status = options.command(
        sub,
        "status",
        "show whether each step of a manifest runs, and with which spec",
        "Ask every host (one SSH exec per host and login, in parallel) for the "
        "records its rex agents keep, and show per step: status, pid, uptime and restarts. "
        "A program counts as running only if its pid still belongs to the process that "
        "started then (pid + start time). Nothing on the hosts is changed.",
        _STATUS_EPILOG,
        options.Lazy("rexplan.engine.lifecycle", "cmd_status"),
    )
    _on_hosts(status)
    options.flag(status, "--json", "print the statuses as JSON (format 1, stable)")
    halt = options.command(
        sub,
        "stop",
        "stop the programs of a manifest, dependents first",
        "Stop each step's program on its host: the last wave first, each wave in "
        "parallel. The program's supervisor is told to stop it (TERM to its process group, "
        "the program's stop_timeout, then KILL), so it is not restarted; afterwards no "
        "process carrying the program's rex tag remains, also none that left its group. "
        "A login left without autostart programs loses its boot entry.",
        _STOP_EPILOG,
        options.Lazy("rexplan.engine.lifecycle", "cmd_stop"),
    )
    _on_hosts(halt)
    options.flag(
        halt,
        "--force",
        "no grace: SIGKILL the supervisor, the process group and every process tagged "
        "with the program's triple at once",
    )


def add_blame(sub: Subparsers) -> None:
    """``rex blame [RUN]``."""
    parser = options.command(
        sub,
        "blame",
        "show where a stored run spent its time: slowest steps, hosts, critical chain",
        "Read the stored events of a run (the newest by default) and list the "
        "slowest steps with their phases, the slowest hosts, and the critical chain through "
        "the waves. No host is contacted.",
        _BLAME_EPILOG,
        options.Lazy("rexplan.cli.blame", "cmd_blame"),
    )
    parser.add_argument(
        "run", nargs="?", metavar="RUN", help="a run id or a unique prefix (default: the newest)"
    )
    options.flag(parser, "--json", "print the report as JSON (format 1, stable keys)")
    parser.add_argument(
        "--top",
        type=int,
        default=10,
        metavar="N",
        help="rows per list (default 10; 0: all); the critical chain is always whole",
    )
    options.flag(parser, "--list", "list the stored runs instead, oldest first")
    parser.add_argument(
        "--svg",
        metavar="FILE",
        help="draw the run as an SVG time line in FILE ('-': stdout): a row per step grouped "
        "by wave, a bar per phase, failures crossed, the critical chain outlined",
    )


def add_import(sub: Subparsers) -> None:
    """``rex import ansible INVENTORY``."""
    parser = sub.add_parser(
        "import",
        help="convert another tool's host list into a rex hosts: section",
        description="Convert another tool's host list into a rex hosts: section.",
    )
    kinds = parser.add_subparsers(dest="import_kind", metavar="FORMAT", required=True)
    ansible = options.command(
        kinds,
        "ansible",
        "an Ansible inventory, INI or YAML",
        "Read an Ansible inventory (INI or YAML) and print a rex hosts: section: ranges "
        "expanded, groups and their parents as groups:, ansible_host, ansible_port, "
        "ansible_user and ansible_connection=local converted, everything else named in "
        "comments. No host is contacted.",
    )
    ansible.add_argument("inventory", metavar="INVENTORY", help="the inventory file")
    ansible.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE atomically instead of stdout ('-': stdout)",
    )
    options.flag(ansible, "--force", "replace FILE if it exists (default: refuse)")
    parser.set_defaults(func=options.Lazy("rexplan.cli.importer", "cmd_import"))


def add_completion(
    sub: Subparsers, parsers: Callable[[], Sequence[tuple[str, argparse.ArgumentParser]]]
) -> None:
    """``rex completion SHELL``; ``parsers`` gives the parsers the scripts complete."""
    parser = sub.add_parser(
        "completion",
        help="print a bash or zsh completion script",
        description="Print a completion script for bash or zsh: subcommands, options, "
        "manifest files, and host, group and program names from the manifest on the command "
        'line. bash: eval "$(rex completion bash)" in ~/.bashrc. zsh: rex completion zsh > '
        "~/.zfunc/_rex, with ~/.zfunc in fpath before compinit.",
    )
    parser.add_argument("shell", nargs="?", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    parser.add_argument(
        "--names",
        nargs=2,
        metavar=("KIND", "MANIFEST"),
        help="print the hosts, groups, programs, tags or limit terms (hosts and group:NAME) of "
        "MANIFEST, one a line (what the scripts call; prints nothing if the manifest is "
        "invalid)",
    )
    parser.set_defaults(
        func=options.Lazy("rexplan.cli.completion", "cmd_completion"), completion_parsers=parsers
    )


def add_logs(sub: Subparsers) -> None:
    """``rex logs MANIFEST [STEP_OR_PATTERN...]``."""
    parser = options.command(
        sub,
        "logs",
        "show the programs' output from their hosts, -f to follow it",
        "Print the last lines of what each step's program wrote (stdout and stderr), "
        "read from its host by the rex agent: one SSH exec per host and login, in "
        "parallel (through the persistence daemon when it runs). With -f, follow every "
        "host at once, one SSH channel per host and login (on the daemon's kept "
        "connection with persist), until Ctrl-C; closing the channel ends the follower "
        "on the host. Jobs, services and transport: local programs alike.",
        _LOGS_EPILOG,
        options.Lazy("rexplan.cli.logs", "cmd_logs"),
    )
    parser.add_argument("manifest", metavar="MANIFEST")
    parser.add_argument(
        "steps",
        nargs="*",
        metavar="STEP_OR_PATTERN",
        help="only these steps: a program name or a glob on PROGRAM@HOST (default: all)",
    )
    parser.add_argument(
        "-n",
        "--lines",
        type=LINES,
        default=10,
        metavar="N",
        help="the last N lines of each step (default 10; 0: none, e.g. with -f)",
    )
    parser.add_argument(
        "-f", "--follow", action="store_true", help="then print new lines as they come"
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only the output of the runs begun since WHEN (a duration back from now: 10m, "
        "2h, 1d; or a local time: 2026-12-06T14:30); see below",
    )
    _on_hosts(parser, manifest=False, forks_type=LINES)
    parser.set_defaults(collect="steps")
