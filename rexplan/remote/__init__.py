"""Code shipped to remote hosts (stdlib only), and the launcher's helpers that package it.

The agent runs on a host as ONE script, ``bundle()``: it registers rexplan/wire/*.py and
rexplan/remote/agent.py as in-memory modules (``rexplan.wire.<name>``, ``rexplan.remote.agent``,
ahead of any rexplan installed there) and runs the agent. Two ways to run it:

- a file: upload ``bundle()`` once as ``~/.rex/agent-<bundle_sha()>.py``, then run
  ``python3 -I -S FILE`` with the launch line (launch.make_launch) on stdin; its first run
  keeps the compiled modules next to it (``FILE.<cache_tag>.code``) for the next ones;
- no file: run ``bootstrap_argv()`` and write ``bootstrap_input(launch_line)`` to its stdin;
  the small ``-c`` bootstrap reads the bundle, checks its sha256 against argv, and execs it.
"""

from __future__ import annotations

import ast
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

#: the end of every agent run: register the compiled modules (``_rex_loaded``: (name, code)
#: pairs, the wire modules in the order they import each other, then ``rexplan.remote.agent``)
#: under their names, then run the agent
_RUN = (
    "def _rex_module(name, code=None):\n"
    "    module = types.ModuleType(name)\n"
    "    sys.modules[name] = module\n"
    "    if code is None:\n"
    "        module.__path__ = []\n"
    "    else:\n"
    "        module.__file__ = code.co_filename\n"
    "        exec(code, module.__dict__)\n"
    "    return module\n"
    "\n"
    "\n"
    "_rex_module('rexplan').remote = _rex_module('rexplan.remote')\n"
    "sys.modules['rexplan'].wire = _rex_module('rexplan.wire')\n"
    "for _rex_name, _rex_code in _rex_loaded:\n"
    "    _rex_parent, _, _rex_leaf = _rex_name.rpartition('.')\n"
    "    setattr(sys.modules[_rex_parent], _rex_leaf, _rex_module(_rex_name, _rex_code))\n"
    "sys.exit(sys.modules['rexplan.remote.agent'].main())\n"
)

#: LAUNCH_STUB's exit code (and report) when the agent file is not in REX_HOME: upload, retry
EXIT_NO_AGENT = 20

#: exit code of a launch that started nothing because its launch line did not come: not within
#: the agent's ``--wait`` seconds (agent.EXIT_NO_LAUNCH), or the launcher was gone when the
#: stub announced itself with LAUNCH_MARKER
EXIT_NO_LAUNCH = 21

#: the line LAUNCH_STUB prints before a launch reads its launch line: the launcher writes that
#: line only once this arrived within the step's start deadline, so a remote shell that starts
#: late (a slow login script) never receives it and starts nothing
LAUNCH_MARKER = "rex-launch-ready"

#: ``python3 -I -S -c LAUNCH_STUB <sha16> (check TRIPLE PROGRAM SPEC | -) [ARGS]``: run the
#: agent uploaded as ``$REX_HOME/agent-<sha16>.py`` (the launcher need not know where REX_HOME
#: is: one exec per launch, no shell round trip first), or report EXIT_NO_AGENT. With ``check``
#: it first reads PROGRAM's record: the same TRIPLE and SPEC digest with its program alive (pid
#: and start time, /proc/PID/stat field 22) is reported ``unchanged`` without loading the agent.
#: The agent's compiled modules come from the cache its first run left (FILE.<cache_tag>.code)
#: when there is one, so a launch compiles nothing; the cache is read whole and unmarshalled
#: with ``marshal.loads`` (``marshal.load`` reads a file in small pieces: 7 ms more CPU per
#: launch). A launch (ARGS ``--wait SECONDS``) prints LAUNCH_MARKER once the agent is at hand
#: and before it runs, so the launch line's round trip overlaps the agent's imports; the agent
#: then reads that line within SECONDS.
LAUNCH_STUB = (
    "import os,sys\n"
    "a=sys.argv\n"
    "h=os.environ.get('REX_HOME') or os.path.join(os.path.expanduser('~'),'.rex')\n"
    "if a[2]=='check':\n"
    " try:\n"
    "  import _json\n"
    "  class D:strict=True;object_hook=object_pairs_hook=None;parse_int=int;"
    "parse_float=parse_constant=float\n"
    "  with open(os.path.join(h,'run',a[4]+'.json'),'rb') as f:"
    "r=_json.make_scanner(D)(f.read(1<<20).decode(),0)[0]\n"
    "  p=r['pid']\n"
    "  with open('/proc/%d/stat'%p,'rb') as f:s=f.read().rsplit(b')',1)[1].split()\n"
    "  if type(p) is int and p>1 and r['triple']==a[3] and r['spec']==a[5]"
    " and s[0]!=b'Z' and s[19].decode()==r['start']:\n"
    '   sys.stdout.write(\'{"ok": true, "unchanged": true, "pid": %d}\\n\'%p);sys.exit(0)\n'
    " except Exception:pass\n"
    " del a[2:6]\n"
    "else:del a[2]\n"
    "f=os.path.join(h,'agent-'+a[1]+'.py')\n"
    "sys.argv=[f]+a[2:]\n"
    "s=None\n"
    "try:\n"
    " import marshal,types\n"
    " with open(f+'.'+sys.implementation.cache_tag+'.code','rb') as b:"
    "_rex_loaded=marshal.loads(b.read())[1]\n"
    "except Exception:\n"
    " try:\n"
    "  with open(f,'rb') as b:s=b.read()\n"
    " except OSError:\n"
    '  sys.stdout.write(\'{"ok": false, "exit": 20, "reason": "no agent"}\\n\');'
    "sys.exit(20)\n"
    "if a[2:3]==['--wait']:\n"
    " try:os.write(1,b'" + LAUNCH_MARKER + "\\n')\n"
    " except OSError:sys.exit(21)\n"
    "if s is not None:exec(compile(s,f,'exec'),{'__name__':'__main__','__file__':f})\n"
) + _RUN

