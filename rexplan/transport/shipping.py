"""What the launcher sends to run the agent: its bundle and the first stages that start it.

The agent runs on a host as ONE script, bundle(): the code of every module of rexplan/wire/ and
rexplan/remote/ (read here as package resources, never imported), served under their real names
by an in-memory finder ahead of any rexplan installed there, then rexplan.remote.agent.front's
main(). The relay ships the same way (relay_source()), started by RELAY_BOOTSTRAP.
Two ways to run it:

- a file: upload bundle() once as ``~/.rex/agent-<bundle_sha()>.py``, then run it through
  launch_argv() (LAUNCH_STUB) with the launch line (wire.launch.make_launch) on stdin; its first
  run keeps the compiled modules next to it (``FILE.<cache_tag>.code``) for the next ones;
- no file: run bootstrap_argv() and write bootstrap_input(launch_line) to its stdin; the small
  ``-c`` BOOTSTRAP reads the bundle, checks its sha256 against argv, and execs it.

The stages are real scripts in rexplan/remote/stages/ (so ruff and mypy see them), sent without
their docstrings, comments and blank lines.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.abc import Traversable

#: LAUNCH_STUB's exit code (and report) when the agent file is not in REX_HOME: upload, retry
EXIT_NO_AGENT = 20

#: exit code of a launch that started nothing because its launch line did not come: not within
#: the agent's ``--wait`` seconds (the agent's EXIT_NO_LAUNCH), or the launcher was gone when
#: the stub announced itself with LAUNCH_MARKER
EXIT_NO_LAUNCH = 21

#: the line LAUNCH_STUB prints before a launch reads its launch line: the launcher writes that
#: line only once this arrived within the step's start deadline, so a remote shell that starts
#: late (a slow login script) never receives it and starts nothing
LAUNCH_MARKER = "rex-launch-ready"

#: the line LAUNCH_STUB prints, when offered the agent (``offer``), if its file is missing: the
#: launcher then sends agent_supply() and the launch line, and the first launch is one exec
AGENT_WANTED = "rex-agent-wanted"

#: the module whose main() a bundle runs, and the relay's (main(SOURCE): its own bundle)
ENTRY = "rexplan.remote.agent.front"
RELAY_ENTRY = "rexplan.remote.relay.node"

_PACKAGE = resources.files("rexplan")
_STAGES = _PACKAGE / "remote" / "stages"

#: a module's name, the file it came from (rexplan/...), its source
Sources = tuple[tuple[str, str, str], ...]


def _script(name: str) -> str:
    """A stage as sent: its code without the module docstring, comment lines and blank lines."""
    text = (_STAGES / name).read_text(encoding="utf-8")
    first = ast.parse(text).body[0]
    start = (first.end_lineno or 0) if isinstance(first, ast.Expr) else 0
    lines = text.splitlines()[start:]
    return "".join(
        f"{line}\n" for line in lines if line.strip() and not line.lstrip().startswith("#")
    )


def _run(entry: str, *args: str) -> str:
    """The line that runs ``entry``'s main(*args) once the modules stage served the modules."""
    return f"sys.exit(__import__({entry!r}, fromlist=['main']).main({', '.join(args)}))\n"


#: ``python3 -I -S -c BOOTSTRAP <sha> [ARGS]`` (stages/bootstrap.py)
BOOTSTRAP = _script("bootstrap.py")

#: ``python3 -I -S -c LAUNCH_STUB <sha16> (check TRIPLE NAME SPEC OWNER | -) [ARGS]``
#: (stages/launch.py, then stages/modules.py to run the cached code ``c``)
LAUNCH_STUB = _script("launch.py") + _script("modules.py") + "_rex_modules(c)\n" + _run(ENTRY)

#: ``sh -c CHECK_SH sh NAME TRIPLE SPEC OWNER ARGV...``: LAUNCH_STUB's ``check`` in the shell,
#: from the line ``PID START SPEC TRIPLE [OWNER]`` the agent keeps beside record NAME
#: (run/NAME.id; else the one the layout before named by the triple's program): the same
#: triple and spec digest, no other owner than the manifest OWNER, with that pid alive and
#: started at START (/proc/PID/stat
#: field 22, after the last ") ": a command name may hold one) prints the stub's ``unchanged``
#: report; anything else (no line, another spec, a dead or reused pid, a read error) runs
#: ARGV, the stub, which checks again and launches. An unchanged re-apply then starts no
#: interpreter on the host.
CHECK_SH = (_STAGES / "check.sh").read_text(encoding="utf-8")

