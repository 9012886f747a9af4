"""Run storage (.rex/runs) and `rex blame`: analysis of stored events, text, JSON, errors."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from rexplan.cli import blame
from rexplan.cli.rex import main
from rexplan.engine import events as ev
from rexplan.engine import runs
from rexplan.errors import InsecurePathError, UsageError

RUN = "20250101T120000-0badcafe"


def step(
    name: str,
    wave: int,
    times: list[float],
    final: str = ev.READY,
    reason: str | None = None,
    phase: str | None = None,
) -> list[ev.Event]:
    """A step's state events: connecting, starting, awaiting-callback at ``times[:-1]``
    (as many as given), then ``final`` at ``times[-1]``."""
    program, host = name.split("@")
    states = [*(ev.CONNECTING, ev.STARTING, ev.AWAITING)[: len(times) - 1], final]
    return [
        ev.Event(
            kind=ev.STEP,
            t=t,
            run=RUN,
            wave=wave,
            step=name,
            host=host,
            program=program,
            triple=f"{host}.u.{program}",
            state=state,
            reason=reason if state == final else None,
            phase=phase if state == final else None,
        )
        for t, state in zip(times, states, strict=True)
    ]


def wave(number: int, t: float, total: int) -> ev.Event:
    return ev.Event(kind=ev.WAVE_STARTED, t=t, run=RUN, wave=number, total=total)


def sample() -> list[ev.Event]:
    """Wave 0: db@db1. Wave 1: app on web1 (slow start) and web2 (failed in callback).
    Wave 2: lb@lb1 skipped because app failed."""
    return [
        ev.Event(kind=ev.RUN_STARTED, t=0.0, run=RUN, total=4),
        wave(0, 0.0, 1),
        *step("db@db1", 0, [0.01, 0.31, 1.01, 1.11]),
        wave(1, 1.12, 2),
        *step("app@web1", 1, [1.13, 1.33, 3.33, 3.43]),
        *step("app@web2", 1, [1.13, 1.23, 1.53, 2.53], ev.FAILED, "no_callback", "callback"),
        wave(2, 3.44, 1),
        *step("lb@lb1", 2, [3.44], ev.SKIPPED, "dependency_failed"),
        ev.Event(kind=ev.RUN_DONE, t=3.45, run=RUN, total=4),
    ]


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def store(run_id: str, events: list[ev.Event]) -> None:
    sink, close = runs.open_run_log(run_id)
    for e in events:
        sink(e)
    close()


# --- analysis ---------------------------------------------------------------------------------


def test_step_timings_split_into_phases() -> None:
    timings = {t.step: t for t in blame.step_timings(sample())}
    app = timings["app@web1"]
    assert (app.start, app.end, app.state) == (1.13, 3.43, ev.READY)
    assert app.phases == pytest.approx({"connect": 0.2, "start": 2.0, "callback": 0.1})
    failed = timings["app@web2"]
    assert (failed.state, failed.reason, failed.phase) == (ev.FAILED, "no_callback", "callback")
    assert failed.phases["callback"] == pytest.approx(1.0)
    assert not timings["lb@lb1"].launched


def test_slowest_steps_hosts_and_phases() -> None:
    timings = blame.step_timings(sample())
    assert [t.step for t in blame.slowest_steps(timings)] == ["app@web1", "app@web2", "db@db1"]
    assert [h.host for h in blame.host_timings(timings)] == ["web1", "web2", "db1"]
    phases = {p: t.step for p, t in blame.slowest_phases(timings).items()}
    assert phases == {"connect": "db@db1", "start": "app@web1", "callback": "app@web2"}


def test_critical_chain_is_the_last_step_of_each_wave() -> None:
    events = sample()
    chain = blame.critical_chain(events, blame.step_timings(events))
    assert [(c.wave, c.step.step if c.step else None) for c in chain] == [
        (0, "db@db1"),
        (1, "app@web1"),
        (2, None),
    ]
    assert chain[1].began == 1.12


def test_analyze_is_stable_json() -> None:
    report = blame.analyze(RUN, sample(), top=2)
    assert list(report) == [
        "format",
        "run",
        "complete",
        "seconds",
        "counts",
        "waves",
        "steps",
        "hosts",
        "phases",
        "critical_chain",
    ]
    assert report["format"] == 1 and report["complete"] and report["seconds"] == 3.45
    assert report["counts"] == {"failed": 1, "ready": 2, "skipped": 1}
    assert [s["step"] for s in report["steps"]] == ["app@web1", "app@web2"]
    assert report["steps"][0] == {
        "step": "app@web1",
        "host": "web1",
        "program": "app",
        "wave": 1,
        "state": "ready",
        "reason": None,
        "phase": None,
        "start": 1.13,
        "end": 3.43,
        "seconds": 2.3,
        "phases": {"connect": 0.2, "start": 2.0, "callback": 0.1},
    }
    assert report["critical_chain"][2] == {"wave": 2, "wave_start": 3.44, "step": None}
    assert len(blame.analyze(RUN, sample(), top=0)["steps"]) == 3


def test_format_blame_reads_like_systemd_analyze() -> None:
    text = blame.format_blame(blame.analyze(RUN, sample()))
    lines = text.splitlines()
    assert lines[0] == f"run {RUN}: 4 step(s) in 3 wave(s), 3.450s (1 failed, 2 ready, 1 skipped)"
    assert "  2.300s  app@web1  (connect 0.2s, start 2.0s, callback 0.1s)" in lines
    assert (
        "  1.400s  app@web2  (connect 0.1s, start 0.3s, callback 1.0s)  failed: no_callback "
        "in callback"
    ) in lines
    chain = lines[-4:]
    assert lines[-5].startswith("critical chain")
    assert chain == [
        "  wave 0  @0.010s  +1.100s  db@db1",
        "  wave 1  @1.130s  +2.300s  app@web1",
        "  wave 2  @3.440s           -",
        "  done    @3.450s",
    ]


def test_an_unfinished_run_is_reported_as_such() -> None:
    events = sample()[:-3]
    report = blame.analyze(RUN, events)
    assert not report["complete"]
    assert "incomplete" in blame.format_blame(report).splitlines()[0]


def test_manifest_text_never_reaches_the_terminal_raw() -> None:
    events = step("app@h1", 0, [0.0, 1.0], ev.FAILED, "exited\x1b[2J", "start")
    text = blame.format_blame(blame.analyze(RUN, events))
    assert "\x1b" not in text and "\\x1b[2J" in text


# --- storage ----------------------------------------------------------------------------------


def test_run_log_permissions_and_round_trip(state: Path) -> None:
    store(RUN, sample())
    path = state / "runs" / f"{RUN}.jsonl"
    assert stat.S_IMODE(os.stat(state / "runs").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert runs.load_run(None) == (RUN, sample())


def test_default_store_is_dot_rex_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REX_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    store(RUN, sample())
    assert (tmp_path / ".rex" / "runs" / f"{RUN}.jsonl").is_file()


def test_only_the_newest_runs_are_kept(state: Path) -> None:
    ids = [f"2025010{d}T0000{s:02d}-{s:08x}" for d in (1, 2) for s in range(12)]
    for run_id in ids:
        store(run_id, [])
    assert runs.list_runs() == ids[-runs.KEEP :]
    assert runs.prune(keep=3) == ids[-runs.KEEP : -3]
    assert runs.list_runs() == ids[-3:]


def test_resolve_by_prefix(state: Path) -> None:
    for run_id in ("20250101T000000-aaaa0000", "20250101T000000-aaab0000", "20250102T0-c"):
        store(run_id, [])
    assert runs.resolve(None) == "20250102T0-c"
    assert runs.resolve("20250102") == "20250102T0-c"
    assert runs.resolve("20250101T000000-aaab") == "20250101T000000-aaab0000"
    with pytest.raises(UsageError, match="ambiguous"):
        runs.resolve("20250101T000000-aaa")
    with pytest.raises(UsageError, match="no stored run 'nope'"):
        runs.resolve("nope")


def test_a_truncated_line_is_skipped(state: Path) -> None:
    store(RUN, sample())
    path = state / "runs" / f"{RUN}.jsonl"
    path.write_text(path.read_text() + '{"kind": "step", "t": 3.')
    assert runs.load_run(RUN)[1] == sample()


def test_unwritable_store_warns_and_the_run_goes_on(state: Path) -> None:
    state.write_text("a file where the directory should be")
    warnings: list[str] = []
    sink, close = runs.open_run_log(RUN, warn=warnings.append)
    sink(sample()[0])
    close()
    assert len(warnings) == 1 and "run events not stored" in warnings[0]


class FullDisk(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_costs_one_warning_not_the_run() -> None:
    warnings: list[str] = []
    log = runs._RunLog(FullDisk(), warnings.append)
    for e in sample():
        log(e)
    log.close()
    assert warnings == ["run events no longer stored: No space left on device"]


def test_run_ids_cannot_escape_the_store(state: Path) -> None:
    with pytest.raises(ValueError):
        runs.open_run_log("../escape")


# --- rex blame --------------------------------------------------------------------------------


def test_blame_cli_text_json_top_and_list(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store("20241231T000000-00000000", sample()[:3])
    store(RUN, sample())
    assert main(["blame"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {RUN}:")
    assert main(["blame", "--json", "--top", "1", RUN[:10]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"] == RUN and [s["step"] for s in report["steps"]] == ["app@web1"]
    assert main(["blame", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["20241231T000000-00000000", RUN]
    assert main(["blame", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in listed["runs"]] == ["20241231T000000-00000000", RUN]


@pytest.mark.parametrize("argv", [["blame"], ["blame", "nope"]])
def test_blame_without_that_run_exits_5(
    state: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    if argv[1:]:
        store(RUN, sample())
    assert main(argv) == 5
    err = capsys.readouterr().err
    assert err.startswith("rex: error: no stored run") and "hint:" in err


def test_apply_stores_its_run_and_blame_reads_it(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real local apply (one short job-like service that fails at once: nothing stays up)."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "rex: 1\n"
        "defaults: {user: me, transport: local, timeouts: {start: 3, callback: 3}}\n"
        "hosts: {localhost: {transport: local}}\n"
        "users: {me: {}}\n"
        "programs:\n"
        "  oops: {on: [localhost], run: [sh, -c, 'exit 3'], ready: {alive: 2}}\n"
        "authorize: ['*.*.*']\n"
    )
    monkeypatch.setenv("REX_HOME", str(tmp_path / "home"))
    code = main(["apply", "-y", str(manifest), "--keys", str(tmp_path / "keys")])
    assert code == 2
    capsys.readouterr()
    (run_id,) = runs.list_runs()
    assert main(["blame", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"] == run_id and report["complete"]
    (only,) = report["steps"]
    assert (only["step"], only["state"], only["reason"]) == ("oops@localhost", "failed", "exited")
    assert set(only["phases"]) == {"connect", "start", "callback"}


# --- StrictModes for the run store ------------------------------------------------------------


def _symlinked_runs(state: Path) -> None:
    (state.parent / "elsewhere").mkdir(mode=0o700)
    state.mkdir(mode=0o700)
    (state / "runs").symlink_to(state.parent / "elsewhere")


@pytest.mark.parametrize(
    "spoil, problem",
    [
        (_symlinked_runs, "runs: is a symbolic link"),
        (lambda s: (s.mkdir(), s.chmod(0o777)), "state: mode 0777 lets group or other write"),
        (lambda s: (s.mkdir(), os.chown(s, 4242, -1)), "state: owned by uid 4242"),
        (lambda s: s.parent.chmod(0o777), "mode 0777 lets group or other write"),
    ],
    ids=["runs-symlink", "state-world-writable", "state-another-owner", "parent-world-writable"],
)
def test_an_unsafe_run_store_is_refused_and_never_written(
    state: Path, spoil: Callable[[Path], object], problem: str
) -> None:
    spoil(state)
    try:
        with pytest.raises(InsecurePathError, match=problem) as info:
            runs.open_run_log(RUN)
        fix = "chown" if "owned" in problem else "chmod go-w" if "mode" in problem else "its own"
        assert info.value.exit_code == 6 and fix in str(info.value)
        with pytest.raises(InsecurePathError, match=problem):
            runs.list_runs()
        assert not list(state.parent.glob("**/*.jsonl"))
    finally:
        state.parent.chmod(0o700)


def test_apply_with_a_symlinked_run_store_exits_6_before_anything_runs(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _symlinked_runs(state)
    ran = tmp_path / "ran"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "rex: 1\n"
        "defaults: {user: me, transport: local, timeouts: {start: 3, callback: 3}}\n"
        "hosts: {localhost: {transport: local}}\n"
        "users: {me: {}}\n"
        "programs:\n"
        f"  oops: {{on: [localhost], run: [sh, -c, 'touch {ran}; exit 3'], ready: {{alive: 2}}}}\n"
        "authorize: ['*.*.*']\n"
    )
    monkeypatch.setenv("REX_HOME", str(tmp_path / "home"))
    assert main(["apply", "-y", str(manifest), "--keys", str(tmp_path / "keys")]) == 6
    err = capsys.readouterr().err
    assert f"{state / 'runs'}: is a symbolic link" in err and "REX_STATE_DIR" in err
    assert not ran.exists() and not list((tmp_path / "elsewhere").iterdir())
    assert main(["blame"]) == 6
