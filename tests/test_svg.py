"""SVG pictures: `rex blame --svg` (a run's time line) and `rex plan --svg` (waves and
requires arrows), parsed with xml.etree; rendered to PNG when rsvg-convert is installed."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from rexplan.cli import blame, svg
from rexplan.cli.rex import main
from rexplan.engine import events as ev
from rexplan.engine import runs

RUN = "20250101T120000-0badcafe"
NS = {"s": "http://www.w3.org/2000/svg"}
HOSTILE = 'x<y>&"\x1b[31m\u202e'


def step(
    name: str, wave: int, times: list[float], final: str = ev.READY, **kw: str
) -> list[ev.Event]:
    program, host = name.split("@", 1)
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
            state=state,
            reason=kw.get("reason") if state == final else None,
            phase=kw.get("phase") if state == final else None,
        )
        for t, state in zip(times, states, strict=True)
    ]


def three_waves(app_host: str = "web2") -> list[ev.Event]:
    """Wave 0: db@db1. Wave 1: app on web1 (slow, the chain) and ``app_host`` (failed in
    callback). Wave 2: lb@lb1 skipped."""
    return [
        ev.Event(kind=ev.RUN_STARTED, t=0.0, run=RUN, total=4),
        ev.Event(kind=ev.WAVE_STARTED, t=0.0, run=RUN, wave=0, total=1),
        *step("db@db1", 0, [0.01, 0.31, 1.01, 1.11]),
        ev.Event(kind=ev.WAVE_STARTED, t=1.12, run=RUN, wave=1, total=2),
        *step("app@web1", 1, [1.13, 1.33, 3.33, 3.43]),
        *step(f"app@{app_host}", 1, [1.13, 1.23, 1.53, 2.53], ev.FAILED, reason="no_callback"),
        ev.Event(kind=ev.WAVE_STARTED, t=3.44, run=RUN, wave=2, total=1),
        *step("lb@lb1", 2, [3.44], ev.SKIPPED, reason="dependency_failed"),
        ev.Event(kind=ev.RUN_DONE, t=3.45, run=RUN, total=4),
    ]


def rows(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-step", ""): g for g in root.iter(f"{{{NS['s']}}}g") if "row" in cls(g)}


def cls(element: ET.Element) -> set[str]:
    return set((element.get("class") or "").split())


def test_run_picture_rows_bars_failures_and_chain() -> None:
    root = ET.fromstring(blame.run_svg(RUN, three_waves()))
    found = rows(root)
    assert list(found) == ["db@db1", "app@web1", "app@web2", "lb@lb1"]
    groups = ["".join(g.itertext()) for g in root.iter(f"{{{NS['s']}}}g") if "group" in cls(g)]
    assert groups == ["wave 0", "wave 1", "wave 2"]
    bars = [
        sorted(cls(r) - {"bar"})
        for r in found["db@db1"].iter(f"{{{NS['s']}}}rect")
        if "bar" in cls(r)
    ]
    assert bars == [["connect"], ["start"], ["callback"]]
    # the start bar of app@web1 (2 s) is ten times as wide as its connect bar (0.2 s)
    widths = {
        next(iter(cls(r) - {"bar"})): float(r.get("width", "0"))
        for r in found["app@web1"].iter(f"{{{NS['s']}}}rect")
        if "bar" in cls(r)
    }
    assert widths["start"] == pytest.approx(10 * widths["connect"], rel=0.02)
    assert "failed" in cls(found["app@web2"])
    marks = [t for t in found["app@web2"].iter(f"{{{NS['s']}}}text") if "mark" in cls(t)]
    assert len(marks) == 1
    assert not any("failed" in cls(r) for k, r in found.items() if k != "app@web2")
    assert {k for k, r in found.items() if "critical" in cls(r)} == {"db@db1", "app@web1"}
    assert not [r for r in found["lb@lb1"].iter(f"{{{NS['s']}}}rect") if "bar" in cls(r)]


def test_hostile_names_are_escaped() -> None:
    text = blame.run_svg(RUN, three_waves(app_host=HOSTILE))
    root = ET.fromstring(text)  # well-formed: no raw <, & or control character got through
    assert "\x1b" not in text and "\u202e" not in text
    assert "<y>" not in text
    labels = ["".join(t.itertext()) for t in root.iter(f"{{{NS['s']}}}text") if "label" in cls(t)]
    assert any(label.startswith('app@x<y>&"') for label in labels)  # shown, as text


def test_plan_picture_waves_and_arrows() -> None:
    nodes = [svg.Node("db", 0, "1 step"), svg.Node("app", 1, "2 steps"), svg.Node(HOSTILE, 1)]
    root = ET.fromstring(svg.plan_graph("plan", nodes, [("db", "app"), ("db", HOSTILE)]))
    names = [g.get("data-program") for g in root.iter(f"{{{NS['s']}}}g") if "node" in cls(g)]
    assert names == ["db", "app", 'x<y>&"\\x1b[31m\\u202e']
    edges = [(p.get("data-from"), p.get("data-to")) for p in root.iter(f"{{{NS['s']}}}path")]
    assert edges[1:] == [("db", "app"), ("db", 'x<y>&"\\x1b[31m\\u202e')]


def test_cli_plan_and_blame_write_svg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "rex: 1\n"
        "defaults: {user: me, transport: local}\n"
        "hosts: {localhost: {transport: local}}\n"
        "users: {me: {}}\n"
        "programs:\n"
        "  db: {on: [localhost], run: [sleep, '1']}\n"
        "  app: {on: [localhost], run: [sleep, '1'], requires: [db]}\n"
        "authorize: ['*.*.*']\n"
    )
    out = tmp_path / "plan.svg"
    code = main(["plan", str(manifest), "--svg", str(out)])
    assert code == 0, capsys.readouterr()
    root = ET.parse(out).getroot()
    edges = [(p.get("data-from"), p.get("data-to")) for p in root.iter(f"{{{NS['s']}}}path")]
    assert ("db", "app") in edges

    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / "state"))
    sink, close = runs.open_run_log(RUN)
    for e in three_waves():
        sink(e)
    close()
    picture = tmp_path / "run.svg"
    assert main(["blame", "--svg", str(picture)]) == 0
    assert len(rows(ET.parse(picture).getroot())) == 4
    assert main(["blame", "--svg", str(picture), "--json"]) == 5
    assert main(["blame", "--svg", str(tmp_path / "no" / "such" / "x.svg")]) == 5
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="rsvg-convert not installed")
def test_renders_to_png(tmp_path: Path) -> None:
    source = tmp_path / "run.svg"
    source.write_text(blame.run_svg(RUN, three_waves()), encoding="utf-8")
    png = tmp_path / "run.png"
    subprocess.run(["rsvg-convert", "-o", str(png), str(source)], check=True, timeout=60)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
