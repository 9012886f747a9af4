"""Code shipped to remote hosts (stdlib only), and the launcher's helpers that package it.

The agent runs on a host as ONE script, ``bundle()``: it registers rexplan/protocol.py and
rexplan/remote/agent.py as in-memory modules (``rexplan.protocol``, ``rexplan.remote.agent``,
ahead of any rexplan installed there) and runs the agent. Two ways to run it:

- a file: upload ``bundle()`` once as ``~/.rex/agent-<bundle_sha()>.py``, then run
  ``python3 -I -S FILE`` with the launch line (protocol.make_launch) on stdin;
- no file: run ``bootstrap_argv()`` and write ``bootstrap_input(launch_line)`` to its stdin;
  the small ``-c`` bootstrap reads the bundle, checks its sha256 against argv, and execs it.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

#: ``python3 -I -S -c BOOTSTRAP <sha> [ARGS]``: read "<length>\n<bundle>" from stdin, check
#: its sha256, drop the sha from sys.argv, and run it
BOOTSTRAP = (
    "import sys,hashlib\n"
    "b=sys.stdin.buffer\n"
    "s=b.read(int(b.readline(16)))\n"
    "if hashlib.sha256(s).hexdigest()!=sys.argv[1]:\n"
    " sys.stderr.write('rex-agent: bundle damaged in transit\\n');sys.exit(16)\n"
    "del b,sys.argv[1]\n"
    "exec(compile(s,'<rex-agent>','exec'))\n"
)

_TEMPLATE = """\
# rex agent bundle: rexplan/protocol.py and rexplan/remote/agent.py; stdlib only, Python >= 3.8
import sys
import types


def _rex_module(name, source=None):
    module = types.ModuleType(name)
    sys.modules[name] = module
    if source is None:
        module.__path__ = []
    else:
        module.__file__ = "<rex-bundle>/" + name.replace(".", "/") + ".py"
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


_rex_module("rexplan").remote = _rex_module("rexplan.remote")
sys.modules["rexplan"].protocol = _rex_module("rexplan.protocol", {protocol!r})
sys.exit(_rex_module("rexplan.remote.agent", {agent!r}).main())
"""


@functools.lru_cache(maxsize=1)
def bundle() -> bytes:
    """The agent as one self-contained Python >= 3.8 script."""
    package = resources.files("rexplan")
    protocol = package.joinpath("protocol.py").read_text(encoding="utf-8")
    agent = package.joinpath("remote").joinpath("agent.py").read_text(encoding="utf-8")
    return _TEMPLATE.format(protocol=protocol, agent=agent).encode("utf-8")


def bundle_sha() -> str:
    """sha256 hex of bundle(): names the uploaded agent file and is checked by the bootstrap."""
    return hashlib.sha256(bundle()).hexdigest()


def bootstrap_argv(python: str = "python3", *args: str) -> list[str]:
    """argv that runs the agent (with ``args``, e.g. --kill) without a file on the host."""
    return [python, "-I", "-S", "-c", BOOTSTRAP, bundle_sha(), *args]


def bootstrap_input(launch_line: bytes) -> bytes:
    """stdin for bootstrap_argv(): the bundle, length-prefixed, then the launch line."""
    code = bundle()
    return b"%d\n" % len(code) + code + launch_line
