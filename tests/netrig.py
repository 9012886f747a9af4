"""A fleet-like network for the sshd rig: hosts that cannot open a connection to the launcher.

``NetNs`` (root only) creates a network namespace of a unique name and a veth pair into it: a
/30 of link-local addresses (169.254.0.0/16, never routed off this link), the launcher's end
outside, the hosts' address inside. sshds started in it (``SshdRig.spawn(netns=...)``) are
reached from the launcher over the veth, but iptables in the namespace drops every new TCP
connection from inside to the launcher's address (OUTPUT, SYN only: the replies of the SSH
connections the launcher opened still pass), as a NAT or a firewall would. Traffic stays on
127.0.0.0/8 and the two ends of the veth. ``close()`` deletes the veth and the namespace by
name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sshrig import RigHost, SshdRig

IP = "/usr/sbin/ip"


def unavailable_reason() -> str | None:
    """Why the namespace rig cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the namespace rig needs root (ip netns, veth, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the namespace rig needs {tool} (tests/run installs iproute2 and iptables)"
    return None


def _run(argv: Sequence[str]) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip() or out.returncode}")


class NetNs:
    """A namespace whose hosts the launcher reaches and which cannot reach the launcher."""

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.name = f"rexns{tag}"
        self.outer = f"rxo{tag}"[:15]  # interface names have at most 15 characters
        self.inner = f"rxi{tag}"[:15]
        # a link-local /30 of its own, so parallel sessions do not collide
        third, fourth = secrets.randbelow(254) + 1, secrets.randbelow(63) * 4
        self.launcher = f"169.254.{third}.{fourth + 1}"
        self.inside = f"169.254.{third}.{fourth + 2}"
        self._made: list[str] = []
        try:
            _run([IP, "netns", "add", self.name])
            self._made.append("netns")
            _run([IP, "link", "add", self.outer, "type", "veth", "peer", "name", self.inner])
            self._made.append("veth")
            _run([IP, "link", "set", self.inner, "netns", self.name])
            _run([IP, "addr", "add", f"{self.launcher}/30", "dev", self.outer])
            _run([IP, "link", "set", self.outer, "up"])
            self.exec([IP, "addr", "add", f"{self.inside}/30", "dev", self.inner])
            self.exec([IP, "link", "set", self.inner, "up"])
            self.exec([IP, "link", "set", "lo", "up"])  # forwards listen on its 127.0.0.1
            # no new connection from the hosts to the launcher: SYN only, so the replies of
            # the launcher's own SSH connections still pass
            rule = ["-A", "OUTPUT", "-d", self.launcher, "-p", "tcp", "--syn", "-j", "DROP"]
            self.exec(["iptables", *rule])
        except BaseException:
            self.close()
            raise

    def prefix(self) -> list[str]:
        """The argv prefix running a command inside the namespace."""
        return [IP, "netns", "exec", self.name]

    def exec(self, argv: Sequence[str]) -> None:
        _run([*self.prefix(), *argv])

    def close(self) -> None:
        """Delete the veth (both ends go) and the namespace, by name; idempotent."""
        if "veth" in self._made:
            subprocess.run([IP, "link", "del", self.outer], capture_output=True, check=False)
        if "netns" in self._made:
            subprocess.run([IP, "netns", "del", self.name], capture_output=True, check=False)
        self._made = []


@contextlib.contextmanager
def hosts_in_namespace(rig: SshdRig, count: int) -> Iterator[tuple[NetNs, list[RigHost]]]:
    """``count`` sshds of ``rig`` in a namespace of their own; stopped by pid, and the namespace
    deleted by name, afterwards."""
    ns = NetNs()
    hosts: list[RigHost] = []
    try:
        hosts = rig.spawn(count, netns=ns)
        yield ns, hosts
    finally:
        for host in hosts:
            rig.stop(host)
        ns.close()
