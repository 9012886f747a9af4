"""The commands that never connect import no SSH library, and only the face imports rich.

Each command runs in a fresh interpreter (imports are per process), as the `rex` entry point
runs it; what it imported is read from sys.modules when it is done. The times these imports
cost are measured by bench/cli_start.py, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = str(ROOT / "playbooks" / "webstack.yaml")
SSH = {"fabric", "paramiko", "invoke", "cryptography", "nacl"}

PROBE = """
import json, sys
from rexplan.cli.rex import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
loaded = sorted({name.split(".")[0] for name in sys.modules})
rexplan = sorted(name for name in sys.modules if name.startswith("rexplan."))
sys.stderr.write("\\n" + json.dumps({"code": code, "top": loaded, "rexplan": rexplan}) + "\\n")
"""


def imported(*argv: str, cwd: Path = ROOT) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
        timeout=60,
    )
    report: dict[str, object] = json.loads(proc.stderr.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize(
    "argv",
    [
        ["--version"],
        ["--help"],
        ["apply", "--help"],
        ["status", "--help"],
    ],
    ids=" ".join,
)
def test_parsing_and_help_import_neither_ssh_nor_rich(argv: list[str]) -> None:
    report = imported(*argv)
    assert report["code"] == 0
    top = set(report["top"])  # type: ignore[arg-type]
    assert not top & (SSH | {"rich", "yaml", "jsonschema"}), top & (SSH | {"rich", "yaml"})


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", PLAYBOOK],
        ["plan", PLAYBOOK],
        ["plan", "--json", PLAYBOOK],
        ["plan", "--dot", PLAYBOOK],
        ["blame", "--list"],
        ["completion", "bash"],
        ["completion", "--names", "hosts", PLAYBOOK],
        ["import", "ansible", str(ROOT / "tests" / "data" / "inventory.ini")],
    ],
    ids=" ".join,
)
def test_commands_that_never_connect_import_no_ssh_library(argv: list[str], tmp_path: Path) -> None:
    if argv[0] == "import" and not Path(argv[2]).exists():
        inventory = tmp_path / "inventory.ini"
        inventory.write_text("[web]\nweb1 ansible_host=127.0.0.1\n")
        argv = [*argv[:2], str(inventory)]
    report = imported(*argv, cwd=tmp_path)
    assert report["code"] == 0, report
    top = set(report["top"])  # type: ignore[arg-type]
    assert not top & SSH, top & SSH
    mods = report["rexplan"]
    assert isinstance(mods, list)
    assert not [m for m in mods if m.startswith(("rexplan.transport", "rexplan.engine.executor"))]
