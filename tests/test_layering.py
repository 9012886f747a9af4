"""Layering: pure modules import no I/O library; rich, fabric and paramiko stay in their modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rexplan"
PURE = (
    "core/plan.py",
    "core/model.py",
    "core/manifest.py",
    "core/yamlpos.py",
    "core/schema.py",
    "core/checks.py",
    "core/settings.py",
    "core/values.py",
    "core/text.py",
    *sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "wire").glob("*.py")),
)
IO_LIBRARIES = {
    "fabric",
    "paramiko",
    "invoke",
    "rich",
    "socket",
    "subprocess",
    "selectors",
    "asyncio",
    "threading",
}
SSH_LIBRARIES = {"fabric", "paramiko", "invoke"}
AGENT = PACKAGE / "remote" / "agent"


def top_level_imports(path: Path) -> set[str]:
    """First components of every module a file imports, wherever the import statement is.

    Relative imports are reported as "rexplan", so they count as package imports.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("rexplan" if node.level else (node.module or "").split(".")[0])
    return names


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_scanner_sees_every_import_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os.path, json as j\n"
        "from rich.console import Console\n"
        "from . import model\n"
        "def f():\n"
        "    import socket\n"
        "if True:\n"
        "    from subprocess import run\n"
    )
    assert top_level_imports(sample) == {"os", "json", "rich", "rexplan", "socket", "subprocess"}


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_io_library(name: str) -> None:
    path = PACKAGE / name
    if not path.exists():
        pytest.skip(f"{name} does not exist yet")
    assert top_level_imports(path) & IO_LIBRARIES == set()


def test_only_ui_imports_rich() -> None:
    importers = {rel(p) for p in modules() if "rich" in top_level_imports(p)}
    assert importers <= {"cli/ui.py"}


def test_only_transport_imports_ssh_libraries() -> None:
    importers = {rel(p) for p in modules() if top_level_imports(p) & SSH_LIBRARIES}
    assert importers <= {
        "transport/ssh.py",
        "transport/forward.py",
        "transport/handshake.py",
        "transport/pinning.py",
        "transport/streams.py",
        "transport/route.py",
        "transport/bastion.py",
        "transport/scan.py",
        "transport/dialing.py",
    }


def package_imports(path: Path) -> set[str]:
    """The rexplan modules a file imports (``from rexplan.wire import codes`` included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "rexplan")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                names.add(f"<relative import of {module or '.'}>")
            elif module == "rexplan" or (
                module.startswith("rexplan.") and PACKAGE.joinpath(*module.split(".")[1:]).is_dir()
            ):
                names.update(f"{module}.{a.name}" for a in node.names)
            elif module.startswith("rexplan."):
                names.add(module)
    return names


def test_package_scanner(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import rexplan.core.model\nfrom rexplan import protocol, errors\n"
        "from rexplan.core.plan import compile\nimport os\n"
    )
    assert package_imports(sample) == {
        "rexplan.core.model",
        "rexplan.protocol",
        "rexplan.errors",
        "rexplan.core.plan",
    }


#: the builtin SHA-256 module is _sha2 from Python 3.12 on, _sha256 before; wire/crypto.py
#: tries both (so one of them is never in this interpreter's sys.stdlib_module_names)
BUILTIN_SHA256 = {"_sha2", "_sha256"}
#: the modules shipped to hosts with the agent
WIRE = sorted((PACKAGE / "wire").glob("*.py"))
WIRE_MODULES = {f"rexplan.wire.{p.stem}" for p in WIRE if p.stem != "__init__"}


@pytest.mark.parametrize("path", WIRE, ids=rel)
def test_wire_imports_only_the_standard_library_and_wire(path: Path) -> None:
    stdlib = set(sys.stdlib_module_names) | BUILTIN_SHA256
    outside = top_level_imports(path) - stdlib - {"rexplan"}
    assert outside == set()
    assert package_imports(path) <= WIRE_MODULES


AGENT_MODULES = sorted(AGENT.rglob("*.py"))


def test_the_agent_is_a_package_of_modules() -> None:
    assert len(AGENT_MODULES) > 1


RELAY_MODULES = sorted((PACKAGE / "remote" / "relay").rglob("*.py"))


@pytest.mark.parametrize("path", RELAY_MODULES, ids=rel)
def test_relay_imports_only_the_standard_library(path: Path) -> None:
    # the relay ships to relay hosts as one script of its own modules
    outside = top_level_imports(path) - set(sys.stdlib_module_names) - {"rexplan"}
    assert outside == set(), f"{rel(path)} imports {sorted(outside)} outside the stdlib"
    assert all(name.startswith("rexplan.remote.relay.") for name in package_imports(path))


@pytest.mark.parametrize("path", AGENT_MODULES, ids=rel)
def test_agent_imports_only_the_standard_library_and_wire(path: Path) -> None:
    # the agent ships to hosts as one script bundled with rexplan/wire, and nothing else
    outside = top_level_imports(path) - set(sys.stdlib_module_names) - {"rexplan"}
    assert outside == set(), f"{rel(path)} imports {sorted(outside)} outside the stdlib"
    allowed = ("rexplan.wire.", "rexplan.remote.agent.")
    assert all(name.startswith(allowed) for name in package_imports(path)), rel(path)


def test_nothing_outside_remote_imports_it() -> None:
    # remote/ is shipped to hosts; the launcher reads its files as package resources
    # (rexplan.transport.shipping) and never imports it
    importers = {
        rel(p)
        for p in modules()
        if not rel(p).startswith("remote/")
        and any(name.startswith("rexplan.remote") for name in package_imports(p))
    }
    assert importers == set()
