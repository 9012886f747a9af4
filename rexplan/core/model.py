"""Frozen records of a validated manifest and its plan; pure, compared by value."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from rexplan.wire.jobs import LOG_KEEP, LOG_MAX_SIZE

#: the longest ``persist`` (seconds): a day
MAX_PERSIST = 86400.0
#: the most lines ``rex logs -n`` asks each step for
MAX_LOG_LINES = 100_000

#: users and programs; no dots, so a triple string parses right to left
NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
#: hostname-like: labels of letters, digits, '-' and '_', joined by dots, no leading '-'
HOST_RE = re.compile(
    r"^(?!-)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*$"
)

Pairs = tuple[tuple[str, str], ...]

#: most steps (programs x their hosts) a manifest may make: a 10 kB manifest of 200 programs
#: on 100,000 hosts would be 20 million steps, gigabytes before the first is launched
MAX_STEPS = 1_000_000


@dataclass(frozen=True)
class Timeouts:
    """Per-phase deadlines in seconds."""

    connect: float = 10.0
    start: float = 20.0
    callback: float = 30.0
    ready: float = 30.0


@dataclass(frozen=True)
class Host:
    """A machine rex can reach, by SSH or (``transport='local'``) on this machine."""

    name: str
    address: str
    port: int = 22
    #: the manifest user of the steps on this host of programs that name no user
    user: str | None = None
    transport: str = "ssh"  # "ssh" | "local"
    python: str = "python3"
    groups: tuple[str, ...] = ()
    #: the host's ``vars`` (frozen: lists are tuples, mappings FrozenDict), for templates
    vars: tuple[tuple[str, object], ...] = ()
    #: unauthenticated SSH connections rex opens at once to this address and port: the start
    #: value of its sshd's MaxStartups (OpenSSH 10:30:100), past which sshd drops connections
    max_startups: int = 10
    #: how least-loaded placement measures this host: "loadavg" (the kernel's load average)
    #: or "cgroup" (a container sharing its kernel: the CPU time of its own cgroup v2)
    load: str = "loadavg"
    #: how the agent calls back: "direct" (it dials the launcher's listener) or "ssh" (it
    #: dials a port the launcher forwards to its listener over this host's SSH connection)
    callback: str = "direct"
    #: whether the manifest set ``address`` / ``port``: where it did not, ssh_config's
    #: HostName / Port apply (rexplan.transport.route); a Host built in code means what it says
    address_set: bool = True
    port_set: bool = True
    #: bastions, OpenSSH's ProxyJump syntax: ``[user@]host[:port]``, a comma list in order
    jump: str | None = None
    #: the ssh_config file (defaults.ssh_config, absolute); None: $REX_SSH_CONFIG, else
    #: ~/.ssh/config and /etc/ssh/ssh_config as OpenSSH reads them
    ssh_config: str | None = None


@dataclass(frozen=True)
class User:
    """A manifest user: the Unix account a program runs as and how rex logs in as it."""

    name: str
    login: str  # Unix account name on the hosts (defaults to name)
    identity: str | None = None  # private key file for SSH
    #: ssh_config options for this user's connections (rexplan.transport.route.OPTIONS)
    ssh_options: Pairs = ()
    #: whether the manifest set ``login``: where it did not, ssh_options/ssh_config User apply
    login_set: bool = True


@dataclass(frozen=True)
class Ready:
    """A readiness probe run on the host before the callback.

    kind: ``alive`` (still running after ``settle`` seconds), ``tcp`` (``port`` on ``host``
    accepts), ``http`` (``url`` answers 2xx/3xx), ``command`` (``argv`` exits 0), ``file``
    (``path`` exists), ``notify`` (the program writes READY=1 to $NOTIFY_SOCKET).
    """

    kind: str = "alive"
    timeout: float = 30.0
    interval: float = 0.2
    settle: float = 0.5
    port: int | None = None
    host: str = "127.0.0.1"
    url: str | None = None
    argv: tuple[str, ...] = ()
    path: str | None = None


@dataclass(frozen=True)
class FileSpec:
    """A file transferred to the host before its program starts; a ``template`` file's
    ``content`` is its text rendered for one step (None: the launcher reads ``src``)."""

    src: str
    dest: str
    mode: int = 0o644
    template: bool = False
    content: bytes | None = field(default=None, repr=False)


class FrozenDict(dict[str, object]):
    """A mapping of ``vars`` that hashes like the frozen record holding it; never mutated."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


