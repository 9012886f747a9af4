"""Readiness probe kinds: the one table of them (KINDS), read by the launch message's check
(wire.launch), the manifest (core.settings), the spec (core.spec), the plan's display (cli.ui)
and the agent (remote.agent.probes, whose CHECKS has a check for each polled kind).

A new kind is a row here; then its manifest reader (core.settings._READERS), its check on the
host if it is polled (remote.agent.probes.CHECKS), its entry in the manifest schema
(resources/manifest.schema.json, ``$defs.ready``) and its field on core.model.Ready and
wire.launch.Probe when it needs one. Tests check that those agree with this table.
"""

from __future__ import annotations

from rexplan.wire.record import Frozen

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    class Target(Protocol):
        """A probe as core.model.Ready and wire.launch.Probe both hold it."""

        @property
        def kind(self) -> str: ...
        @property
        def settle(self) -> float: ...
        @property
        def host(self) -> str: ...
        @property
        def port(self) -> int | None: ...
        @property
        def url(self) -> str | None: ...
        @property
        def argv(self) -> tuple[str, ...]: ...
        @property
        def path(self) -> str | None: ...


#: keys of every launch message's ``ready`` dict, whatever the kind
COMMON_KEYS = ("kind", "interval", "settle")


class ProbeKind(Frozen):
    """One kind of readiness probe.

    ``fields``: the keys its launch ``ready`` dict adds to COMMON_KEYS, in order (each is an
    attribute of Ready and Probe); ``required``: those a launch message must hold;
    ``polled``: the agent tries its check every interval until it passes (``alive`` waits out
    its settle time instead, ``notify`` listens on its socket); ``show``: its target for people
    (``tcp:5432``, the URL, ``alive:0.5s``), before escaping; ``long``: that text can be a
    whole command line, shown up to the command limit rather than the usual one;
    ``describe``: what a probe that did not pass within ``timeout`` seconds says (``tcp
    127.0.0.1:5432 not accepting after 30 s``), the agent's reason for a ready timeout.
    """

    name: str
    show: Callable[[Target], str]
    describe: Callable[[Target, float], str]
    fields: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    polled: bool = False
    long: bool = False


def _show_tcp(probe: Target) -> str:
    where = "" if probe.host == "127.0.0.1" else f"{probe.host}:"
    return f"tcp:{where}{probe.port}"


def _show_command(probe: Target) -> str:
    import shlex  # here: the agent never shows a probe, and shlex imports re

    return f"command:{shlex.join(probe.argv)}"


def _after(timeout: float) -> str:
    return f"after {timeout:g} s"


def _describe_command(probe: Target, timeout: float) -> str:
    # no shlex: the agent says this, and shlex imports re
    return f"command {' '.join(probe.argv)} did not exit 0 {_after(timeout)}"


#: the kinds, by name, in the order messages list them; the first is the default
KINDS: dict[str, ProbeKind] = {
    kind.name: kind
    for kind in (
        ProbeKind(
            "alive",
            lambda probe: f"alive:{probe.settle:g}s",
            lambda probe, timeout: f"not alive for {probe.settle:g} s {_after(timeout)}",
        ),
        ProbeKind(
            "tcp",
            _show_tcp,
            lambda probe, timeout: f"tcp {probe.host}:{probe.port} not accepting {_after(timeout)}",
            fields=("host", "port"),
            required=("port",),
            polled=True,
        ),
        ProbeKind(
            "http",
            lambda probe: probe.url or "",
            lambda probe, timeout: f"http {probe.url} not answering 2xx/3xx {_after(timeout)}",
            fields=("url",),
            required=("url",),
            polled=True,
        ),
        ProbeKind(
            "command",
            _show_command,
            _describe_command,
            fields=("argv",),
            required=("argv",),
            polled=True,
            long=True,
        ),
        ProbeKind(
            "file",
            lambda probe: f"file:{probe.path}",
            lambda probe, timeout: f"file {probe.path} not there {_after(timeout)}",
            fields=("path",),
            required=("path",),
            polled=True,
        ),
        ProbeKind(
            "notify",
            lambda probe: "notify",
            lambda probe, timeout: f"no READY=1 on the notify socket {_after(timeout)}",
        ),
    )
}

#: the kind a program without a ready probe gets
DEFAULT = next(iter(KINDS))

#: the kinds a manifest's ``ready`` may name, in the order they win when several are given:
#: the default (which takes no target) last
MANIFEST_ORDER = (*(name for name in KINDS if name != DEFAULT), DEFAULT)

#: every key of a launch message's ``ready`` dict (the common ones, then each kind's)
KEYS = COMMON_KEYS + tuple(dict.fromkeys(field for kind in KINDS.values() for field in kind.fields))
