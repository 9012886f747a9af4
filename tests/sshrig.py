"""The real-sshd test rig: throwaway accounts, pinned host keys, sshd processes on 127.0.0.x."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sudorig import remove_rules, remove_stale, write_rules

from rexplan.core.model import Host, User

TYPE_CHECKING = False
if TYPE_CHECKING:
    from netrig import NetNs

SSHD = "/usr/sbin/sshd"
#: primary account plus this many extra ones; the names are fixed up front because every sshd's
#: AllowUsers and per-user SetEnv blocks are written when it starts (sshd reads config only then)
MAX_ACCOUNTS = 4
FIRST_OCTET = 10
ADDRESSES = 255 - FIRST_OCTET  # 127.0.0.10 to 127.0.0.254
MAX_LAPS = 4  # past 245 hosts, a second sshd per address (its own free port), and so on


def host_slot(index: int) -> tuple[str, str]:
    """(name, address) of rig host ``index``: h10 on 127.0.0.10 ... h254 on 127.0.0.254, then
    h10b on 127.0.0.10 again (another port), h11b ... so a 256-host run stays on 127.0.0.x."""
    lap, offset = divmod(index, ADDRESSES)
    octet = FIRST_OCTET + offset
    return f"h{octet}{'abcd'[lap] if lap else ''}", f"127.0.0.{octet}"


START_DEADLINE = 5.0
_GECOS = re.compile(r"^rex test rig pid (\d+)$")


def unavailable_reason() -> str | None:
    """Why sshd tests cannot run here, or None when they can."""
    if os.name != "posix" or not Path("/proc/self/stat").exists():
        return "the sshd rig needs Linux (/proc)"
    if os.geteuid() != 0:
        return "the sshd rig needs root (it creates a test account and runs sshd as root)"
    for tool in (SSHD, shutil.which("ssh-keygen"), shutil.which("useradd")):
        if not tool or not os.access(tool, os.X_OK):
            return f"the sshd rig needs {tool or 'ssh-keygen/useradd'} (tests/run installs it)"
    return None


#: the files of a cgroup v2 that its delegatee must own (the kernel's cgroup-v2.rst)
_DELEGATED = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on
    a hybrid host; None without one."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return left.split()[4].replace("\\040", " ")
    return None


def cgroup_unavailable_reason() -> str | None:
    """Why ``spawn(cgroup=True)`` cannot delegate a cgroup here, or None when it can."""
    if os.geteuid() != 0:
        return "delegating a cgroup needs root"
    mount = cgroup2_mount()
    if mount is None:
        return "no cgroup v2 hierarchy is mounted"
    if not os.access(mount, os.W_OK) or os.statvfs(mount).f_flag & os.ST_RDONLY:
        return f"the cgroup v2 hierarchy at {mount} is not writable"
    return None


def _cgroup_pids(path: str) -> list[int]:
    found: list[int] = []
    for directory, _dirs, _files in os.walk(path):
        try:
            found += [int(w) for w in Path(directory, "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def _kill_cgroup(path: str) -> None:
    """SIGKILL whatever still runs in the rig's cgroup ``path``, and wait until it is empty."""
    if not _cgroup_pids(path):
        return
    try:
        Path(path, "cgroup.kill").write_text("1")
    except OSError:
        _kill_all(_cgroup_pids(path), deadline=0.0)
    end = time.monotonic() + 5.0
    while _cgroup_pids(path) and time.monotonic() < end:
        time.sleep(0.01)


def _remove_tree(path: str) -> bool:
    """rmdir cgroup ``path`` and the cgroups below it; whether it is gone (a cgroup that holds
    a process stays)."""
    for directory, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return not os.path.isdir(path)