#: the relay's own bootstrap (a constant of the relay, which needs it on its host to start the
#: relays below it): ``python3 -I -S -c RELAY_BOOTSTRAP <sha256> <name>``
RELAY_BOOTSTRAP = next(
    ast.literal_eval(node.value)
    for node in ast.parse((_PACKAGE / "remote/relay/client.py").read_text(encoding="utf-8")).body
    if isinstance(node, ast.Assign)
    and [getattr(target, "id", None) for target in node.targets] == ["BOOTSTRAP"]
)


def sources(directory: str, skip: tuple[str, ...] = ()) -> Sources:
    """Every module under rexplan/``directory``, but the subdirectories named in ``skip``."""
    found: list[tuple[str, str, str]] = []

    def walk(folder: Traversable, path: str) -> None:
        for item in sorted(folder.iterdir(), key=lambda item: item.name):
            if item.is_dir() and item.name not in (*skip, "__pycache__"):
                walk(item, f"{path}/{item.name}")
            elif item.name.endswith(".py"):
                name = path.replace("/", ".") + (
                    "" if item.name == "__init__.py" else f".{item.name[:-3]}"
                )
                found.append((name, f"{path}/{item.name}", item.read_text(encoding="utf-8")))

    walk(_PACKAGE.joinpath(*directory.split("/")), f"rexplan/{directory}")
    return tuple(found)


def _assemble(title: str, modules: Sources, run: str) -> bytes:
    """One self-contained Python >= 3.8 script: the code of ``modules`` (compiled once per
    uploaded file, see stages/cache.py), served by stages/modules.py, then ``run``."""
    sha = hashlib.sha256("\0".join("\0".join(source) for source in modules).encode()).hexdigest()
    codes = f"_rex_modules(_rex_codes({sha!r}, {modules!r}))\n"
    head = f"# {title}; stdlib only, Python >= 3.8\n"
    return (head + _script("cache.py") + _script("modules.py") + codes + run).encode("utf-8")


@functools.lru_cache(maxsize=1)
def bundle() -> bytes:
    """The agent as one script: every module of rexplan/wire and rexplan/remote (but the
    relay and the stages)."""
    modules = sources("wire") + sources("remote", skip=("relay", "stages"))
    return _assemble("rex agent bundle", modules, _run(ENTRY))


def relay_bundle(modules: Sources) -> bytes:
    """The relay as one script run by RELAY_BOOTSTRAP: ``modules``, then its main(SOURCE)."""
    return _assemble("rex relay", modules, _run(RELAY_ENTRY, "SOURCE"))


@functools.lru_cache(maxsize=1)
def relay_source() -> bytes:
    """The relay as shipped to relay hosts: rexplan/remote/relay and rexplan/remote's package."""
    return relay_bundle(sources("remote", skip=("agent", "stages")))


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


def agent_supply() -> bytes:
    """What a launch offered the agent (AGENT_WANTED) sends before its launch line: the
    bundle, length-prefixed."""
    return bootstrap_input(b"")


def agent_name() -> str:
    """The agent's file name in REX_HOME: ``agent-<first 16 hex of bundle_sha()>.py``."""
    return f"agent-{bundle_sha()[:16]}.py"


def launch_argv(
    python: str = "python3",
    *args: str,
    check: tuple[str, str, str, str] | None = None,
    wait: float | None = None,
    offer: bool = False,
) -> list[str]:
    """argv that runs the uploaded agent (with ``args``) through LAUNCH_STUB; ``check`` =
    (triple, record name, spec digest, owning manifest) first asks whether that program
    already runs unchanged;
    ``wait``: a launch, announced by LAUNCH_MARKER, whose line must come within ``wait`` s;
    ``offer``: a missing agent file is asked for (AGENT_WANTED) instead of exiting 20."""
    mode = ["check", *check] if check is not None else ["-"]
    if wait is not None:
        args = ("--wait", f"{wait:g}", *args)
    if offer:
        args = ("--offer", bundle_sha(), *args)
    argv = [python, "-I", "-S", "-c", LAUNCH_STUB, bundle_sha()[:16], *mode, *args]
    if check is None:
        return argv
    triple, name, spec, owner = check
    return ["sh", "-c", CHECK_SH, "sh", name, triple, spec, owner, *argv]
