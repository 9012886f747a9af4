"""Code shipped to remote hosts (stdlib only), and the launcher's helpers that package it.

The agent runs on a host as ONE script, ``bundle()``: it registers rexplan/protocol.py and
rexplan/remote/agent.py as in-memory modules (``rexplan.protocol``, ``rexplan.remote.agent``,
ahead of any rexplan installed there) and runs the agent. Two ways to run it:

- a file: upload ``bundle()`` once as ``~/.rex/agent-<bundle_sha()>.py``, then run
  ``python3 -I -S FILE`` with the launch line (protocol.make_launch) on stdin; its first run
  keeps the compiled modules next to it (``FILE.<cache_tag>.code``) for the next ones;
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


def _rex_codes(sources):
    # Compiling the sources costs more than the rest of a short run: a bundle run as a file
    # keeps their code next to it (FILE.<cache_tag>.code), checked by the sources' sha256.
    import marshal
    import os

    tag = getattr(sys.implementation, "cache_tag", None)
    path = globals().get("__file__")
    cache = "%s.%s.code" % (path, tag) if path and tag else None
    if cache is not None:
        try:
            with open(cache, "rb") as f:
                sha, codes = marshal.load(f)
            if sha == {sha!r}:
                return codes
        except (OSError, EOFError, ValueError, TypeError):
            pass
    codes = tuple(
        compile(source, "<rex-bundle>/" + name.replace(".", "/") + ".py", "exec")
        for name, source in sources
    )
    if cache is not None:
        tmp = "%s/.%s.%d.tmp" % (os.path.dirname(cache), os.path.basename(cache), os.getpid())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                marshal.dump(({sha!r}, codes), f)
            os.replace(tmp, cache)
        except (OSError, ValueError):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return codes


def _rex_module(name, code=None):
    module = types.ModuleType(name)
    sys.modules[name] = module
    if code is None:
        module.__path__ = []
    else:
        module.__file__ = code.co_filename
        exec(code, module.__dict__)
    return module


_rex_protocol, _rex_agent = _rex_codes(
    (("rexplan.protocol", {protocol!r}), ("rexplan.remote.agent", {agent!r}))
)
_rex_module("rexplan").remote = _rex_module("rexplan.remote")
sys.modules["rexplan"].protocol = _rex_module("rexplan.protocol", _rex_protocol)
sys.exit(_rex_module("rexplan.remote.agent", _rex_agent).main())
"""


@functools.lru_cache(maxsize=1)
def bundle() -> bytes:
    """The agent as one self-contained Python >= 3.8 script."""
    package = resources.files("rexplan")
    protocol = package.joinpath("protocol.py").read_text(encoding="utf-8")
    agent = package.joinpath("remote").joinpath("agent.py").read_text(encoding="utf-8")
    sha = hashlib.sha256(f"{protocol}\0{agent}".encode()).hexdigest()
    return _TEMPLATE.format(protocol=protocol, agent=agent, sha=sha).encode("utf-8")


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