@dataclass(frozen=True)
class Account:
    """A throwaway Unix account the rig created; it logs in with the rig key."""

    login: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class RigHost:
    """One running sshd: its address, port, pinned key, and the rig's login for it."""

    name: str  # "h10" for 127.0.0.10
    address: str
    port: int
    login: str  # primary rig account
    identity: str  # client private key accepted for every rig account
    state_dir: str  # REX_HOME the sshd sets for ``login``
    pid: int
    known_hosts: str  # the rig's known_hosts, pinning every running rig host
    host_key: str  # "ssh-ed25519 AAAA..." as pinned
    state_root: str  # state_dir's parent: one REX_HOME per account under it
    #: the cgroup v2 directory the sshd runs in, delegated to ``login`` (``spawn(cgroup=True)``)
    cgroup: str | None = None

    def state_dir_for(self, login: str) -> str:
        """The REX_HOME this sshd sets for ``login``."""
        return os.path.join(self.state_root, login)

    def model_host(self, name: str | None = None, user: str | None = None) -> Host:
        """A model.Host for this sshd (name defaults to ``h10`` style)."""
        return Host(name=name or self.name, address=self.address, port=self.port, user=user)

    def model_user(self, name: str | None = None, login: str | None = None) -> User:
        """A model.User logging in as ``login`` (default the primary account) with the rig key."""
        login = login or self.login
        return User(name=name or login, login=login, identity=self.identity)

    def ssh_argv(self, argv: Sequence[str], *, login: str | None = None) -> list[str]:
        """Plain OpenSSH ``ssh`` argv running ``argv`` (shlex-joined) on this host."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=5",
            "-i",
            self.identity,
            "-p",
            str(self.port),
            "-l",
            login or self.login,
            self.address,
            "--",
            shlex.join(argv),
        ]

    def ssh(
        self,
        argv: Sequence[str],
        *,
        login: str | None = None,
        input: bytes | None = None,
        timeout: float = 10.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` on this host with plain ``ssh``; output captured, status not checked."""
        return subprocess.run(
            self.ssh_argv(argv, login=login),
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )


@dataclass
class _Sshd:
    host: RigHost
    proc: subprocess.Popen[bytes]
    index: int
    shared: bool
    log: Path
    max_startups: str | None = None
    cgroup: str | None = None
    netns: NetNs | None = None
    options: tuple[str, ...] = ()