@dataclass(frozen=True)
class Rendered:
    """A program's templated fields rendered for one of its hosts (``Program.rendered``)."""

    argv: tuple[str, ...]
    shell: str | None
    env: Pairs
    cwd: str | None
    ready: Ready
    files: tuple[FileSpec, ...]


@dataclass(frozen=True)
class When:
    """Preconditions the agent checks on the host before starting anything. A host that
    does not meet them declines the step, which is not a failure unless ``required``."""

    max_load: float | None = None
    min_free_mb: int | None = None
    required: bool = False


@dataclass(frozen=True)
class Placement:
    """``all`` hosts of ``on``, or the ``count`` least-loaded of them."""

    strategy: str = "all"  # "all" | "least-loaded"
    count: int | None = None


@dataclass(frozen=True)
class FailurePolicy:
    """What failures of a program's steps do to the run (Ansible's play keywords).

    ``max_fail`` / ``max_fail_percent``: abort the run when MORE than this many (or this
    percentage) of the program's steps failed; ``any_errors_fatal``: abort at the first one.
    Aborting lets steps already in flight finish and skips every step not yet started.
    ``serial`` / ``serial_percent``: launch the program's steps in batches of this many (or
    this percentage of its hosts), checking the policy between batches. Unreachable hosts count
    as failures unless ``ignore_unreachable``, which also lets dependents go on without them.
    """

    max_fail: int | None = None
    max_fail_percent: float | None = None
    any_errors_fatal: bool = False
    serial: int | None = None
    serial_percent: float | None = None
    ignore_unreachable: bool = False


@dataclass(frozen=True)
class Program:
    """A program to launch; ``hosts`` is ``on`` resolved to host names, in manifest order."""

    name: str
    hosts: tuple[str, ...]
    user: str
    run: tuple[str, ...] | None = None
    shell: str | None = None
    on: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    ready: Ready = field(default_factory=Ready)
    env: Pairs = ()
    cwd: str | None = None
    kind: str = "service"  # "service" | "job"
    restart: str = "no"  # "no" | "on-failure" | "always"
    placement: Placement = field(default_factory=Placement)
    when: When = field(default_factory=When)
    files: tuple[FileSpec, ...] = ()
    stop_timeout: float = 10.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    policy: FailurePolicy = field(default_factory=FailurePolicy)
    become: str | None = None  # the account it runs as through sudo -n; None: the login
    #: the agent rotates the program's log at max_size bytes, keeping ``keep`` old files
    logs: tuple[int, int] = (LOG_MAX_SIZE, LOG_KEEP)
    env_clear: bool = False  # the program's environment is only env, PATH and REX_*
    #: per host (in ``hosts`` order) when a field is a template; empty: every step is the same
    rendered: tuple[Rendered, ...] = ()
    tags: tuple[str, ...] = ()  # what --tags selects it by
    restart_with: tuple[str, ...] = ()  # programs whose restart restarts it after them
    autostart: bool = False  # its host starts it again at boot (agent --boot)
    #: (host, user) where the step on that host runs as another user than ``user``: a
    #: program naming no user runs on a host as its ``hosts.*.user`` (Ansible's ansible_user)
    host_users: Pairs = ()

    def user_on(self, host: str) -> str:
        """The manifest user of this program's step on ``host``."""
        for name, user in self.host_users:
            if name == host:
                return user
        return self.user

    @property
    def argv(self) -> tuple[str, ...]:
        """The argv the agent executes: ``run`` as given, ``shell`` via /bin/sh -c."""
        if self.run is not None:
            return self.run
        return ("/bin/sh", "-c", self.shell or "")


@dataclass(frozen=True)
class Authorization:
    """An ``authorize`` pattern: shell globs per component of host.user.program."""

    pattern: str
    host: str
    user: str
    program: str

    def matches(self, host: str, user: str, program: str) -> bool:
        return (
            fnmatch.fnmatchcase(host, self.host)
            and fnmatch.fnmatchcase(user, self.user)
            and fnmatch.fnmatchcase(program, self.program)
        )


