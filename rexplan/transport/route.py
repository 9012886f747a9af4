"""How a host is reached: the manifest, users.*.ssh_options and ssh_config, as OpenSSH does.

Precedence, first found wins, per setting (documented in rex-manifest(5)):

1. what the manifest sets explicitly: ``hosts.*.address`` / ``port`` (or ``defaults.port``),
   ``hosts.*.jump``, ``users.*.login`` / ``identity``;
2. ``users.*.ssh_options`` (HostName, Port, User, IdentityFile, IdentitiesOnly, ProxyJump,
   ConnectTimeout);
3. the ssh_config file, looked up by the host's manifest name (as ``ssh NAME`` would):
   ``defaults.ssh_config``, else ``$REX_SSH_CONFIG``, else ~/.ssh/config then
   /etc/ssh/ssh_config;
4. the built-in defaults: the host's name, port 22, the user's name, the agent and ~/.ssh keys.

Bastions (ProxyJump) are resolved the same way, each hop looked up in ssh_config by its own
name; the first hop's own ProxyJump there is followed too (OpenSSH runs ``ssh -W`` to it). A
hop's login is its ``user@``, else its ssh_config User, else the target's login; its keys are
its ssh_config IdentityFile, else the target's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import paramiko

from rexplan.core import sshopts
from rexplan.core.model import Host, User
from rexplan.core.text import printable
from rexplan.core.values import address_problem
from rexplan.errors import TransportError

#: the environment variable naming the ssh_config file when the manifest names none
ENV = "REX_SSH_CONFIG"
_DEFAULT_FILES = ("~/.ssh/config", "/etc/ssh/ssh_config")


@dataclass(frozen=True)
class Hop:
    """One SSH server on the way: where to dial it and how to log in."""

    label: str  # the name it is known by: the manifest host name or the jump as written
    address: str
    port: int
    login: str
    identities: tuple[str, ...]  # key files offered first (expanded paths)
    identities_only: bool  # only those: no agent, no ~/.ssh default keys
    connect_timeout: float | None  # ssh_config ConnectTimeout, seconds


@dataclass(frozen=True)
class Route:
    """The bastions (first hop first) and the target."""

    jumps: tuple[Hop, ...]
    target: Hop


def config_files(host: Host) -> tuple[str, ...]:
    """The ssh_config files read for ``host``, in the order OpenSSH reads them."""
    if host.ssh_config:
        return (os.path.expanduser(host.ssh_config),)
    named = os.environ.get(ENV)
    if named:
        return (os.path.expanduser(named),)
    return tuple(os.path.expanduser(p) for p in _DEFAULT_FILES)


class _ConfigCache:
    """One parsed SSHConfig per list of files and their (mtime, size)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parsed: dict[tuple[str, ...], tuple[object, paramiko.SSHConfig]] = {}

    def get(self, files: tuple[str, ...]) -> paramiko.SSHConfig:
        stamp = tuple(_stamp(p) for p in files)
        with self._lock:
            hit = self._parsed.get(files)
            if hit is None or hit[0] != stamp:
                config = paramiko.SSHConfig()
                for path in files:
                    if stamp[files.index(path)] is not None:
                        with open(path, encoding="utf-8", errors="replace") as f:
                            config.parse(f)
                hit = (stamp, config)
                self._parsed[files] = hit
            return hit[1]


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


CONFIGS = _ConfigCache()
#: routes already resolved, by host, user and the content of the ssh_config files: a
#: lookup costs a third of a millisecond, paid once per connection and per callback address
_ROUTES: dict[tuple[object, ...], Route] = {}
_MAX_ROUTES = 65536


def _lookup(host: Host, name: str) -> Mapping[str, Any]:
    files = config_files(host)
    try:
        return CONFIGS.get(files).lookup(name)
    except (paramiko.ConfigParseError, OSError, ValueError) as e:
        raise TransportError(
            f"cannot read ssh_config {', '.join(files)}: {e}", host=host.name, phase="connect"
        ) from e


def _options(user: User) -> dict[str, str]:
    return {name.lower(): value for name, value in user.ssh_options}