_TEMPLATE = """\
# rex agent bundle: rexplan/wire/*.py and rexplan/remote/agent.py; stdlib only, Python >= 3.8
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
                sha, codes = marshal.loads(f.read())
            if sha == {sha!r}:
                return codes
        except (OSError, EOFError, ValueError, TypeError):
            pass
    codes = tuple(
        (name, compile(source, "<rex-bundle>/" + name.replace(".", "/") + ".py", "exec"))
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


_rex_loaded = _rex_codes({sources!r})
{run}"""


def _wire_sources() -> list[tuple[str, str]]:
    """(module name, source) of every rexplan/wire module, each after the ones it imports."""
    wire = resources.files("rexplan").joinpath("wire")
    sources = {
        path.name[: -len(".py")]: path.read_text(encoding="utf-8")
        for path in wire.iterdir()
        if path.name.endswith(".py") and path.name != "__init__.py"
    }
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for node in ast.walk(ast.parse(sources[name])):
            if isinstance(node, ast.ImportFrom) and node.module == "rexplan.wire":
                for alias in node.names:
                    visit(alias.name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "rexplan.wire."
            ):
                visit((node.module or "").split(".")[2])
        ordered.append(name)

    for name in sorted(sources):
        visit(name)
    return [(f"rexplan.wire.{name}", sources[name]) for name in ordered]


@functools.lru_cache(maxsize=1)
def bundle() -> bytes:
    """The agent as one self-contained Python >= 3.8 script."""
    package = resources.files("rexplan")
    agent = package.joinpath("remote").joinpath("agent.py").read_text(encoding="utf-8")
    sources = (*_wire_sources(), ("rexplan.remote.agent", agent))
    sha = hashlib.sha256(
        "\0".join(f"{name}\0{text}" for name, text in sources).encode()
    ).hexdigest()
    return _TEMPLATE.format(sources=sources, sha=sha, run=_RUN).encode("utf-8")


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


def agent_name() -> str:
    """The agent's file name in REX_HOME: ``agent-<first 16 hex of bundle_sha()>.py``."""
    return f"agent-{bundle_sha()[:16]}.py"


#: ``sh -c CHECK_SH sh PROGRAM TRIPLE SPEC ARGV...``: LAUNCH_STUB's ``check`` in the shell, from
#: the line ``PID START SPEC TRIPLE`` the agent keeps beside PROGRAM's record (run/PROGRAM.id):
#: the same triple and spec digest with that pid alive and started at START (/proc/PID/stat
#: field 22, after the last ") ": a command name may hold one) prints the stub's ``unchanged``
#: report; anything else (no line, another spec, a dead or reused pid, a read error) runs
#: ARGV, the stub, which checks again and launches. An unchanged re-apply then starts no
#: interpreter on the host.
CHECK_SH = """u() {
  f="${REX_HOME:-$HOME/.rex}/run/$1.id"
  [ -f "$f" ] || return 1
  IFS=' ' read -r p s d t x < "$f" || return 1
  [ -z "$x" ] && [ "$t" = "$2" ] && [ "$d" = "$3" ] || return 1
  case $p in ''|*[!0-9]*) return 1;; esac
  [ "$p" -gt 1 ] || return 1
  read -r l < "/proc/$p/stat" || return 1
  l=${l##*") "}
  set -f
  set -- $l
  [ "$#" -ge 20 ] && [ "$1" != Z ] || return 1
  shift 19
  [ "$1" = "$s" ] || return 1
  printf '{"ok": true, "unchanged": true, "pid": %s}\\n' "$p"
}
u "$1" "$2" "$3" 2>/dev/null && exit 0
shift 3
exec "$@"
"""


def launch_argv(
    python: str = "python3",
    *args: str,
    check: tuple[str, str, str] | None = None,
    wait: float | None = None,
) -> list[str]:
    """argv that runs the uploaded agent (with ``args``) through LAUNCH_STUB; ``check`` =
    (triple, program, spec digest) first asks whether that program already runs unchanged;
    ``wait``: a launch, announced by LAUNCH_MARKER, whose line must come within ``wait`` s."""
    mode = ["check", *check] if check is not None else ["-"]
    if wait is not None:
        args = ("--wait", f"{wait:g}", *args)
    argv = [python, "-I", "-S", "-c", LAUNCH_STUB, bundle_sha()[:16], *mode, *args]
    if check is None:
        return argv
    triple, program, spec = check
    return ["sh", "-c", CHECK_SH, "sh", program, triple, spec, *argv]