@dataclass(frozen=True)
class Callback:
    """Where the launcher listens for callbacks and which address hosts dial."""

    bind: str | None = None  # None: chosen per run so hosts can reach it
    port: int = 0  # 0: any free port
    advertise: str | None = None
    #: the hosts' default ``callback.via``: "direct" or "ssh" (a remote port forward)
    via: str = "direct"


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Nothing after manifest.py sees a raw dict."""

    path: str
    digest: str  # sha256 hex of the manifest bytes
    hosts: tuple[Host, ...]
    users: tuple[User, ...]
    programs: tuple[Program, ...]
    authorize: tuple[Authorization, ...]
    callback: Callback = field(default_factory=Callback)
    forks: int = 64
    default_user: str | None = None  # defaults.user: who ``rex run`` runs as unless told
    #: ``rex apply`` fan-out: "flat" (the launcher connects to every host) or "tree" (it
    #: connects to ``fanout`` relays, which launch the rest over OpenSSH with the private key
    #: at ``relay_identity``, a path on the relay hosts)
    strategy: str = "flat"
    fanout: int = 4
    relay_identity: str | None = None
    #: seconds a daemon keeps rex's SSH connections open after their last use (0: none are
    #: kept; rexplan.transport.persist), as OpenSSH's ControlPersist
    persist: float = 0.0
    #: the manifest's ``name:``, else its file's stem made safe (manifest_name): the owner
    #: each host record of its steps names, with ``path``
    name: str = ""

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def user(self, name: str) -> User:
        for u in self.users:
            if u.name == name:
                return u
        raise KeyError(name)

    def program(self, name: str) -> Program:
        for p in self.programs:
            if p.name == name:
                return p
        raise KeyError(name)

    def authorized(self, host: str, user: str, program: str) -> bool:
        return any(a.matches(host, user, program) for a in self.authorize)


def triple(host: str, user: str, program: str) -> str:
    """The ``host.user.program`` string; host names may contain dots, the others may not."""
    return f"{host}.{user}.{program}"


def parse_triple(text: str) -> tuple[str, str, str | None]:
    """Split ``host.user[.program]`` right to left; raises ValueError on a malformed triple.

    With three or more dot-separated parts the last two are user and program; a two-part string
    is ``host.user``. Ambiguity (a host whose last label is a valid user name) is resolved by
    the caller, which knows the manifest's users.
    """
    parts = text.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{text!r} is not host.user[.program]")
    if len(parts) == 2:
        host, user, program = parts[0], parts[1], None
    else:
        host, user, program = ".".join(parts[:-2]), parts[-2], parts[-1]
    if not HOST_RE.match(host) or not NAME_RE.match(user):
        raise ValueError(f"{text!r} is not host.user[.program]")
    if program is not None and not NAME_RE.match(program):
        raise ValueError(f"{text!r} is not host.user[.program]")
    return host, user, program


@dataclass(frozen=True)
class Step:
    """One program on one host as one user: the unit rex launches and verifies."""

    id: str  # "<program>@<host>", unique in a plan
    wave: int
    host: str
    address: str
    port: int
    transport: str
    login: str  # Unix account the step runs as
    user: str  # manifest user name (part of the triple)
    program: str
    triple: str
    argv: tuple[str, ...]
    shell: str | None
    ready: Ready
    kind: str
    env: Pairs = ()
    cwd: str | None = None
    python: str = "python3"
    timeouts: Timeouts = field(default_factory=Timeouts)
    restart: str = "no"
    stop_timeout: float = 10.0
    requires: tuple[str, ...] = ()  # program names this step waits for
    become: str | None = None  # the account the program runs as (sudo -n); None: ``login``
    files: tuple[FileSpec, ...] = ()
    index: int = 0  # position among its program's steps, in plan order (REX_INDEX)
    count: int = 1  # its program's step count (REX_COUNT)
    env_clear: bool = False
    tags: tuple[str, ...] = ()  # its program's tags
    restart_with: tuple[str, ...] = ()  # programs whose restart restarts this step after them
    autostart: bool = False  # its host starts it again at boot


@dataclass(frozen=True)
class Plan:
    """Launch waves: every step of wave N is ready before any step of wave N+1 starts."""

    manifest_digest: str
    waves: tuple[tuple[Step, ...], ...]
    limit: str | None = None  # the --limit pattern the plan was narrowed by, if any

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(s for wave in self.waves for s in wave)
