"""`rex logs` over real sshds: two hosts' output prefixed by step, -n, patterns, the rotated
file, --since on the start markers, and -f following two hosts until SIGINT, after which
nothing of it is left on the hosts (their sshd sessions, found by the pid/ppid tree)."""

from __future__ import annotations

import io
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_completion
from helpers_world import Hosts, World, nothing_left
from oracle import Oracle
from rich.console import Console

from rexplan.cli import ui
from rexplan.cli.rex import main
from rexplan.engine import logs as hostlogs
from rexplan.transport import persist_wire

ROOT = Path(__file__).resolve().parent.parent
TALK = {
    "shell": "for i in 1 2 3 4 5; do echo line $i; done; printf 'bad \\033[31m\\n'; exec sleep 300",
    "ready": {"alive": 0.2},
}
TICK = {
    # 15 ticks, then quiet: the followers then have nothing to write, and must still end
    "shell": "i=0; while [ $i -lt 15 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done; "
    "exec sleep 300",
    "ready": {"alive": 0.2},
}
JOB = {"kind": "job", "run": ["sh", "-c", "echo job says hi"]}


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


def test_logs_of_two_hosts_n_patterns_rotation_since(world: World, sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(2)
    a, b = (h.name for h in hosts)
    m = world.manifest(hosts, {"talk": {"on": [a, b], **TALK}, "once": {"on": [a], **JOB}})
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    try:
        code, out, err = world.rex("logs", str(m))
        assert code == 0, out + err
        lines = out.splitlines()
        for host in (a, b):
            mine = [line for line in lines if line.startswith(f"talk@{host} ")]
            assert mine[1:6] == [f"talk@{host} | line {i}" for i in range(1, 6)], out
            assert mine[0].startswith(f"talk@{host} | --- rex: run {run.id} step talk@{host}")
            assert mine[-1] == f"talk@{host} | bad \\x1b[31m"  # host bytes filtered
        assert f"once@{a} | job says hi" in lines

        code, out, _ = world.rex("logs", str(m), "-n", "2", f"talk@{a}")
        assert code == 0
        assert out.splitlines() == [f"talk@{a} | line 5", f"talk@{a} | bad \\x1b[31m"]
        code, _, err = world.rex("logs", str(m), "nothing*")
        assert code == 5 and "matches no step" in err

        # -n more than NAME.log holds: the newest rotated file's last lines come first
        rotated = Path(world.home(b)) / "logs" / f"{b}.{world.user}.talk.log.1"
        rotated.write_text("old 1\nold 2\n")
        world.leftovers.append(rotated)
        code, out, _ = world.rex("logs", str(m), "-n", "9", "talk@" + b)
        assert out.splitlines()[:2] == [f"talk@{b} | old 1", f"talk@{b} | old 2"]
        assert len(out.splitlines()) == 9

        # --since: the runs begun since then (the marker's run id), or none
        code, out, _ = world.rex("logs", str(m), "talk", "-n", "100", "--since", "1h")
        assert code == 0 and "old 1" not in out and f"talk@{b} | line 5" in out
        code, out, _ = world.rex("logs", str(m), "--since", "2099-01-01")
        assert code == 0 and out == ""
        code, _, err = world.rex("logs", str(m), "--since", "yesterday")
        assert code == 5 and "--since" in err
    finally:
        world.rex("stop", str(m))


def _follow_until_sigint(
    world: World, m: Path, names: list[str], oracle: Oracle, *options: str
) -> tuple[set[int], dict[int, set[int]]]:
    """Run `rex logs -f` (in a process of its own, to SIGINT it) until it printed every tick
    of every host once, in order; SIGINT it: exit 130. (The sshd session processes that were
    there before, those started while it followed)."""
    before = set(oracle.sessions()[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", "import sys; from rexplan.cli.rex import main; sys.exit(main())"]
    keys = ["--keys", str(world.keys), "--known-hosts", world.rig.known_hosts]
    proc = subprocess.Popen(
        [*argv, "logs", "-f", "-n", "100", *keys, *options, str(m)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    got: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [got.put(line) for line in proc.stdout or ()])
    reader.start()
    try:
        seen: dict[str, list[int]] = {n: [] for n in names}
        end = time.monotonic() + 30
        while min(len(s) for s in seen.values()) < 15 and time.monotonic() < end:
            try:
                line = got.get(timeout=1)
            except queue.Empty:
                continue
            step, _, text = line.rstrip("\n").partition(" | ")
            if text.startswith("--- rex: run"):
                continue
            assert text.startswith("tick "), line
            seen[step.strip().split("@")[1]].append(int(text.split()[1]))
        # the tail, then the followed lines: each once, in order
        assert all(s == list(range(15)) for s in seen.values()), seen
        # the followers: the sshd session processes started since, found by the process tree
        followers = set(oracle.sessions()[0]) - before
        assert followers
        lineage = {p: _ancestors(p) for p in followers}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        end = time.monotonic() + 10
        while time.monotonic() < end and any(_alive(p) for p in followers):
            time.sleep(0.1)
        left = [p for p in followers if _alive(p)]
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    proc.stderr.close()
    return before, lineage


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        pid = _parent(pid)
        found.add(pid)
    return found


def test_follow_two_hosts_until_sigint(world: World, sshd_hosts: Hosts, no_orphans: Oracle) -> None:
    hosts = sshd_hosts(2)
    names = [h.name for h in hosts]
    m = world.manifest(hosts, {"tick": {"on": names, **TICK}})
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    try:
        _follow_until_sigint(world, m, names, no_orphans)
    finally:
        world.rex("stop", str(m))


def test_follow_through_the_persistence_daemon(
    world: World, sshd_hosts: Hosts, no_orphans: Oracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = Path(tempfile.mkdtemp(prefix="rexmux-", dir="/tmp"))  # a socket path is short
    monkeypatch.setenv(persist_wire.MUX_ENV, str(base / "mux"))
    hosts = sshd_hosts(1)
    names = [h.name for h in hosts]
    m = world.manifest(hosts, {"tick": {"on": names, **TICK}})
    world.distribute(m)
    run = world.apply(m, "--persist", "60")  # the daemon's connection, with its SFTP session
    assert run.code == 0, run.out + run.err
    try:
        code, _, err = world.rex("logs", str(m), "--persist", "60", "-n", "1")
        assert code == 0, err
        kept, lineage = _follow_until_sigint(world, m, names, no_orphans, "--persist", "60")
        # the follower ran on the daemon's kept connection, which outlives it
        assert kept and all(_alive(p) for p in kept)
        assert all(ancestors & kept for ancestors in lineage.values()), (lineage, kept)
    finally:
        world.rex("stop", str(m))
        assert main(["disconnect"]) == 0
        pid_file = base / "mux" / persist_wire.PID_FILE
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        end = time.monotonic() + 10
        while pid is not None and _alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
        shutil.rmtree(base)
    assert pid is None or not _alive(pid)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def test_since_is_defined_on_the_start_markers() -> None:
    lines = [
        "before any marker",
        "--- rex: run 20261206T100000-aa step p@h starting",
        "old",
        "--- rex: run 20261206T120000-bb step p@h starting",
        "new",
        "--- rex: run 20261206T120000-bb step p@h restart 1",
        "after restart",
    ]
    assert hostlogs.since_filter(lines, "20261206T110000") == lines[3:]
    assert hostlogs.since_filter(lines, "20261206T090000") == lines[1:]
    assert hostlogs.parse_since("2026-12-06T11:00") == "20261206T110000"
    assert hostlogs.parse_since("90", now=time.mktime((2026, 12, 6, 11, 0, 0, 0, 0, -1))) == (
        "20261206T105830"
    )


def test_bash_completes_logs_patterns_with_program_names(tmp_path: Path) -> None:
    workdir = test_completion.workdir.__wrapped__(tmp_path)  # type: ignore[attr-defined]
    got = test_completion.bash_complete(
        workdir, ["rex", "lo"], ["rex", "logs", "site.yaml", ""], ["rex", "logs", "--fo"]
    )
    assert got == [["logs"], ["db", "site"], ["--follow", "--forks"]]


# --- the agent's --logs mode, run here ---------------------------------------------------


def _agent(home: Path, *args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    code = "import sys; from rexplan.remote.agent.front import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, "--logs", *args],
        stdin=subprocess.PIPE if stdin is None else stdin,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "REX_HOME": str(home)},
    )


def test_agent_cuts_long_lines_in_pieces_and_bounds_the_tail(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "p.log").write_bytes(b"x" * 10000 + b"\nshort\n" + b"y\n" * 400_000)
    proc = _agent(tmp_path, "100000", "once", "p", "q")
    out, _ = proc.communicate(timeout=60)
    lines = out.split(b"\n")
    assert lines[-3:] == [b".none q", b".end", b""]
    assert len(out) <= 1 << 20  # within what a launcher keeps of a command's output
    assert all(line == b"p y" for line in lines[:-3])
    proc = _agent(tmp_path, "0", "once", "p")
    assert proc.communicate(timeout=60)[0] == b".end\n"
    (tmp_path / "logs" / "p.log").write_bytes(b"x" * 10000 + b"\nshort\n")
    out, _ = _agent(tmp_path, "5", "once", "p").communicate(timeout=60)
    assert out.split(b"\n")[:2] == [b"p " + b"x" * 4096, b"p " + b"x" * 4096]
    assert out.split(b"\n")[2:] == [b"p " + b"x" * 1808, b"p short", b".end", b""]


def test_agent_follows_across_a_rotation_each_line_once(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "p.log"
    log.write_text("one\n")
    proc = _agent(tmp_path, "10", "follow", "p")
    assert proc.stdout is not None and proc.stdin is not None
    got: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(target=lambda: [got.put(line) for line in proc.stdout or ()])
    reader.start()

    def next_lines(n: int) -> list[bytes]:
        return [got.get(timeout=10) for _ in range(n)]

    assert next_lines(2) == [b"p one\n", b".end\n"]
    with log.open("a") as f:
        f.write("two\nthree")  # no newline yet: the line waits
    time.sleep(0.5)
    with log.open("a") as f:
        f.write(" and a half\n")
    log.rename(logs / "p.log.1")  # rotated as the supervisor would: the old file ends
    log.write_text("four\n")
    assert next_lines(3) == [b"p two\n", b"p three and a half\n", b"p four\n"]
    proc.stdin.close()  # the channel closes: the follower ends
    assert proc.wait(timeout=10) == 0
    reader.join(10)
    assert got.empty()
    proc.stdout.close()


def test_prefixes_coloured_per_step_on_a_terminal_only() -> None:
    for terminal in (True, False):
        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=terminal, color_system="standard", width=200)
        printer = ui.LogPrinter(console, ["db@h1", "app@web1"])
        printer.line("db@h1", "ready \x1b[2J")
        printer.line("app@web1", "up")
        text = buffer.getvalue()
        plain = "db@h1    | ready \\x1b[2J\napp@web1 | up\n"
        if terminal:
            assert "\x1b[36m" in text and "\x1b[35m" in text  # cyan, then magenta
            assert "\x1b[2J" not in text
            assert "ready \\x1b[2J" in text  # the host's escape shown, not sent
        else:
            assert text == plain


def test_local_programs_logs_and_follow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transport: local: read once in this process, then -f (a local pipe) until SIGINT, after
    which the follower, a child of rex, is gone."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "rex: 1\n"
        "defaults: {user: me, transport: local, timeouts: {start: 5, callback: 5}}\n"
        "hosts: {localhost: {transport: local}}\n"
        "users: {me: {}}\n"
        "programs:\n"
        "  hello: {on: [localhost], kind: job, run: [sh, -c, 'echo hello from a job']}\n"
        "authorize: ['*.*.*']\n"
    )
    home = tmp_path / "home"
    monkeypatch.setenv("REX_HOME", str(home))
    keys = ["--keys", str(tmp_path / "keys")]
    assert main(["apply", "-y", "-q", str(manifest), *keys]) == 0
    assert main(["logs", str(manifest), "-n", "1", *keys]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the job's line, then the mark the supervisor wrote when it exited
    code = "import sys; from rexplan.cli.rex import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "logs", "-f", "-n", "2", *keys, str(manifest)],
        stdout=subprocess.PIPE,
        env=env,
    )
    got: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [got.put(line) for line in proc.stdout or ()], daemon=True
    )
    reader.start()
    try:
        assert got.get(timeout=30) == b"hello@localhost | hello from a job\n"
        assert got.get(timeout=10).startswith(b"hello@localhost | --- rex: exited with status 0")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    with (home / "logs" / "localhost.me.hello.log").open("a") as log:
        log.write("appended\n")
    assert got.get(timeout=10) == b"hello@localhost | appended\n"
    children = [p for p in _all_pids() if _parent(p) == proc.pid]
    assert children  # the follower
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    reader.join(10)
    assert proc.stdout is not None
    proc.stdout.close()
    end = time.monotonic() + 10
    while time.monotonic() < end and any(_alive(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
