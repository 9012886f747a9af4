"""The ssh_config options rex honours, and OpenSSH's ProxyJump syntax; pure, no I/O.

``users.*.ssh_options`` accept exactly these options (names case-insensitive, as ssh reads
them); rexplan.transport.route applies them, and the same options of an ssh_config file.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: lower-cased name -> the spelling OpenSSH documents
OPTIONS = {
    name.lower(): name
    for name in (
        "HostName",
        "Port",
        "User",
        "IdentityFile",
        "IdentitiesOnly",
        "ProxyJump",
        "ConnectTimeout",
    )
}

#: most bastions in one chain, ssh_config's own ProxyJump of the first one included
MAX_HOPS = 8

_LOGIN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_NAME_RE = re.compile(
    r"(?!-)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\Z"
)
_IPV6_RE = re.compile(r"\[([0-9A-Fa-f:.]+)\]\Z")


class Jump(NamedTuple):
    """One hop of a ProxyJump chain: ``[login@]host[:port]``; None where not given."""

    login: str | None
    host: str
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (
            (f"{self.login}@" if self.login else "")
            + host
            + (f":{self.port}" if self.port is not None else "")
        )


def parse_port(text: str) -> int:
    """A TCP port 1-65535 written in decimal; ValueError otherwise."""
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port (1-65535)")
    return int(text)


def parse_hop(text: str) -> Jump:
    """``[login@]host[:port]`` (an IPv6 address in brackets); ValueError naming what is wrong."""
    login: str | None = None
    rest = text
    if "@" in rest:
        login, _, rest = rest.rpartition("@")
        if not _LOGIN_RE.match(login):
            raise ValueError(f"{login!r} is not a login name")
    port: int | None = None
    if rest.startswith("["):
        host_part, sep, port_text = rest.partition("]")
        v6 = _IPV6_RE.match(host_part + "]")
        if v6 is None or (sep and port_text and not port_text.startswith(":")):
            raise ValueError(f"{rest!r} is not [ipv6-address] or [ipv6-address]:port")
        host = v6.group(1)
        if port_text:
            port = parse_port(port_text[1:])
        return Jump(login, host, port)
    host, sep, port_text = rest.partition(":")
    if sep:
        port = parse_port(port_text)
    if not _NAME_RE.match(host):
        raise ValueError(f"{host!r} is not a host name or address")
    return Jump(login, host, port)


def parse_jumps(text: str) -> tuple[Jump, ...]:
    """A ProxyJump value: hops separated by commas, first hop first; ``none``: no bastion.

    ValueError for an empty hop, ``ssh://`` URIs (not supported), or more than MAX_HOPS.
    """
    value = text.strip()
    if value.lower() == "none":
        return ()
    if "://" in value:
        raise ValueError("ssh:// URIs are not supported: write [user@]host[:port]")
    hops = tuple(parse_hop(part.strip()) for part in value.split(","))
    if len(hops) > MAX_HOPS:
        raise ValueError(f"more than {MAX_HOPS} bastions")
    return hops


def option_problem(name: str, value: str) -> str | None:
    """Why ``value`` is not a valid setting of option ``name`` (known to OPTIONS), or None."""
    option = name.lower()
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "ssh option values are one line of text"
    if not value.strip():
        return f"{OPTIONS[option]} needs a value"
    try:
        if option == "port":
            parse_port(value)
        elif option == "user" and not _LOGIN_RE.match(value):
            return f"{value!r} is not a login name"
        elif option == "hostname":
            parse_hop(value if ":" not in value else f"[{value}]")
        elif option == "identityfile" and value.startswith("-"):
            return f"{value!r} is not a key file path"
        elif option == "identitiesonly" and value.lower() not in ("yes", "no"):
            return "IdentitiesOnly is yes or no"
        elif option == "connecttimeout":
            if not value.isascii() or not value.isdigit() or int(value) < 1:
                return "ConnectTimeout is a whole number of seconds, at least 1"
        elif option == "proxyjump":
            parse_jumps(value)
    except ValueError as e:
        return str(e)
    return None
