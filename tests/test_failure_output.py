"""Issue 19: a failed step shows its program's last lines and where its log is (over real
sshd, in rex apply's output, --json and the events), and the agent rotates a program's log at
logs.max_size without losing or repeating a line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import helpers_procs as procs
from helpers_world import Hosts, World, free_port

from rexplan.core import manifest
from rexplan.errors import ManifestError
from rexplan.remote.agent.logpump import LogPump

# a job that fails after 30 lines and a last word on stderr
INITDB = (
    "for i in $(seq 1 30); do echo initdb line $i; done; "
    "echo 'mkdir: cannot create directory /data: Permission denied' >&2; exit 1"
)
# a service that dies before its probe passes
CRASH = "echo loading config; echo 'fatal: bad value for listen_addresses' >&2; exit 3"
# a service that never opens its port
STUCK = "echo waiting for the cluster lock; exec sleep 300"


def test_failures_show_their_last_lines_and_log(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    port = free_port()
    m = world.manifest(
        [host],
        {
            "initdb": {"on": [h], "kind": "job", "shell": INITDB},
            "crash": {"on": [h], "shell": CRASH, "ready": {"tcp": free_port()}},
            "stuck": {"on": [h], "shell": STUCK, "ready": {"tcp": port, "timeout": 1}},
        },
    )
    world.distribute(m)
    run = world.apply(m, "--json", "--tail", "4")
    assert run.code == 2, run.err
    home = world.home(h)
    final = run.final()
    doc = {s["id"]: s for s in json.loads(run.out)["steps"]}

    initdb, crash, stuck = (final[f"{p}@{h}"] for p in ("initdb", "crash", "stuck"))
    assert initdb["tail"] == (
        "initdb line 28\ninitdb line 29\ninitdb line 30\n"
        "mkdir: cannot create directory /data: Permission denied"
    )
    assert crash["tail"] == "loading config\nfatal: bad value for listen_addresses"
    assert stuck["tail"] == "waiting for the cluster lock"
    assert stuck["detail"].startswith(f"tcp 127.0.0.1:{port} not accepting after 1 s")
    for program, event in (("initdb", initdb), ("crash", crash), ("stuck", stuck)):
        assert event["log"] == f"{h}:{home}/logs/{h}.{world.user}.{program}.log"
        # --json holds the same as the events
        step = doc[f"{program}@{h}"]
        assert (step["tail"], step["log"]) == (event["tail"], event["log"])
        # the display (on stderr with --json): under the FAILED line, and after the summary
        assert run.err.count(f"    log: {event['log']}") == 2, run.err
    assert run.err.count("    | mkdir: cannot create directory /data: Permission denied") == 2
    assert "    | initdb line 27" not in run.err  # --tail 4
    assert "    | fatal: bad value for listen_addresses" in run.err
    # the log holds it all, each run marked with a UTC time
    log = Path(home, "logs", f"{h}.{world.user}.initdb.log").read_text()
    assert "initdb line 1\n" in log
    assert re.search(r"--- rex: run \S+ step initdb@\S+ starting at \d{4}-\d\d-\d\dT[\d:]+Z", log)
    assert re.search(r"--- rex: exited with status 1 at \d{4}-", log)


def _numbers(home: str, name: str, keep: int) -> tuple[list[int], list[int]]:
    """The numbered lines of a program's logs, oldest file first, and each file's size."""
    numbers: list[int] = []
    sizes: list[int] = []
    base = Path(home, "logs", f"{name}.log")
    for n in range(keep, -1, -1):
        path = base if n == 0 else Path(f"{base}.{n}")
        if not path.exists() and n and not numbers:
            continue  # fewer old files than keep
        data = path.read_bytes()
        sizes.append(len(data))
        numbers += [int(line[:8]) for line in data.splitlines() if not line.startswith(b"---")]
    assert not Path(f"{base}.{keep + 1}").exists()
    return numbers, sizes


def test_logs_rotate_at_max_size_losing_and_repeating_no_line(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    # 30 MiB of numbered 80-byte lines (and a few long ones), as fast as python writes them
    lines = 30 * (1 << 20) // 80
    write = (
        "import sys\n"
        "w = sys.stdout.write\n"
        f"for i in range({lines}):\n"
        "    w('%08d %s\\n' % (i, ('y' * 3000) if i % 50000 == 7 else 'x' * 71))\n"
    )
    m = world.manifest(
        [host],
        {
            "big": {
                "on": [h],
                "kind": "job",
                "run": ["python3", "-c", write],
                "logs": {"max_size": "1MiB", "keep": 40},
            },
            "small": {
                "on": [h],
                "kind": "job",
                "run": ["python3", "-c", write.replace(str(lines), "100000")],
                "logs": {"max_size": 1 << 20, "keep": 2},
            },
        },
        defaults={"timeouts": {"connect": 5, "start": 5, "callback": 5, "ready": 3}},
    )
    world.distribute(m)
    home = world.home(h)
    try:
        run = world.apply(m)
        assert run.code == 0, run.out + run.err
        numbers, sizes = _numbers(home, f"{h}.{world.user}.big", 40)
        assert numbers == list(range(lines))  # every line, once, in order
        assert max(sizes) <= 1 << 20 and len(sizes) >= 30
        # keep 2: the oldest lines went, the newest are all there, once
        numbers, sizes = _numbers(home, f"{h}.{world.user}.small", 2)
        assert numbers == list(range(100000 - len(numbers), 100000))
        assert 0 < numbers[0] and max(sizes) <= 1 << 20
    finally:
        for name in os.listdir(Path(home, "logs")):
            if re.fullmatch(r".*\.(big|small)\.log\.\d+", name):
                Path(home, "logs", name).unlink()


def test_logs_setting_is_checked_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "rex: 1\n"
        "defaults:\n"
        "  logs: {max_size: 10 furlongs}\n"
        "hosts: {h1: {address: 127.0.0.1}}\n"
        "users: {u: {login: nobody}}\n"
        "programs:\n"
        "  app:\n"
        "    on: [h1]\n"
        "    run: [sleep, '1']\n"
        "    logs:\n"
        "      max_size: 100\n"
        "      keep: 1000\n"
        "  ok:\n"
        "    on: [h1]\n"
        "    run: [sleep, '1']\n"
        "    logs: {max_size: 512 KiB, keep: 0}\n"
        "authorize: ['*.*.*']\n"
    )
    try:
        manifest.load(str(path))
    except ManifestError as exc:
        text = str(exc)
    else:
        raise AssertionError("the bad logs settings were accepted")
    assert f"{path}:3:20: defaults.logs.max_size: '10 furlongs' is not a log size" in text
    assert f"{path}:11:17: programs.app.logs.max_size: 100 is not a log size" in text
    assert f"{path}:12:13: programs.app.logs.keep: 1000" in text
    assert "programs.ok" not in text
    path.write_text(path.read_text().replace("10 furlongs", "2MiB").replace("1000", "1"))
    path.write_text(path.read_text().replace("max_size: 100\n", "max_size: 4096\n"))
    loaded = manifest.load(str(path))
    assert loaded.program("app").logs == (4096, 1)
    assert loaded.program("ok").logs == (512 << 10, 0)


def test_restarts_and_stops_are_marked_in_the_log(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    m = world.manifest(
        [host],
        {
            "flaky": {
                "on": [h],
                "shell": "echo up; sleep 0.4; exit 1",
                "ready": {"alive": 0.1},
                "restart": "on-failure",
            }
        },
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out
    log = Path(world.home(h), "logs", f"{h}.{world.user}.flaky.log")
    when = r"at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
    assert procs.wait_until(lambda: "restart 1 at" in log.read_text(), 15)
    code, out, _ = world.rex("stop", str(m))
    assert code == 0, out
    lines = log.read_text().splitlines()
    marks = [line for line in lines if line.startswith("--- rex: ")]
    assert re.search(r"^--- rex: run \S+ step flaky@\S+ starting " + when, marks[0])
    assert re.search(r"^--- rex: exited with status 1 " + when, marks[1])
    assert re.search(r"^--- rex: run \S+ step flaky@\S+ restart 1 " + when, marks[2])
    assert re.search(r"^--- rex: stopped \(status -?\d+\) " + when, marks[-1])
    assert lines.count("up") >= 2


def test_the_pump_keeps_lines_whole_across_rotations(tmp_path: Path) -> None:
    """Partial lines wait for their end; a line longer than max_size gets a file of its own."""
    path = str(tmp_path / "p.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    pump = LogPump(path, fd, 4096, 2)
    pump.run()
    try:
        os.write(pump.write_fd, b"a" * 3000)  # no newline yet
        pump.drain()  # a drain writes what came, even a partial line (for a tail)
        os.write(pump.write_fd, b"\n" + b"b" * 2000 + b"\n")
        os.write(pump.write_fd, b"c" * 9000 + b"\nd\n")
        pump.note("a mark")
        tail = pump.tail(100)
    finally:
        pump.finish()
    assert Path(path + ".2").read_bytes() == b"b" * 2000 + b"\n"
    assert Path(path + ".1").read_bytes() == b"c" * 9000 + b"\n"
    assert Path(path).read_bytes().startswith(b"d\n--- rex: a mark at ")
    assert not Path(path + ".3").exists()  # keep 2: the a line went
    assert tail.startswith(b"[... ") and tail.endswith(b"Z\n") and len(tail) <= 100


def test_what_outlives_its_program_still_writes_to_the_log(world: World, sshd_hosts: Hosts) -> None:
    """The supervisor ends with the job; a process the job left behind still holds the pipe:
    its later lines reach the log (no SIGPIPE), written by a drainer of their own."""
    (host,) = sshd_hosts(1)
    h = host.name
    shell = "(sleep 0.5; echo late line; sleep 0.2; echo later line) & echo main done"
    m = world.manifest([host], {"leaves": {"on": [h], "kind": "job", "shell": shell}})
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out
    log = Path(world.home(h), "logs", f"{h}.{world.user}.leaves.log")
    assert procs.wait_until(lambda: "later line\n" in log.read_text(), 15), log.read_text()
    text = log.read_text()
    assert text.index("main done") < text.index("late line") < text.index("later line")


def test_a_log_larger_than_max_size_is_rotated_before_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "old.log"
    path.write_bytes(b"x\n" * 5000)  # 10,000 bytes from before logs.max_size was lowered
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    pump = LogPump(str(path), fd, 4096, 1)
    pump.run()
    try:
        os.write(pump.write_fd, b"new\n")
        pump.drain()
    finally:
        pump.finish()
    assert path.read_bytes() == b"new\n"
    assert Path(f"{path}.1").read_bytes() == b"x\n" * 5000
