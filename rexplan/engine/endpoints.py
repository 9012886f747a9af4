"""Where the run's callback listener listens, and the address each host dials to reach it."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable

from rexplan.core.model import Manifest, Plan
from rexplan.engine.listener import CallbackListener
from rexplan.errors import Diagnostic, ManifestError, TransportError
from rexplan.transport.base import kind
from rexplan.transport.route import route

#: bind here when hosts reach the launcher over different routes
ALL_ADDRESSES = "0.0.0.0"  # noqa: S104 - only when the routes to the hosts differ


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def route_source(address: str, port: int = 22) -> str:
    """This machine's address on the route to ``address`` (a UDP connect sends no packet)."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return str(s.getsockname()[0])


def callback_endpoints(manifest: Manifest, plan: Plan) -> tuple[str, Callable[[str], str]]:
    """(bind address, host address -> address that host dials) for this run's listener.

    ``callback.bind``/``advertise`` win. Otherwise loopback when every host of the plan is
    local or loopback or calls back through its SSH connection (``via: ssh``: the listener
    then takes no connection from the network), else the launcher's address on the
    route to each host, bound to all addresses only when the routes differ.
    """
    # a host named only in ssh_config (HostName) is dialled at the address ssh_config gives
    dialled = _dialled(manifest, plan)
    bind, advertise = _endpoints(manifest, plan, dialled)
    return bind, lambda address: advertise(dialled.get(address, address))


def _dialled(manifest: Manifest, plan: Plan) -> dict[str, str]:
    """Each SSH step's manifest address -> the address this machine dials for it: the
    host's (ssh_config's HostName applied), or its first bastion's, whose route is the one
    this machine knows (the host's name may resolve only behind the bastion)."""
    out: dict[str, str] = {}
    for s in plan.steps:
        if kind(s.transport).is_local or s.address in out:
            continue
        try:
            path = route(manifest.host(s.host), manifest.user(s.user))
        except TransportError:
            out[s.address] = s.address  # the step's connect reports the ssh_config problem
            continue
        out[s.address] = (path.jumps[0] if path.jumps else path.target).address
    return out


def _endpoints(
    manifest: Manifest, plan: Plan, dialled: dict[str, str]
) -> tuple[str, Callable[[str], str]]:
    cb = manifest.callback
    if cb.bind is not None:
        fixed = cb.advertise or cb.bind
        if fixed in (ALL_ADDRESSES, "::"):
            return cb.bind, route_source
        return cb.bind, lambda _address: fixed
    remote = sorted(
        {
            dialled[s.address]
            for s in plan.steps
            if not kind(s.transport).is_local
            and not _is_loopback(dialled[s.address])
            and manifest.host(s.host).callback != "ssh"  # its agent dials a forward
        }
    )
    if not remote:
        local = cb.advertise or "127.0.0.1"
        return "127.0.0.1", lambda _address: local
    sources = {route_source(a) for a in remote}
    if cb.advertise is not None:
        advertised = cb.advertise
        return (sources.pop() if len(sources) == 1 else ALL_ADDRESSES), lambda _a: advertised
    if len(sources) == 1:
        only = sources.pop()
        return only, lambda address: "127.0.0.1" if _is_loopback(address) else only
    return (
        ALL_ADDRESSES,
        lambda address: "127.0.0.1" if _is_loopback(address) else route_source(address),
    )


def listen(listener: CallbackListener, manifest: Manifest, bind: str) -> None:
    """Start the run's listener before any host is contacted; a ManifestError (exit 4) naming
    the address when it cannot listen there, e.g. another process (maybe another user's)
    holds a fixed ``callback.port``: agents would call that process instead."""
    try:
        listener.start()
    except OSError as exc:
        listener.close()
        port = manifest.callback.port
        where = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
        if exc.errno == errno.EADDRINUSE:
            setting, problem = "callback.port", f"{where} is already in use by another process"
            hint = "stop what listens there, or choose another callback.port (0: any free port)"
        else:
            setting, problem = "callback", f"cannot listen on {where}"
            hint = "callback.bind must be an address of this machine"
        message = f"{problem} ({exc.strerror or exc}); no host was contacted"
        raise ManifestError([Diagnostic(manifest.path, 0, 0, setting, message, hint)]) from None