def _port(value: Any) -> int:
    return value if isinstance(value, int) else sshopts.parse_port(str(value))


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _identities(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    paths = [value] if isinstance(value, str) else list(value)
    return tuple(os.path.expanduser(p) for p in paths)


def _yes(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "yes"


def _timeout(value: Any) -> float | None:
    try:
        return float(value) if value is not None and float(value) > 0 else None
    except ValueError:
        return None


def route(host: Host, user: User) -> Route:
    """Where and how rex connects to ``host`` as ``user``; TransportError for an unreadable
    ssh_config or a bad value there (the manifest's own values were checked already)."""
    files = config_files(host)
    key = (host, user, files, tuple(_stamp(p) for p in files), os.environ.get("HOME"))
    hit = _ROUTES.get(key)
    if hit is not None:
        return hit
    try:
        found = _route(host, user)
    except ValueError as e:
        raise TransportError(
            f"ssh_config {', '.join(config_files(host))}: {printable(str(e))}",
            host=host.name,
            phase="connect",
            hint="fix that file, or set the value in the manifest",
        ) from e
    for hop in (*found.jumps, found.target):
        problem = address_problem(hop.address)
        if problem:
            raise TransportError(
                f"ssh_config {', '.join(config_files(host))}: HostName "
                f"{printable(hop.address)!r} {problem}",
                host=host.name,
                phase="connect",
            )
    if len(_ROUTES) >= _MAX_ROUTES:
        _ROUTES.clear()
    _ROUTES[key] = found
    return found


def _route(host: Host, user: User) -> Route:
    opts = _options(user)
    conf = _lookup(host, host.name)
    address = (
        host.address
        if host.address_set
        else _first(opts.get("hostname"), conf.get("hostname"), host.name)
    )
    port = host.port if host.port_set else _port(_first(opts.get("port"), conf.get("port"), 22))
    login = user.login if user.login_set else _first(opts.get("user"), conf.get("user"), user.login)
    identities: tuple[str, ...]
    if user.identity:
        identities, only = (os.path.expanduser(user.identity),), True
    else:
        identities = _identities(_first(opts.get("identityfile"), conf.get("identityfile")))
        only = _yes(_first(opts.get("identitiesonly"), conf.get("identitiesonly")))
    timeout = _timeout(_first(opts.get("connecttimeout"), conf.get("connecttimeout")))
    target = Hop(host.name, str(address), port, str(login), identities, only, timeout)
    jump = _first(host.jump, opts.get("proxyjump"), conf.get("proxyjump"))
    jumps = _jumps(host, str(jump), target) if jump is not None else ()
    return Route(jumps, target)


def _jumps(host: Host, text: str, target: Hop) -> tuple[Hop, ...]:
    """The hops of ProxyJump ``text``, the first one's own ProxyJump followed."""
    hops: list[Hop] = []
    seen = {host.name}
    try:
        pending = sshopts.parse_jumps(text)
        while pending:
            hops[:0] = [_hop(host, j, target) for j in pending]
            first = pending[0].host
            if first in seen:
                raise ValueError(f"a ProxyJump loop through {first}")
            seen.add(first)
            before = _lookup(host, first).get("proxyjump")
            if before is None:
                break
            pending = sshopts.parse_jumps(before)
            if len(hops) + len(pending) > sshopts.MAX_HOPS:
                raise ValueError(f"more than {sshopts.MAX_HOPS} bastions")
    except ValueError as e:
        raise ValueError(f"bad ProxyJump {text!r} for {host.name}: {e}") from e
    return tuple(hops)


def _hop(host: Host, jump: sshopts.Jump, target: Hop) -> Hop:
    conf = _lookup(host, jump.host)
    address = str(_first(conf.get("hostname"), jump.host))
    port = jump.port if jump.port is not None else _port(_first(conf.get("port"), 22))
    login = str(_first(jump.login, conf.get("user"), target.login))
    identities = _identities(conf.get("identityfile"))
    if identities:
        only = _yes(conf.get("identitiesonly"))
    else:
        identities, only = target.identities, target.identities_only
    timeout = _first(_timeout(conf.get("connecttimeout")), target.connect_timeout)
    return Hop(str(jump), address, port, login, identities, only, timeout)
