"""The first stages and the bundle as shipped: the strings the launcher sends are the code of
the files ruff and mypy check (rexplan/remote/stages/), and the digests it names are theirs."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from rexplan.transport import shipping

STAGES = Path(shipping.__file__).parents[1] / "remote" / "stages"


def _code(text: str) -> list[str]:
    """A script's statements as AST dumps, without its module docstring."""
    body = ast.parse(text).body
    if body and isinstance(body[0], ast.Expr):
        body = body[1:]
    return [ast.dump(node) for node in body]


def test_the_bundle_is_what_its_digest_names() -> None:
    body = shipping.bundle()
    assert shipping.bundle_sha() == hashlib.sha256(body).hexdigest()
    assert shipping.agent_name() == f"agent-{shipping.bundle_sha()[:16]}.py"
    argv = shipping.bootstrap_argv("python3")
    assert shipping.bundle_sha() in argv and shipping.BOOTSTRAP in argv
    # what the bootstrap reads from stdin: the bundle, after its length
    head, _, rest = shipping.bootstrap_input(b"LINE\n").partition(b"\n")
    assert int(head) == len(body) and rest.startswith(body)


@pytest.mark.parametrize(
    ("stage", "sent"),
    [("bootstrap.py", shipping.BOOTSTRAP), ("launch.py", shipping.LAUNCH_STUB)],
)
def test_a_python_stage_sent_is_its_files_code(stage: str, sent: str) -> None:
    code = _code((STAGES / stage).read_text())
    shipped = [ast.dump(node) for node in ast.parse(sent).body]
    if stage == "bootstrap.py":
        assert shipped == code
    else:  # the stub is launch.py, then modules.py, then the lines that run the entry
        modules = _code((STAGES / "modules.py").read_text())
        assert shipped[: len(code) + len(modules)] == code + modules
        assert len(shipped) == len(code) + len(modules) + 2


def test_the_shell_stage_sent_is_its_file() -> None:
    assert (STAGES / "check.sh").read_text() == shipping.CHECK_SH