def _run(argv: Sequence[str]) -> None:
    out = subprocess.run(argv, capture_output=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {out.stderr.decode(errors='replace')}")


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (PID 1 here may not reap orphans promptly)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, uid) for every process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), uid)
    return table


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (sshd's per-connection and session processes)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _uid) in _process_table().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _kill_all(pids: Sequence[int], deadline: float = 2.0) -> None:
    """SIGTERM ``pids``, then SIGKILL whatever is still alive after ``deadline`` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + deadline
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.01)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


class SshdRig:
    """Accounts, a client key, a known_hosts file and the sshd processes of one test session.

    Shared hosts (``hosts(n)``) are reused by every test and must not be faulted; ``spawn()``
    gives a dedicated host for stop/pause tests. ``close()`` stops everything by pid.
    """

    _instances = 0

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.base = Path(tempfile.mkdtemp(prefix="rexrig-"))
        # accounts must traverse the base to reach their homes and state dirs, not list it
        os.chmod(self.base, 0o711)
        SshdRig._instances += 1
        # unique per process and rig, so parallel test sessions never share an account
        suffix = "" if SshdRig._instances == 1 else f"x{SshdRig._instances}"
        self._tag = f"rextest{os.getpid()}{suffix}"
        self.planned_logins = [self._tag] + [
            f"{self._tag}{chr(ord('a') + i)}" for i in range(1, MAX_ACCOUNTS)
        ]
        self.accounts: list[Account] = []
        self._sshds: list[_Sshd] = []
        self._dead: list[int] = []
        self._free_indexes: list[int] = []
        self._next_index = 0
        self._netns_hosts = 0  # sshds started in network namespaces (n10, n11, ...)
        self._penalties: bool | None = None
        self._cgroup_parent: Path | None = None  # created on the first spawn(cgroup=True)
        self._cgroups: list[str] = []  # delegated cgroups still to remove, deepest last
        self._sudo_rules: list[tuple[str, str]] = []  # (login, target) in the drop-in
        self.known_hosts = str(self.base / "known_hosts")
        Path(self.known_hosts).write_text("")
        client = self.base / "client"
        client.mkdir(mode=0o700)
        self.identity = str(client / "id_ed25519")
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rex-rig", "-f", self.identity])
        self.public_key = Path(self.identity + ".pub").read_text()
        for sub in ("home", "state", "hosts"):
            (self.base / sub).mkdir(mode=0o711)
            os.chmod(self.base / sub, 0o711)
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        _remove_stale_accounts()
        try:
            self.account(0)
        except BaseException:
            self.close()
            raise

    @property
    def login(self) -> str:
        """The primary account's login."""
        return self.accounts[0].login

    # accounts

    def account(self, index: int = 0) -> Account:
        """Rig account ``index`` (0: primary), created with any before it on first use.

        At most MAX_ACCOUNTS; every one is deleted at close(). Tests that need two Unix
        accounts use ``account(0)`` and ``account(1)``; the same index is the same account.
        """
        if not 0 <= index < MAX_ACCOUNTS:
            raise ValueError(f"the rig offers accounts 0..{MAX_ACCOUNTS - 1}")
        while len(self.accounts) <= index:
            self._add_account()
        return self.accounts[index]

    def _add_account(self) -> None:
        login = self.planned_logins[len(self.accounts)]
        home = self.base / "home" / login
        try:
            existing = pwd.getpwnam(login)
        except KeyError:
            existing = None
        if existing is not None:
            # only our own pid is in the name, so an existing one is a crashed run's leftover
            if not _GECOS.match(existing.pw_gecos):
                raise RuntimeError(f"account {login} exists and is not a rig account")
            _userdel(login)
        gecos = f"rex test rig pid {os.getpid()}"
        argv = ["useradd", "-M", "-d", str(home), "-s", "/bin/sh", "-c", gecos, "-p", "*", login]
        for attempt in range(20):
            out = subprocess.run(argv, capture_output=True, check=False)
            if out.returncode == 0:
                break
            # another rig may hold the passwd lock (exit 10) at the same moment
            if out.returncode != 10 or attempt == 19:
                raise RuntimeError(f"useradd {login} failed: {out.stderr.decode(errors='replace')}")
            time.sleep(0.05)
        entry = pwd.getpwnam(login)
        account = Account(login=login, uid=entry.pw_uid, gid=entry.pw_gid, home=str(home))
        self.accounts.append(account)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True)
        keys = ssh_dir / "authorized_keys"
        keys.write_text(self.public_key)
        os.chmod(home, 0o700)
        os.chmod(keys, 0o600)
        for path in (home, ssh_dir, keys):
            os.chown(path, account.uid, account.gid)
        for sshd in self._sshds:
            self._make_state_dir(sshd.host.state_root, account)

    def allow_become(self, target: int, login: int = 0) -> Account:
        """Let rig account ``login`` run anything as rig account ``target`` through ``sudo -n``
        (a sudoers.d drop-in of this rig, 0440, removed at close()); the target account."""
        pair = (self.account(login).login, self.account(target).login)
        if pair not in self._sudo_rules:
            self._sudo_rules.append(pair)
            write_rules(self._tag, self._sudo_rules)
        return self.account(target)

    def model_user(self, name: str | None = None, login: str | None = None) -> User:
        """A model.User for a rig account (default: the primary one) with the rig key."""
        login = login or self.login
        return User(name=name or login, login=login, identity=self.identity)

    def _make_state_dir(self, state_root: str, account: Account) -> None:
        path = os.path.join(state_root, account.login)
        os.mkdir(path, 0o700)
        os.chown(path, account.uid, account.gid)

    # sshd processes

    def hosts(self, n: int) -> list[RigHost]:
        """The first ``n`` shared hosts, starting any missing ones; do not stop or pause them."""
        shared = [s for s in self._sshds if s.shared]
        if len(shared) < n:
            shared += self._start(n - len(shared), shared=True)
        return [s.host for s in shared[:n]]

    def spawn(
        self,
        count: int = 1,
        *,
        max_startups: str | None = None,
        cgroup: bool = False,
        netns: NetNs | None = None,
        options: Sequence[str] = (),
    ) -> list[RigHost]:
        """``count`` dedicated hosts for fault tests; stop them with ``stop()`` when done.

        ``max_startups`` (sshd's ``start:rate:full``) replaces the rig's generous MaxStartups;
        such a host logs at VERBOSE, so every connection it drops is in ``log_text()``.
        ``cgroup``: each sshd runs in a cgroup v2 of its own, delegated to the primary account
        (``RigHost.cgroup``), under a parent the rig owns; RuntimeError where
        cgroup_unavailable_reason() says why not. The rig removes them at ``stop()``, or at
        ``close()`` when processes still held them. ``netns`` (tests/netrig.py): the sshds run
        in that network namespace, at its inside address (hosts named n10, n11, ...).
        ``options``: sshd_config lines added to the rig's (e.g. "AllowTcpForwarding no").
        """
        started = self._start(
            count,
            shared=False,
            max_startups=max_startups,
            cgroup=cgroup,
            netns=netns,
            options=tuple(options),
        )
        return [s.host for s in started]

    def log_text(self, host: RigHost) -> str:
        """What ``host``'s sshd has written to its log (stderr) so far."""
        return self._find(host).log.read_text(errors="replace")

    def stop(self, host: RigHost) -> None:
        """Kill ``host``'s sshd and every process it started, by pid; forget the host."""
        sshd = self._find(host)
        self._sshds.remove(sshd)
        self._stop(sshd)
        self._remove_cgroups(final=False)
        # a later host on this address starts clean: new host key, empty state dirs
        shutil.rmtree(self.base / "hosts" / host.name, ignore_errors=True)
        shutil.rmtree(host.state_root, ignore_errors=True)
        if sshd.netns is None:  # namespace hosts number apart: 127.0.0.x stays as it was
            self._free_indexes.append(sshd.index)
        self._write_known_hosts()

    def pause(self, host: RigHost) -> None:
        """SIGSTOP the listening sshd: TCP still connects (kernel backlog) but no banner comes."""
        os.kill(self._find(host).proc.pid, signal.SIGSTOP)

    def resume(self, host: RigHost) -> None:
        """SIGCONT a paused sshd."""
        os.kill(self._find(host).proc.pid, signal.SIGCONT)

    def pids(self) -> list[int]:
        """Pids of every running rig sshd and its descendants."""
        out: list[int] = []
        for sshd in self._sshds:
            out.append(sshd.proc.pid)
            out.extend(descendants(sshd.proc.pid))
        return out

    def _find(self, host: RigHost) -> _Sshd:
        for sshd in self._sshds:
            if sshd.host.pid == host.pid:
                return sshd
        raise KeyError(f"{host.name} is not a running rig host")

    def _take_index(self) -> int:
        if self._free_indexes:
            self._free_indexes.sort()
            return self._free_indexes.pop(0)
        index = self._next_index
        if index >= ADDRESSES * MAX_LAPS:
            raise RuntimeError(f"the rig holds at most {ADDRESSES * MAX_LAPS} hosts")
        self._next_index += 1
        return index

    def _take_netns_index(self) -> int:
        self._netns_hosts += 1
        return FIRST_OCTET + self._netns_hosts - 1

    def _start(
        self,
        count: int,
        *,
        shared: bool,
        max_startups: str | None = None,
        cgroup: bool = False,
        netns: NetNs | None = None,
        options: tuple[str, ...] = (),
    ) -> list[_Sshd]:
        pending: list[_Sshd] = []
        try:
            # launch all first so the sshds start up in parallel, then wait for each
            for _ in range(count):
                index = self._take_index() if netns is None else self._take_netns_index()
                group = self._delegated_cgroup(index) if cgroup else None
                pending.append(self._launch(index, shared, max_startups, group, netns, options))
            for i, sshd in enumerate(pending):
                pending[i] = self._await(sshd)
                self._sshds.append(pending[i])
        except BaseException:
            for sshd in pending:
                if sshd not in self._sshds:
                    self._stop(sshd)
            raise
        finally:
            self._write_known_hosts()
        return pending

    def _await(self, sshd: _Sshd) -> _Sshd:
        for _ in range(5):
            if self._wait_listening(sshd):
                return sshd
            # lost the free-port race to another process: same host, new port
            self._dead.append(sshd.proc.pid)
            sshd = self._launch(
                sshd.index, sshd.shared, sshd.max_startups, sshd.cgroup, sshd.netns, sshd.options
            )
        self._stop(sshd)
        raise RuntimeError(f"{sshd.host.name}: no free port after 5 tries")

    def _launch(
        self,
        index: int,
        shared: bool,
        max_startups: str | None = None,
        cgroup: str | None = None,
        netns: NetNs | None = None,
        options: tuple[str, ...] = (),
    ) -> _Sshd:
        name, address = host_slot(index)
        if netns is not None:
            name, address = f"n{index}", netns.inside
        hdir = self.base / "hosts" / name
        hdir.mkdir(mode=0o700, exist_ok=True)
        key = hdir / "ssh_host_ed25519_key"
        if not key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)])
        host_key = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        state_root = self.base / "state" / name
        if not state_root.exists():
            state_root.mkdir(mode=0o711)
            os.chmod(state_root, 0o711)
            for account in self.accounts:
                self._make_state_dir(str(state_root), account)
        # a fresh namespace has no other listener; a clash is relaunched by _await
        port = _free_port(address) if netns is None else 20000 + secrets.randbelow(40000)
        config = hdir / "sshd_config"
        penalties = self._use_penalties(key)
        text = self._config(address, port, key, state_root, penalties, max_startups, options)
        config.write_text(text)
        log = hdir / "sshd.log"
        with open(log, "wb") as err:
            # umask 022 as a typical remote: put() must still yield 0600 files and 0700 dirs
            proc = subprocess.Popen(
                [*(netns.prefix() if netns else []), SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                umask=0o022,
            )
        if cgroup is not None:
            # sshd -D forks only for a connection, and none comes before it listens
            try:
                Path(cgroup, "cgroup.procs").write_text(str(proc.pid))
            except OSError:
                proc.kill()
                proc.wait()
                raise
        host = RigHost(
            name=name,
            address=address,
            port=port,
            login=self.login,
            identity=self.identity,
            state_dir=str(state_root / self.login),
            pid=proc.pid,
            known_hosts=self.known_hosts,
            host_key=host_key,
            state_root=str(state_root),
            cgroup=cgroup,
        )
        return _Sshd(
            host=host,
            proc=proc,
            index=index,
            shared=shared,
            log=log,
            max_startups=max_startups,
            cgroup=cgroup,
            netns=netns,
            options=options,
        )

    def _delegated_cgroup(self, index: int) -> str:
        """A new cgroup for host ``index`` under the rig's parent, delegated to the primary
        account the way cgroup v2 delegation is done: it owns the directory and the files
        that move processes and enable controllers."""
        reason = cgroup_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        if self._cgroup_parent is None:
            parent = Path(str(cgroup2_mount()), self._tag)
            parent.mkdir()
            self._cgroup_parent = parent
        path = self._cgroup_parent / f"{host_slot(index)[0]}-{len(self._cgroups)}"
        path.mkdir()
        self._cgroups.append(str(path))
        account = self.accounts[0]
        for entry in (path, *(path / f for f in _DELEGATED)):
            os.chown(entry, account.uid, account.gid)
        return str(path)

    def _remove_cgroups(self, *, final: bool) -> list[str]:
        """Remove the delegated cgroups no process holds any more (each with the cgroups the
        agents made in it); ``final`` (teardown) first kills what is still in them, and then
        the rig's parent goes too. Returns those left."""
        running = {s.cgroup for s in self._sshds}
        left = []
        for path in self._cgroups:
            if path in running:
                left.append(path)
                continue
            if final:
                _kill_cgroup(path)
            if not _remove_tree(path):
                left.append(path)
        self._cgroups = left
        if final and not left and self._cgroup_parent is not None:
            if _remove_tree(str(self._cgroup_parent)):
                self._cgroup_parent = None
        return left

    def _config(
        self,
        address: str,
        port: int,
        key: Path,
        state_root: Path,
        penalties: bool,
        max_startups: str | None = None,
        options: tuple[str, ...] = (),
    ) -> str:
        lines = [
            f"ListenAddress {address}:{port}",
            "AddressFamily inet",
            f"HostKey {key}",
            "PidFile none",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # homes and state dirs live under a rig tmp dir whose parents StrictModes dislikes
            "StrictModes no",
            "PermitRootLogin no",
            f"AllowUsers {' '.join(self.planned_logins)}",
            f"MaxStartups {max_startups or '100:30:200'}",
            "MaxSessions 100",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            # VERBOSE logs each "drop connection ... past MaxStartups" (ERROR only the first)
            f"LogLevel {'VERBOSE' if max_startups else 'ERROR'}",
            "Subsystem sftp internal-sftp",
            *options,  # before the Match blocks: global settings
        ]
        if penalties:
            # OpenSSH >= 9.8 would lock 127.0.0.1 out after the auth-failure tests
            lines.append("PerSourcePenalties no")
        # SetEnv keeps only its first occurrence per connection, hence one Match block per login
        for login in self.planned_logins:
            lines += [f"Match User {login}", f"    SetEnv REX_HOME={state_root / login}"]
        return "\n".join(lines) + "\n"

    def _use_penalties(self, key: Path) -> bool:
        if self._penalties is None:
            probe = key.parent / "probe_config"
            probe.write_text(f"HostKey {key}\nPerSourcePenalties no\n")
            out = subprocess.run([SSHD, "-t", "-f", str(probe)], capture_output=True, check=False)
            probe.unlink()
            self._penalties = out.returncode == 0
        return self._penalties

    def _wait_listening(self, sshd: _Sshd) -> bool:
        """Wait until sshd accepts TCP; False if it lost its port, raise on any other failure."""
        end = time.monotonic() + START_DEADLINE
        while time.monotonic() < end:
            if sshd.proc.poll() is not None:
                err = sshd.log.read_text(errors="replace")
                if "Address already in use" in err:
                    return False
                raise RuntimeError(f"sshd for {sshd.host.name} exited: {err.strip()}")
            try:
                with socket.create_connection((sshd.host.address, sshd.host.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.005)
        self._stop(sshd)
        raise RuntimeError(f"sshd for {sshd.host.name} did not listen within {START_DEADLINE}s")

    def _stop(self, sshd: _Sshd) -> None:
        pid = sshd.proc.pid
        if sshd.proc.poll() is None:
            # freeze the listener so no new connection child appears while we collect the tree
            os.kill(pid, signal.SIGSTOP)
            children = descendants(pid)
            sshd.proc.kill()
            sshd.proc.wait(timeout=5)
            _kill_all(children)
            self._dead.extend(children)
        self._dead.append(pid)

    def _write_known_hosts(self) -> None:
        lines = [f"[{s.host.address}]:{s.host.port} {s.host.host_key}\n" for s in self._sshds]
        tmp = f"{self.known_hosts}.{secrets.token_hex(4)}"
        Path(tmp).write_text("".join(lines))
        os.replace(tmp, self.known_hosts)

    # teardown

    def close(self) -> None:
        """Stop every sshd and rig-account process by pid, delete the accounts and the tmp dir.

        Raises RuntimeError if any of those processes is still alive afterwards.
        """
        while self._sshds:
            self._stop(self._sshds.pop())
        if self._sudo_rules:
            remove_rules(self._tag)
            self._sudo_rules.clear()
        uids = {a.uid for a in self.accounts}
        # agents may daemonize away from sshd's tree; the accounts are ours alone, so any
        # process they own is a test leftover
        owned = [pid for pid, (_pp, uid) in _process_table().items() if uid in uids]
        _kill_all(owned)
        self._dead.extend(owned)
        cgroups = self._remove_cgroups(final=True)
        for account in reversed(self.accounts):
            _userdel(account.login)
        self.accounts.clear()
        shutil.rmtree(self.base, ignore_errors=True)
        left = sorted(p for p in set(self._dead) if _alive(p))
        if left:
            raise RuntimeError(f"sshd rig left processes alive: {left}")
        if cgroups:
            raise RuntimeError(f"sshd rig could not remove its cgroups: {cgroups}")

    def dead_pids(self) -> list[int]:
        """Every pid the rig has stopped so far (for leak assertions)."""
        return list(self._dead)


def _userdel(login: str) -> None:
    for attempt in range(20):
        out = subprocess.run(["userdel", login], capture_output=True, check=False)
        if out.returncode in (0, 6):  # 6: no such user
            return
        if out.returncode != 10 or attempt == 19:
            raise RuntimeError(f"userdel {login} failed: {out.stderr.decode(errors='replace')}")
        time.sleep(0.05)


def _remove_stale_accounts() -> None:
    """Delete rig accounts whose creating test session is gone (crashed or killed), and
    their sudoers.d drop-ins."""
    remove_stale(_alive)
    for entry in pwd.getpwall():
        match = _GECOS.match(entry.pw_gecos)
        if not match or not entry.pw_name.startswith("rextest"):
            continue
        if _alive(int(match.group(1))):
            continue
        # best effort: a leftover still running processes keeps its account until next time
        subprocess.run(["userdel", entry.pw_name], capture_output=True, check=False)
