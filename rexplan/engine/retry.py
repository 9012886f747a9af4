"""Retry files: the steps ``rex apply`` left failed, unreachable or skipped, for ``--retry``
(a declined step is not one: its host said "not here", and that is fine).

After every apply, ``<state dir>/retry/<manifest stem>.json`` (the state dir is runs.state_dir:
$REX_STATE_DIR, else ./.rex) holds the steps of the manifest that did not come up: those of the
run that did not, plus those an earlier run left that this one did not try (a ``--limit`` or
``--retry`` run only settles its own steps). When none are left the file is removed.
``rex apply --retry`` narrows the plan to the file's steps; their requirements outside it are
trusted to run, as with ``--limit``.

    {"format": 1, "manifest": "/abs/path/web.yaml", "manifest_digest": "<sha256>",
     "run": "<run id>", "steps": ["app@web2", "lb@web9"]}
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from rexplan.core.model import Manifest, Plan
from rexplan.engine import events as ev
from rexplan.engine import runs
from rexplan.errors import UsageError

FORMAT = 1
#: final states whose steps a retry launches again
RETRY_STATES = frozenset({ev.FAILED, ev.UNREACHABLE, ev.SKIPPED})


def path_for(manifest_path: str) -> Path:
    """The retry file of a manifest."""
    return runs.state_dir() / "retry" / f"{Path(manifest_path).stem}.json"


def _read(manifest_path: str) -> dict[str, object] | None:
    try:
        data = json.loads(path_for(manifest_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _steps(data: dict[str, object] | None, manifest_path: str) -> list[str]:
    """The step ids of a retry file, if it belongs to this manifest."""
    if data is None or data.get("manifest") != os.path.abspath(manifest_path):
        return []
    steps = data.get("steps")
    return [s for s in steps if isinstance(s, str)] if isinstance(steps, list) else []


def update(
    manifest: Manifest, plan: Plan, run_id: str, unfinished: Iterable[str]
) -> tuple[Path, int]:
    """Record the steps left to retry after a run of ``plan``; (file, how many are left)."""
    tried = {s.id for s in plan.steps}
    earlier = [s for s in _steps(_read(manifest.path), manifest.path) if s not in tried]
    left = sorted(set(earlier) | set(unfinished))
    path = path_for(manifest.path)
    if not left:
        path.unlink(missing_ok=True)
        return path, 0
    doc = {
        "format": FORMAT,
        "manifest": os.path.abspath(manifest.path),
        "manifest_digest": manifest.digest,
        "run": run_id,
        "steps": left,
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path, len(left)


def narrow(manifest: Manifest, plan: Plan) -> Plan:
    """``plan`` reduced to the steps of the manifest's retry file; UsageError if none."""
    path = path_for(manifest.path)
    data = _read(manifest.path)
    if data is None:
        raise UsageError(
            f"no retry file {path}",
            hint="the last apply of this manifest left nothing to retry",
        )
    wanted = set(_steps(data, manifest.path))
    if not wanted:
        raise UsageError(
            f"{path} is the retry file of {data.get('manifest')}, not of {manifest.path}",
            hint="run a plain rex apply of this manifest first",
        )
    waves = tuple(w for w in (tuple(s for s in wave if s.id in wanted) for wave in plan.waves) if w)
    if not waves:
        raise UsageError(
            f"none of the {len(wanted)} step(s) in {path} are in the plan",
            hint="the manifest (or --limit) no longer has them; run a plain rex apply",
        )
    return Plan(manifest_digest=plan.manifest_digest, waves=waves, limit=plan.limit)
