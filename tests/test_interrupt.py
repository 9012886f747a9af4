"""Ctrl-C during `rex apply`: stop launching, kill what is starting, summarize, exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = """\
rex: 1
defaults: {user: me, transport: local, timeouts: {connect: 5, start: 5, callback: 30, ready: 30}}
hosts:
  localhost: {transport: local}
users:
  me: {}
programs:
  slow:
    on: [localhost]
    run: [sleep, "300"]
    env: {REXTEST_TAG: "%(tag)s"}
    ready: {file: "%(never)s", timeout: 30}
  after:
    on: [localhost]
    requires: [slow]
    run: [sleep, "300"]
    env: {REXTEST_TAG: "%(tag)s"}
authorize: ["localhost.me.*"]
"""


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries REXTEST_TAG=tag."""
    needle = f"REXTEST_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_sigint_kills_what_is_starting_and_exits_130(tmp_path: Path) -> None:
    tag = f"interrupt-{os.getpid()}-{time.monotonic_ns()}"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST % {"tag": tag, "never": tmp_path / "never"})
    events = tmp_path / "events.jsonl"
    env = dict(os.environ, REX_HOME=str(tmp_path / "home"), NO_COLOR="1")
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from rexplan.cli.rex import main; sys.exit(main())",
            "apply",
            "-y",
            str(manifest),
            "--keys",
            str(tmp_path / "keys"),
            "--events",
            str(events),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: bool(tagged_pids(tag)), 20), "program never started"
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    leftovers = tagged_pids(tag) if not wait_for(lambda: not tagged_pids(tag), 10) else []
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 130, err.decode()
    assert leftovers == [], f"processes left running: {leftovers}"
    assert b"Traceback" not in err
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    final = {e["step"]: e for e in lines if e["kind"] == "step"}
    assert final["after@localhost"]["state"] == "skipped"
    assert final["slow@localhost"]["state"] in ("failed", "skipped")
    assert lines[-1]["kind"] == "run_done"
    assert b"localhost" in out  # the summary still lists the host
