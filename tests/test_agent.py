"""The agent as shipped: the bundle run by `python -I -S` from a bare directory, real sockets."""

from __future__ import annotations

import contextlib
import glob
import json
import marshal
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import PendingStep
from rexplan.remote.agent import probes as agent_probes
from rexplan.remote.agent.failure import (
    EXIT_AGENT,
    EXIT_BAD_LAUNCH,
    EXIT_EXITED,
    EXIT_KEY,
    EXIT_NO_CALLBACK,
    EXIT_NO_LAUNCH,
    EXIT_NOT_READY,
    EXIT_REJECTED,
)
from rexplan.remote.agent.groups import start_time
from rexplan.remote.agent.records import _store
from rexplan.transport import shipping
from rexplan.wire import codes, frames, handshake, keyfile, probes
from rexplan.wire.launch import make_kill, make_launch, parse_launch, spec_digest

PY = sys.executable
TRIPLE = "h1.alice.app"
STEP = "app@h1"
#: roomy, since passing tests never wait for them; tests of a deadline set a short one
DEADLINES = {"start": 5.0, "ready": 10.0, "callback": 10.0, "stop": 1.0}


def tagged(run: str) -> list[int]:
    """Live processes carrying REX_RUN=<run> in their environment (zombies have none)."""
    tag = f"REX_RUN={run}".encode()
    found = []
    for path in glob.glob("/proc/[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if tag in Path(path).read_bytes().split(b"\0"):
                found.append(int(path.split("/")[2]))
    return found


def alive(pid: int) -> bool:
    """Running and not a zombie (this machine's init may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError):
        return 0


def wait_for(check: Any, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    code: int
    report: dict[str, Any]
    stderr: str


@dataclass
class Rig:
    """A REX_HOME with keys, a listener, the bundle on disk and a bare working directory."""

    tmp: Path
    lis: CallbackListener
    home: Path
    work: Path
    bundle: Path
    secret: bytes = field(default_factory=lambda: os.urandom(32))
    supervisors: list[int] = field(default_factory=list)

    def write_key(
        self, rel: str = "h1/alice/app.key", triple: str = TRIPLE, secret: bytes | None = None
    ) -> Path:
        path = self.home / "keys" / rel
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(keyfile.format_key_file(triple, "2026-01-01", secret or self.secret))
        path.chmod(0o600)
        return path

    def line(self, argv: list[str], **over: Any) -> tuple[bytes, PendingStep]:
        step = PendingStep.create(over.pop("step", STEP), TRIPLE, self.secret, 30)
        if over.pop("expect", True):
            self.lis.expect(step)
        args: dict[str, Any] = {
            "run": self.lis.run_id,
            "step": step.step_id,
            "triple": TRIPLE,
            "key_path": "h1/alice/app.key",
            "nl": step.nl,
            "callback": self.lis.address,
            "deadlines": DEADLINES,
            "argv": argv,
            "cwd": str(self.work),
            "ready": {"kind": "alive", "settle": 0.1},
            "log": "app",
        }
        args.update(over)
        return make_launch(**args), step

    def run(self, cmd: list[str], stdin: bytes, timeout: float = 20) -> Result:
        env = {"REX_HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, cwd=self.work, env=env, timeout=timeout
        )
        lines = proc.stdout.decode().splitlines()
        report = json.loads(lines[-1]) if lines else {}
        if "agent" in report:
            self.supervisors.append(report["agent"])
        return Result(proc.returncode, report, proc.stderr.decode())

    def launch(self, argv: list[str], timeout: float = 20, **over: Any) -> Result:
        line, _ = self.line(argv, **over)
        return self.run([PY, "-I", "-S", str(self.bundle)], line, timeout)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir(mode=0o700)
    work.mkdir()
    bundle = tmp_path / "agent.py"
    bundle.write_bytes(shipping.bundle())
    with CallbackListener(handshake_timeout=2) as lis:
        r = Rig(tmp_path, lis, home, work, bundle)
        r.write_key()
        yield r
        left = tagged(lis.run_id)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in r.supervisors:
            if not wait_for(lambda pid=pid: not alive(pid)):
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"agent supervisor {pid} outlived its program")
        assert left == [], f"processes of the run left behind: {left}"


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not alive(pid))


def state(rig: Rig) -> dict[str, Any]:
    return dict(json.loads((rig.home / "run" / "app.json").read_text()))


def test_verified_service_runs_under_its_supervisor(rig: Rig) -> None:
    line, step = rig.line(["sleep", "30"], env={"GREETING": "hi"}, tags={"REX_SPEC": "s1"})
    result = rig.run([PY, "-I", "-S", str(rig.bundle)], line)
    assert result.code == 0, result
    pid = result.report["pid"]
    verdict = rig.lis.wait(step.step_id, 5)
    assert verdict.ok and verdict.pid == pid == verdict.pgid == os.getpgid(pid)
    assert alive(pid) and tagged(rig.lis.run_id) == [pid]
    env = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
        if item
    )
    assert env.pop("PATH")
    env.pop("LANG", None)  # the login environment's, when the agent's environment has it
    me = pwd.getpwuid(os.getuid())
    assert env == {
        "GREETING": "hi",
        "REX_SPEC": "s1",
        "REX_RUN": rig.lis.run_id,
        "REX_STEP": STEP,
        "REX_TRIPLE": TRIPLE,
        "REX_HOST": "h1",
        "REX_INDEX": "0",
        "REX_COUNT": "1",
        "HOME": me.pw_dir,
        "USER": me.pw_name,
        "LOGNAME": me.pw_name,
        "SHELL": me.pw_shell or "/bin/sh",
    }
    nonce = step.nl.hex().encode()
    for exposed in (f"/proc/{pid}/cmdline", f"/proc/{pid}/environ", str(rig.home / "logs/app.log")):
        assert nonce not in Path(exposed).read_bytes()
    running = state(rig)
    assert running["state"] == "running" and running["pid"] == pid
    assert running["start"] == verdict.start == start_time(pid)
    assert running["spec"] == spec_digest(parse_launch(line))
    assert (rig.home / "logs").stat().st_mode & 0o777 == 0o700
    stop(pid)
    assert wait_for(lambda: state(rig)["state"] == "exited")
    assert state(rig)["status"] == -signal.SIGTERM


def test_bootstrap_runs_the_bundle_without_a_file(rig: Rig) -> None:
    line, step = rig.line(["sleep", "30"])
    result = rig.run(shipping.bootstrap_argv(PY), shipping.bootstrap_input(line))
    assert result.code == 0, result
    assert rig.lis.wait(step.step_id, 5).ok
    stop(result.report["pid"])


def test_bootstrap_refuses_a_damaged_bundle(rig: Rig) -> None:
    line, _ = rig.line(["touch", "started"], expect=False)
    damaged = shipping.bootstrap_input(line).replace(b"rexplan", b"rexplaN", 1)
    result = rig.run(shipping.bootstrap_argv(PY), damaged)
    assert result.code == EXIT_BAD_LAUNCH
    assert not (rig.work / "started").exists()


def test_program_exiting_at_once_fails_fast_with_its_status(rig: Rig) -> None:
    # The probe could only pass at the ready deadline (30 s); the run's 10 s timeout proves
    # the agent did not wait for it.
    probe = {"kind": "tcp", "port": free_port()}
    line, step = rig.line(["sh", "-c", "exit 3"], ready=probe, deadlines={**DEADLINES, "ready": 30})
    result = rig.run([PY, "-I", "-S", str(rig.bundle)], line, timeout=10)
    assert result.code == EXIT_EXITED
    assert result.report["status"] == 3
    assert "status 3" in result.stderr
    assert not rig.lis.wait(step.step_id, 0).ok


def test_never_ready_fails_at_the_deadline_and_kills_the_group(rig: Rig) -> None:
    probe = {"kind": "tcp", "port": free_port(), "interval": 0.1}
    result = rig.launch(
        ["sh", "-c", "sleep 30 & sleep 30"], ready=probe, deadlines={**DEADLINES, "ready": 1.0}
    )
    assert result.code == EXIT_NOT_READY
    assert not alive(result.report["pid"])
    assert tagged(rig.lis.run_id) == []


@pytest.mark.parametrize("how", ["closed port", "blackhole"])
def test_unreachable_callback_kills_the_program_by_its_own_deadline(rig: Rig, how: str) -> None:
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        if how == "blackhole":
            hole.listen(8)  # the kernel completes connections; nobody ever answers
        port = hole.getsockname()[1]
        if how == "closed port":
            hole.close()
        result = rig.launch(
            ["sh", "-c", "sleep 30 & sleep 30"],
            callback=("127.0.0.1", port),
            deadlines={**DEADLINES, "callback": 1.0},
        )
    assert result.code == EXIT_NO_CALLBACK, result
    assert not alive(result.report["pid"])
    assert tagged(rig.lis.run_id) == []


def test_rogue_listener_gets_no_response_and_the_program_dies(rig: Rig) -> None:
    after_chal: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))

    def rogue() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            reader = frames.FrameReader()
            while not reader.feed(conn.recv(reader.wanted())):
                pass
            fake = handshake.make_chal(handshake.new_nonce(), os.urandom(32))
            conn.sendall(frames.encode_frame(fake))
            while data := conn.recv(4096):
                after_chal.append(data)

    thread = threading.Thread(target=rogue)
    thread.start()
    with server:
        result = rig.launch(["sleep", "30"], callback=server.getsockname()[:2])
        thread.join(10)
    assert result.code == EXIT_REJECTED
    assert "could not prove" in result.report["reason"]
    assert after_chal == []  # no resp: a rogue learns nothing it could replay
    assert not alive(result.report["pid"])


def test_agent_with_a_different_key_is_rejected_and_its_program_dies(rig: Rig) -> None:
    rig.write_key(secret=os.urandom(32))
    line, step = rig.line(["sleep", "30"])
    result = rig.run([PY, "-I", "-S", str(rig.bundle)], line)
    assert result.code == EXIT_REJECTED
    # the report, over SSH for a launcher, names the key the agent holds: not the step's
    assert result.report["key_id"] != step.key_id
    assert not alive(result.report["pid"])
    assert rig.lis.attempts == {codes.WRONG_KEY: 1}  # a public claim: it decided nothing
    assert rig.lis.wait(step.step_id, 0).code == codes.TIMEOUT


def _insecure(rig: Rig, how: str) -> None:
    key = rig.home / "keys/h1/alice/app.key"
    if how == "mode 0644":
        key.chmod(0o644)
    elif how == "symlink":
        real = rig.home / "elsewhere.key"
        key.rename(real)
        key.symlink_to(real)
    elif how == "group-writable dir":
        key.parent.chmod(0o770)
    elif how == "names another triple":
        rig.write_key(triple="h1.alice.other")
    elif how == "missing":
        key.unlink()
    elif how == "not a file":
        key.unlink()
        key.mkdir(mode=0o700)


@pytest.mark.parametrize(
    "how",
    ["mode 0644", "symlink", "group-writable dir", "names another triple", "missing", "not a file"],
)
def test_insecure_or_missing_key_is_refused_before_anything_starts(rig: Rig, how: str) -> None:
    _insecure(rig, how)
    result = rig.launch(["touch", "started"])
    assert result.code == EXIT_KEY, result
    assert not (rig.work / "started").exists()
    assert rig.secret.hex() not in result.stderr + json.dumps(result.report)
    assert result.stderr.startswith("rex-agent: ") and result.stderr.count("\n") == 1


def test_user_key_is_the_fallback(rig: Rig) -> None:
    (rig.home / "keys/h1/alice/app.key").unlink()
    rig.write_key("h1/alice.key", "h1.alice")
    result = rig.launch(["sleep", "30"])
    assert result.code == 0, result
    stop(result.report["pid"])


def test_argv_reaches_the_program_byte_for_byte(rig: Rig) -> None:
    tricky = ["; touch X", "$(touch Y)", "`touch Z`", "'q\"", "a\nb", " sp ", "", "*", "\\"]
    out = rig.work / "argv.json"
    script = "import json,sys,time\nopen(sys.argv[1],'w').write(json.dumps(sys.argv[2:]))\n"
    result = rig.launch(
        [PY, "-c", script + "time.sleep(30)", str(out), *tricky],
        ready={"kind": "file", "path": "argv.json", "interval": 0.05},
    )
    assert result.code == 0, result
    assert json.loads(out.read_text()) == tricky
    assert sorted(p.name for p in rig.work.iterdir()) == ["argv.json"]
    stop(result.report["pid"])


PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "tcp": (
        "import socket,time\ntime.sleep(0.3)\ns=socket.create_server(('127.0.0.1',{port}))\n"
        "time.sleep(30)",
        {"kind": "tcp", "port": 0},
    ),
    "http": (
        "import http.server,time\ntime.sleep(0.3)\nhttp.server.HTTPServer(('127.0.0.1',{port}),"
        "http.server.SimpleHTTPRequestHandler).serve_forever()",
        {"kind": "http", "url": "http://127.0.0.1:{port}/"},
    ),
    "command": (
        "import time\ntime.sleep(0.3)\nopen('flag','w').close()\ntime.sleep(30)",
        {"kind": "command", "argv": ["test", "-e", "flag"]},
    ),
    "notify": (
        "import os,socket,time\ntime.sleep(0.3)\n"
        "s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n"
        "s.sendto(b'STATUS=up\\nREADY=1',os.environ['NOTIFY_SOCKET'])\ntime.sleep(30)",
        {"kind": "notify"},
    ),
}


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_readiness_probes(rig: Rig, kind: str) -> None:
    port = free_port()
    script, probe = PROBES[kind]
    ready = {**probe, "interval": 0.05}
    if "port" in ready:
        ready["port"] = port
    if "url" in ready:
        ready["url"] = ready["url"].format(port=port)
    result = rig.launch([PY, "-c", script.format(port=port)], ready=ready)
    assert result.code == 0, result
    stop(result.report["pid"])
    if kind == "notify":
        assert not list((rig.home / "run").glob("n*"))  # the socket directory is removed


def test_the_agent_checks_every_polled_probe_kind_of_the_table() -> None:
    # wire.probes.KINDS is the one list of probe kinds; the agent has a check for each polled
    # kind and no other
    polled = {name for name, kind in probes.KINDS.items() if kind.polled}
    assert set(agent_probes.CHECKS) == polled
    assert set(probes.KINDS) - polled == {"alive", "notify"}  # wait_ready's own two


@pytest.mark.parametrize("stdin", [b"", b"not json\n", b'{"v": "rex-cb/1"}\n'])
def test_bad_launch_message(rig: Rig, stdin: bytes) -> None:
    result = rig.run([PY, "-I", "-S", str(rig.bundle)], stdin)
    assert result.code == EXIT_BAD_LAUNCH
    assert result.report["ok"] is False


def _front(rig: Rig, argv: list[str], **over: Any) -> subprocess.Popen[bytes]:
    line, _ = rig.line(argv, **over)
    env = {"REX_HOME": str(rig.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    front = subprocess.Popen(
        [PY, "-I", "-S", str(rig.bundle)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=rig.work,
        env=env,
    )
    assert front.stdin is not None
    front.stdin.write(line)
    front.stdin.flush()
    return front


def test_sigterm_to_the_front_before_ok_kills_the_group(rig: Rig) -> None:
    probe = {"kind": "tcp", "port": free_port()}
    front = _front(rig, ["sh", "-c", "sleep 30 & sleep 30"], ready=probe)
    assert wait_for(lambda: len(tagged(rig.lis.run_id)) >= 2)
    front.send_signal(signal.SIGTERM)
    out, _ = front.communicate(timeout=10)
    assert front.returncode == 128 + signal.SIGTERM
    assert json.loads(out)["ok"] is False
    assert tagged(rig.lis.run_id) == []


def test_supervisor_killed_before_ok_the_front_kills_the_group(rig: Rig) -> None:
    probe = {"kind": "tcp", "port": free_port()}
    front = _front(rig, ["sh", "-c", "sleep 30 & sleep 30"], ready=probe)
    assert wait_for(lambda: len(tagged(rig.lis.run_id)) >= 2)
    children = [pid for pid in all_pids() if parent(pid) == front.pid]
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)
    out, _ = front.communicate(timeout=10)
    assert front.returncode == EXIT_AGENT
    assert json.loads(out)["reason"] == "agent supervisor died"
    assert tagged(rig.lis.run_id) == []


def test_kill_mode_ends_the_step_by_its_tags(rig: Rig) -> None:
    result = rig.launch(["sh", "-c", "sleep 30 & sleep 30"])
    assert result.code == 0, result
    assert len(tagged(rig.lis.run_id)) >= 2
    kill = [PY, "-I", "-S", str(rig.bundle), "--kill"]  # the run id goes on stdin only
    other = rig.run(kill, make_kill(rig.lis.run_id, "other@h1", 1))
    assert other.report == {"ok": True, "killed": []}
    # the old form, with the run id in argv (anyone's to read in ps), is refused
    old = rig.run([*kill, rig.lis.run_id, STEP], b"")
    assert old.code == EXIT_BAD_LAUNCH
    assert len(tagged(rig.lis.run_id)) >= 2
    garbled = rig.run(kill, b'{"run": "x"}\n')
    assert garbled.code == EXIT_BAD_LAUNCH
    assert "--kill needs" in garbled.report["reason"]
    killed = rig.run(kill, make_kill(rig.lis.run_id, STEP, 1))
    assert killed.report == {"ok": True, "killed": [result.report["pid"]]}
    assert tagged(rig.lis.run_id) == []
    assert wait_for(lambda: state(rig)["state"] == "exited")


def _old_python() -> str | None:
    """A Python 3.8 interpreter, if this machine has one (pyenv's shims may not run it)."""
    candidates = [os.environ.get("REX_TEST_PYTHON38", "")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            done = subprocess.run([candidate, "-I", "-S", "-c", "pass"], capture_output=True)
            if done.returncode == 0:
                return candidate
    return None


def test_agent_runs_on_python_3_8(rig: Rig) -> None:
    old = _old_python()
    if old is None:
        pytest.skip("no Python 3.8 on this machine (set REX_TEST_PYTHON38)")
    line, step = rig.line(["sleep", "30"], ready={"kind": "tcp", "port": rig.lis.address[1]})
    result = rig.run([old, "-I", "-S", str(rig.bundle)], line)
    assert result.code == 0, result
    assert rig.lis.wait(step.step_id, 5).ok
    stop(result.report["pid"])


# --- the launch stub's announcement and the agent's bounded read -----------------------------


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _stub(rig: Rig, wait: float, stdout: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """LAUNCH_STUB started as a launch runs it (``--wait``), the agent in REX_HOME where it
    looks for it; stdin and stderr are pipes."""
    (rig.home / shipping.agent_name()).write_bytes(shipping.bundle())
    return subprocess.Popen(
        shipping.launch_argv(PY, wait=wait),
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=rig.work,
        env={"REX_HOME": str(rig.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )


def _announced(rig: Rig, wait: float) -> subprocess.Popen[bytes]:
    """_stub, once it printed LAUNCH_MARKER; nothing was sent to it yet: the marker comes
    first, unasked."""
    proc = _stub(rig, wait)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == shipping.LAUNCH_MARKER.encode() + b"\n"
    except BaseException:
        _end(proc)
        raise
    return proc


def test_launch_stub_announces_itself_before_it_reads_the_launch_line(rig: Rig) -> None:
    line, step = rig.line(["sleep", "30"])
    proc = _announced(rig, wait=5)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(line)
        proc.stdin.close()
        report = json.loads(proc.stdout.readline())
        assert proc.wait(10) == 0, report
    finally:
        _end(proc)
    rig.supervisors.append(report["agent"])
    assert rig.lis.wait(step.step_id, 5).ok
    stop(report["pid"])


@pytest.mark.parametrize("part", [0.0, 0.5], ids=["nothing", "half"])
def test_agent_given_no_launch_line_in_time_starts_nothing(rig: Rig, part: float) -> None:
    """The launcher stopped between the marker and its line (or in the middle of it): stdin
    stays open, and the agent gives up at its --wait deadline without starting anything."""
    line, _ = rig.line(["touch", "started"], expect=False)
    sent = line[: int(len(line) * part)]
    proc = _announced(rig, wait=0.5)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(sent)
        proc.stdin.flush()
        code = proc.wait(10)  # stdin still open
        report = json.loads(proc.stdout.readline())
    finally:
        _end(proc)
    assert code == shipping.EXIT_NO_LAUNCH == EXIT_NO_LAUNCH
    assert report["exit"] == shipping.EXIT_NO_LAUNCH and "within 0.5s" in report["reason"]
    assert not (rig.work / "started").exists()
    assert not (rig.home / "run" / "app.json").exists()


def test_launch_stub_exits_when_the_launcher_is_gone(rig: Rig) -> None:
    """Its stdout closed before it announces itself (the launcher gave up on a slow start):
    it exits at once, without reading or starting anything."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = _stub(rig, wait=60, stdout=write_end)
    finally:
        os.close(write_end)
    try:
        assert proc.wait(10) == shipping.EXIT_NO_LAUNCH
    finally:
        _end(proc)
    assert not (rig.home / "run").exists()


@pytest.mark.parametrize("wait", ["0", "-1", "nan", "inf", "soon"])
def test_agent_refuses_a_bad_wait(rig: Rig, wait: str) -> None:
    line, _ = rig.line(["touch", "started"], expect=False)
    result = rig.run([PY, "-I", "-S", str(rig.bundle), "--wait", wait], line)
    assert result.code == EXIT_BAD_LAUNCH
    assert not (rig.work / "started").exists()


def test_agent_file_keeps_its_compiled_code_and_the_stub_runs_it(rig: Rig) -> None:
    """The first run of an uploaded agent leaves its compiled modules beside it (0600,
    checked by the sources' sha256); LAUNCH_STUB runs that code, and a damaged cache falls
    back to the source."""
    agent = rig.home / shipping.agent_name()
    agent.write_bytes(shipping.bundle())
    cache = Path(f"{agent}.{sys.implementation.cache_tag}.code")
    env = {"REX_HOME": str(rig.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def stub() -> subprocess.CompletedProcess[bytes]:
        argv = shipping.launch_argv(PY, wait=5)
        return subprocess.run(argv, input=b"", capture_output=True, env=env, timeout=20)

    first = subprocess.run([PY, "-I", "-S", str(agent)], input=b"", capture_output=True, env=env)
    assert first.returncode == EXIT_BAD_LAUNCH  # no launch line: nothing started
    assert cache.stat().st_mode & 0o777 == 0o600
    sha, codes = marshal.loads(cache.read_bytes())
    entry = dict(codes)[shipping.ENTRY]
    assert entry.co_filename.endswith("rexplan/remote/agent/front.py") and len(sha) == 64

    # the stub takes the agent's code from the cache: a stand-in there is what runs
    stand_in = compile("def main():\n    print('from the cache')\n    return 0\n", "x", "exec")
    codes = tuple((name, stand_in if name == shipping.ENTRY else code) for name, code in codes)
    cache.write_bytes(marshal.dumps((sha, codes)))
    ran = stub()
    assert ran.returncode == 0 and ran.stdout.endswith(b"from the cache\n"), ran

    # a damaged cache: the stub compiles the source, then the agent says its launch line is missing
    cache.write_bytes(b"\xff not marshal")
    ran = stub()
    assert ran.returncode == EXIT_BAD_LAUNCH, ran
    assert b"no launch message" in ran.stderr


# ---- the shell check of an unchanged program (shipping.CHECK_SH) ---------------------------------


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[19].decode()


@pytest.mark.parametrize("name", ["sleep", "x) y z"])
def test_shell_check_says_what_the_stub_check_says(tmp_path: Path, name: str) -> None:
    """CHECK_SH answers ``unchanged`` exactly as LAUNCH_STUB's check, from run/PROGRAM.id,
    and for anything else runs the command after its arguments (the stub), here an echo. A
    command name holding ") " does not shift the fields."""
    link = tmp_path / name
    link.symlink_to(subprocess.run(["sh", "-c", "command -v sleep"], capture_output=True,
                                   text=True, check=True).stdout.strip())  # fmt: skip
    proc = subprocess.Popen([str(link), "30"])
    try:
        home = tmp_path / "home"
        (home / "run").mkdir(parents=True)
        triple, spec, start = "h1.alice.app", "ab" * 32, _start_time(proc.pid)
        record = {"pid": proc.pid, "start": start, "spec": spec, "triple": triple}
        (home / "run" / "app.json").write_text(json.dumps(record))
        (home / shipping.agent_name()).write_bytes(shipping.bundle())
        argv = shipping.launch_argv(PY, check=(triple, "app", spec, "site"))
        env = {"REX_HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

        def shell(line: str | None) -> bytes:
            target = home / "run" / "app.id"
            if line is None:
                target.unlink(missing_ok=True)
            else:
                target.write_text(line)
            cmd = [*argv[:8], "echo", "fallback"]
            return subprocess.run(cmd, env=env, capture_output=True, check=True).stdout

        stub = subprocess.run(argv[8:], env=env, capture_output=True, check=True).stdout
        assert stub == f'{{"ok": true, "unchanged": true, "pid": {proc.pid}}}\n'.encode()
        good = f"{proc.pid} {start} {spec} {triple}\n"
        assert shell(good) == stub
        for bad in (
            None,
            f"{proc.pid} {int(start) + 1} {spec} {triple}\n",  # another process, same pid
            f"{proc.pid} {start} {'cd' * 32} {triple}\n",  # another spec
            f"{proc.pid} {start} {spec} h2.alice.app\n",  # another triple
            f"{proc.pid} {start} {spec} {triple} extra\n",
            f"1 {start} {spec} {triple}\n",
            f"-{proc.pid} {start} {spec} {triple}\n",
            f"{proc.pid}x {start} {spec} {triple}\n",
            f"999999999 {start} {spec} {triple}\n",  # no such process
            "",
        ):
            assert shell(bad) == b"fallback\n", bad
    finally:
        proc.kill()
        proc.wait()


def test_records_keep_their_shell_check_line(tmp_path: Path) -> None:
    """The agent writes run/NAME.id with every record that names a live program's pid, and
    removes it with one that names none."""
    home = str(tmp_path)
    record = {"pid": os.getpid(), "start": _start_time(os.getpid()), "spec": "ab" * 32}
    _store(home, "app", {**record, "triple": "h1.alice.app", "state": "ready"})
    line = (tmp_path / "run" / "app.id").read_text()
    assert line == f"{os.getpid()} {record['start']} {'ab' * 32} h1.alice.app\n"
    _store(home, "app", {"triple": "h1.alice.app", "state": "stopped"})
    assert not (tmp_path / "run" / "app.id").exists()
    _store(home, "app", {**record, "triple": "a b", "state": "ready"})
    assert not (tmp_path / "run" / "app.id").exists()  # a word with a space: no line
