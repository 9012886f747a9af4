"""`rex apply` end to end: the local quickstart and launches on real sshds (the rig)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers_procs as procs
import pytest
from helpers_world import Run, free_port, read_events
from sshrig import RigHost, SshdRig

from rexplan.cli.rex import main
from rexplan.cli.rex_key import main as rex_key
from rexplan.transport.shipping import bundle_sha
from rexplan.transport.ssh import SSHTransport
from rexplan.wire import keyfile

Hosts = Callable[[int], list[RigHost]]
REPO = Path(__file__).resolve().parent.parent
#: a passing step never waits for these, so they are roomy for a loaded machine; the tests of a
#: deadline set a short one of their own
TIMEOUTS = {"connect": 10, "start": 10, "callback": 10, "ready": 10}
#: a service that runs until it is stopped
SLEEPER = {"run": ["sleep", "300"], "ready": {"alive": 0.2}}
ALIVE = {"ready": {"alive": 0.2}}
AGENT_FILE = f"agent-{bundle_sha()[:16]}.py"


@pytest.fixture
def tag() -> str:
    """Put into every test program's environment (REXTEST) to find what a test started."""
    return secrets.token_hex(8)


@pytest.fixture
def runs() -> list[str]:
    """Run ids of this test's applies (their programs carry REX_RUN)."""
    return []


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str, runs: list[str]) -> Iterator[None]:
    """Every test ends with no process of its own; leftovers fail it and are killed by pid."""
    yield
    left = procs.find(lambda env: env.get("REXTEST") == tag or env.get("REX_RUN") in runs)
    described = procs.describe(left)
    procs.kill(left)
    assert not left, f"processes of this test still running: {described}"


@dataclass
class World:
    """Manifests over rig hosts, with manifest users of their own so tests never share keys."""

    rig: SshdRig
    tmp: Path
    tag: str
    runs: list[str]
    capsys: pytest.CaptureFixture[str]
    user: str = field(default_factory=lambda: f"u{secrets.token_hex(4)}")
    logins: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, RigHost] = field(default_factory=dict)
    programs: set[str] = field(default_factory=set)

    @property
    def keys(self) -> Path:
        return self.tmp / "keys"

    def manifest(
        self,
        hosts: Sequence[RigHost],
        programs: Mapping[str, Mapping[str, Any]],
        *,
        users: Mapping[str, str] | None = None,
        extra_hosts: Mapping[str, Mapping[str, Any]] | None = None,
        callback: Mapping[str, Any] | None = None,
        name: str = "m.yaml",
    ) -> Path:
        """Write a manifest (JSON is YAML, and quotes every string right); ``users`` maps
        manifest user -> login, default one user logging in as the rig's primary account."""
        users = users or {self.user: self.rig.login}
        self.logins.update(users)
        self.hosts.update({h.name: h for h in hosts})
        self.programs.update(programs)
        doc: dict[str, Any] = {
            "rex": 1,
            "defaults": {"user": next(iter(users)), "timeouts": TIMEOUTS, "stop_timeout": 1},
            "hosts": {h.name: {"address": h.address, "port": h.port} for h in hosts},
            "users": {
                u: {"login": login, "identity": self.rig.identity} for u, login in users.items()
            },
            "programs": {
                p: {**spec, "env": {**spec.get("env", {}), "REXTEST": self.tag}}
                for p, spec in programs.items()
            },
            "authorize": ["*.*.*"],
        }
        doc["hosts"].update(extra_hosts or {})
        if callback:
            doc["callback"] = dict(callback)
        path = self.tmp / name
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    def rex_key(self, *argv: str) -> None:
        code = rex_key([*argv, "--keys", str(self.keys)])
        out, err = self.capsys.readouterr()
        assert code == 0, out + err

    def distribute(self, manifest: Path, *extra: str) -> None:
        """Keys for every step, created here and copied to the hosts (not part of an apply)."""
        self.rex_key("create", "-m", str(manifest))
        known_hosts = ["--known-hosts", self.rig.known_hosts]
        self.rex_key("distribute", "-m", str(manifest), *known_hosts, *extra)

    def apply(self, manifest: Path, *extra: str, events: str | None = None) -> Run:
        """`rex apply` in this process; events go to a file unless ``events`` says otherwise."""
        path = self.tmp / f"events-{len(self.runs)}.jsonl"
        argv = ["apply", str(manifest), "-y", "--keys", str(self.keys)]
        argv += ["--known-hosts", self.rig.known_hosts, "--events", events or str(path), *extra]
        code = main(argv)
        out, err = self.capsys.readouterr()
        if events == "-":
            evs = [json.loads(line) for line in out.splitlines()]
        else:
            evs = read_events(path)
        self.runs.append(str(evs[0]["run"]))
        return Run(code, evs, out, err)

    def home(self, host: str, user: str) -> str:
        """The REX_HOME of manifest ``user``'s login on rig host ``host``."""
        return self.hosts[host].state_dir_for(self.logins[user])

    def stop(self, run: Run) -> None:
        """Stop every service ``run`` made ready, through its agent's state file."""
        for e in run.final().values():
            if e["state"] == "ready":
                host, user, program = e["triple"].rsplit(".", 2)
                state = procs.stop_service(self.home(host, user), program, run.id)
                assert state["state"] == "stopped" and state["pid"] == e["pid"]

    def cleanup(self) -> None:
        for host in self.hosts.values():
            for user, login in self.logins.items():
                home = Path(host.state_dir_for(login))
                shutil.rmtree(home / "keys" / host.name / user, ignore_errors=True)
                (home / "keys" / host.name / f"{user}.key").unlink(missing_ok=True)
                for program in self.programs:
                    procs.remove_records(home, program)


@pytest.fixture
def world(
    sshd_rig: SshdRig,
    tmp_path: Path,
    tag: str,
    runs: list[str],
    capsys: pytest.CaptureFixture[str],
) -> Iterator[World]:
    w = World(sshd_rig, tmp_path, tag, runs, capsys)
    yield w
    w.cleanup()


# --- the quickstart, no sshd -----------------------------------------------------------------


def test_quickstart_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: list[str]
) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8765)) == 0:
            pytest.skip("127.0.0.1:8765, the quickstart store's port, is in use")
    home = tmp_path / "home"
    monkeypatch.setenv("REX_HOME", str(home))
    events = tmp_path / "events.jsonl"
    argv = ["apply", str(REPO / "playbooks" / "quickstart.yaml"), "-y"]
    code = main([*argv, "--keys", str(tmp_path / "keys"), "--events", str(events)])
    run = Run(code, read_events(events))
    runs.append(run.id)
    try:
        assert code == 0
        assert run.states() == {"store@localhost": "ready", "worker@localhost": "ready"}
        assert max(run.index("store", "ready")) < min(run.index("worker", "starting"))
        notices = [e["detail"] for e in run.events if e["kind"] == "notice"]
        assert len(notices) == 2 and all("created key" in n for n in notices)
        assert (home / "keys" / "localhost" / "me" / "store.key").exists()
    finally:
        for program in ("worker", "store"):
            if procs.record_path(home, program).exists():
                assert procs.stop_service(home, program, run.id)["state"] == "stopped"


# --- waves over SSH --------------------------------------------------------------------------


def test_webstack_waits_for_each_wave_to_be_ready(world: World, sshd_hosts: Hosts) -> None:
    db, *apps, lb = sshd_hosts(6)
    port = free_port(db.address)
    listen = (
        "import socket,sys,time; s=socket.socket(); s.bind((sys.argv[1], int(sys.argv[2])));"
        " s.listen(); time.sleep(300)"
    )
    reach = f"import socket; socket.create_connection(('{db.address}', {port}), timeout=1)"
    m = world.manifest(
        [db, *apps, lb],
        {
            "db": {
                "on": [db.name],
                "run": ["python3", "-c", listen, db.address, str(port)],
                "ready": {"tcp": {"host": db.address, "port": port}},
            },
            # ready only while the database accepts connections
            "app": {
                "on": [h.name for h in apps],
                "requires": ["db"],
                "run": ["sleep", "300"],
                "ready": {"command": ["python3", "-c", reach]},
            },
            "lb": {"on": [lb.name], "requires": ["app"], **SLEEPER},
        },
    )
    world.distribute(m)
    run = world.apply(m)
    world.stop(run)
    assert run.code == 0, run.out + run.err
    assert set(run.states().values()) == {"ready"} and len(run.states()) == 6
    assert max(run.index("db", "ready")) < min(run.index("app", "connecting"))
    assert max(run.index("app", "ready")) < min(run.index("lb", "connecting"))
    assert len(run.index("app", "ready")) == 4


def test_two_manifest_users_run_as_their_own_accounts(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    alice, bob = world.rig.account(0), world.rig.account(1)
    users = {f"a{world.user}": alice.login, f"b{world.user}": bob.login}
    ua, ub = users
    m = world.manifest(
        [host],
        {
            "pa": {"on": [host.name], "user": ua, **SLEEPER},
            "pb": {"on": [host.name], "user": ub, **SLEEPER},
        },
        users=users,
    )
    world.distribute(m)
    # each login holds only its own key, in its own REX_HOME
    assert Path(host.state_dir_for(alice.login), "keys", host.name, ua, "pa.key").exists()
    assert not Path(host.state_dir_for(alice.login), "keys", host.name, ub).exists()
    assert Path(host.state_dir_for(bob.login), "keys", host.name, ub, "pb.key").exists()
    run = world.apply(m)
    try:
        assert run.code == 0, run.out + run.err
        final = run.final()
        assert {s: e["state"] for s, e in final.items()} == {
            f"pa@{host.name}": "ready",
            f"pb@{host.name}": "ready",
        }
        assert procs.uid(final[f"pa@{host.name}"]["pid"]) == alice.uid
        assert procs.uid(final[f"pb@{host.name}"]["pid"]) == bob.uid
    finally:
        world.stop(run)


# --- failures --------------------------------------------------------------------------------


def test_program_exiting_at_once_fails_with_its_status(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"quits": {"on": [host.name], "run": ["/bin/sh", "-c", "exit 3"]}})
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 2
    e = run.final()[f"quits@{host.name}"]
    assert (e["state"], e["reason"]) == ("failed", "exited")
    assert "status 3" in e["detail"]
    # the display (stdout here: events go to a file) names the step and why
    assert f"quits@{host.name}" in run.out and "reason=exited" in run.out


def test_never_ready_fails_and_its_group_is_gone(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    closed = free_port()
    m = world.manifest(
        [host],
        {
            "deaf": {
                "on": [host.name],
                # the shell and its child share the group the agent must end
                "shell": "sleep 300 & sleep 300",
                "ready": {"tcp": closed, "timeout": 1.5},
            }
        },
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 2
    e = run.final()[f"deaf@{host.name}"]
    assert (e["state"], e["reason"], e["phase"]) == ("failed", "not_ready", "ready")
    assert procs.tagged(REXTEST=world.tag) == []


def key_id_of(world: World, host: str, program: str) -> str:
    """The key_id of the launcher's key for ``host``.<world user>.``program``."""
    path = world.keys / host / world.user / f"{program}.key"
    return keyfile.key_id(keyfile.parse_key_file(path.read_bytes())[2])


def test_wrong_key_on_one_host_fails_that_step_only(world: World, sshd_hosts: Hosts) -> None:
    hosts = sshd_hosts(3)
    m = world.manifest(hosts, {"svc": {"on": [h.name for h in hosts], **SLEEPER}})
    world.distribute(m)
    bad = hosts[1]
    held = key_id_of(world, bad.name, "svc")  # what the host keeps
    world.rex_key("create", "--force", f"{bad.name}.{world.user}.svc")  # not distributed
    expected = key_id_of(world, bad.name, "svc")
    run = world.apply(m)
    try:
        assert run.code == 6, run.err
        states = run.states()
        assert states.pop(f"svc@{bad.name}") == "failed"
        assert set(states.values()) == {"ready"}
        e = run.final()[f"svc@{bad.name}"]
        assert (e["reason"], e["phase"]) == ("bad_proof", "callback")
        assert e["detail"] == (
            f"the agent proved a different key (key_id {held}, expected {expected}): "
            "run rex_key distribute"
        )
        assert procs.tagged(REXTEST=world.tag, REX_TRIPLE=f"{bad.name}.{world.user}.svc") == []
    finally:
        world.stop(run)


#: a program of step A: with the run id every launched program has (REX_RUN), it claims step
#: B of the next wave over and over, with another key_id and with B's own (public) key_id and
#: a random proof, and prints each reply's type
FORGER = """
import json, os, socket, struct, sys, time
def frame(msg):
    data = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(data)) + data
def recv(sock):
    def exact(n):
        out = b""
        while len(out) < n:
            more = sock.recv(n - len(out))
            if not more:
                raise EOFError
            out += more
        return out
    return json.loads(exact(struct.unpack(">I", exact(4))[0]))
env = os.environ
end = time.monotonic() + 20
while time.monotonic() < end:
    for key_id in (os.urandom(8).hex(), env["B_KEY_ID"]):
        hello = {"t": "hello", "v": "rex-cb/1", "run": env["REX_RUN"], "step": env["B_STEP"],
                 "triple": env["B_TRIPLE"], "key_id": key_id, "na": os.urandom(16).hex(),
                 "pid": 4242, "pgid": 4242, "start": "1"}
        try:
            with socket.create_connection(("127.0.0.1", int(env["CB_PORT"])), timeout=2) as s:
                s.sendall(frame(hello))
                reply = recv(s)
                if reply["t"] == "chal":
                    print("chal", flush=True)
                    s.sendall(frame({"t": "resp", "ap": os.urandom(32).hex()}))
                    reply = recv(s)
                print(reply["t"], flush=True)
        except (OSError, EOFError, ValueError):
            pass
    time.sleep(0.01)
time.sleep(300)
"""


def test_a_program_of_the_run_cannot_fail_a_step_of_the_next_wave(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    port = free_port()

    def manifest(key_id: str) -> Path:
        env = {
            "CB_PORT": str(port),
            "B_STEP": f"b@{host.name}",
            "B_TRIPLE": f"{host.name}.{world.user}.b",
            "B_KEY_ID": key_id,
        }
        programs = {
            "a": {"on": [host.name], "run": ["python3", "-c", FORGER], "env": env, **ALIVE},
            # a settle of 1 s: the forger has time to claim b while b awaits its callback
            "b": {"on": [host.name], "requires": ["a"], **SLEEPER, "ready": {"alive": 1.0}},
        }
        return world.manifest([host], programs, callback={"port": port})

    world.distribute(manifest("0" * 16))
    m = manifest(key_id_of(world, host.name, "b"))
    run = world.apply(m)
    try:
        assert run.code == 0, run.out + run.err
        assert run.states() == {f"a@{host.name}": "ready", f"b@{host.name}": "ready"}
        triple = f"{host.name}.{world.user}.a"  # logs are named by the triple
        log = Path(world.home(host.name, world.user), "logs", f"{triple}.log").read_text()
        # forged attempts met b while it was pending (a chal), and every one was refused
        assert "chal" in log.split() and "ok" not in log.split()
    finally:
        world.stop(run)


def test_the_run_id_stays_out_of_every_command_line(
    world: World, sshd_hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    (host,) = sshd_hosts(1)
    sent: list[tuple[list[str], bytes]] = []
    real = SSHTransport.run

    def spy(self: SSHTransport, argv: Sequence[str], **kwargs: Any) -> Any:
        sent.append((list(argv), kwargs.get("stdin") or b""))
        return real(self, argv, **kwargs)

    monkeypatch.setattr(SSHTransport, "run", spy)
    closed = free_port()
    never = {"shell": "sleep 300", "ready": {"tcp": closed, "timeout": 1.0}}
    m = world.manifest([host], {"deaf": {"on": [host.name], **never}})
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 2
    assert run.only()["reason"] == "not_ready"
    # 128 random bits after the time; on SSH stdin only, the kill's request included
    stamp, _, random_part = run.id.partition("-")
    assert len(random_part) == 32 and int(random_part, 16) >= 0 and stamp[8] == "T"
    kills = [stdin for argv, stdin in sent if argv[-1] == "--kill"]
    assert kills and all(run.id.encode() in stdin for stdin in kills), sent
    assert not [argv for argv, _ in sent if any(run.id in arg for arg in argv)]


def test_no_key_on_the_host_starts_nothing(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"keyless": {"on": [host.name], **SLEEPER}})
    world.rex_key("create", "-m", str(m))  # made here, never distributed
    run = world.apply(m)
    assert run.code == 6
    e = run.final()[f"keyless@{host.name}"]
    assert (e["state"], e["reason"]) == ("failed", "no_key")
    assert "no key for" in e["detail"]
    # the agent refuses before it opens the program's log: nothing was started
    log = Path(world.home(host.name, world.user), "logs", "keyless.log")
    assert not log.exists() or run.id not in log.read_text()
    assert procs.tagged(REXTEST=world.tag) == []


@pytest.mark.parametrize("how", ["refused", "blackhole"])
def test_unreachable_callback_the_agent_kills_its_program(
    world: World, sshd_hosts: Hosts, how: str
) -> None:
    (host,) = sshd_hosts(1)
    hole = socket.socket()
    try:
        hole.bind(("127.0.0.99", 0))
        port = hole.getsockname()[1]
        if how == "blackhole":
            hole.listen(8)  # connections complete in the kernel; nobody ever answers them
        callback = {"bind": "127.0.0.1", "port": port, "advertise": "127.0.0.99"}
        m = world.manifest(
            [host],
            {"lonely": {"on": [host.name], **SLEEPER, "timeouts": {**TIMEOUTS, "callback": 1.5}}},
            callback=callback,
        )
        world.distribute(m)
        run = world.apply(m)
    finally:
        hole.close()
    assert run.code == 2
    e = run.final()[f"lonely@{host.name}"]
    assert (e["state"], e["reason"], e["phase"]) == ("failed", "no_callback", "callback")
    # the agent's own report: it gave up on 127.0.0.99 by its deadline and killed the program
    assert "127.0.0.99" in e["detail"]
    assert procs.tagged(REXTEST=world.tag) == []


def test_launcher_killed_mid_wave_leaves_nothing_behind(
    world: World, sshd_hosts: Hosts, runs: list[str]
) -> None:
    hosts = sshd_hosts(3)
    flags = [Path(h.state_dir_for(world.rig.login), f"flag-{world.tag}") for h in hosts]
    programs = {
        # p0, p1 become ready once the launcher is dead: their callbacks find nobody
        f"p{i}": {
            "on": [h.name],
            "run": ["sleep", "300"],
            "ready": {"file": str(flags[i]), "timeout": 6 if i < 2 else 4},
            "timeouts": {**TIMEOUTS, "callback": 2},
        }
        for i, h in enumerate(hosts)
    }
    m = world.manifest(hosts, programs)
    world.distribute(m)
    events = world.tmp / "events.jsonl"
    argv = [sys.executable, "-c", "import sys; from rexplan.cli.rex import main; sys.exit(main())"]
    argv += ["apply", str(m), "-y", "--keys", str(world.keys), "--events", str(events)]
    argv += ["--known-hosts", world.rig.known_hosts]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(world.tmp / "launcher.out", "wb") as out:
        launcher = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        seen: set[str] = set()

        def all_started() -> bool:
            seen.update(
                procs.environ(p).get("REX_TRIPLE", "") for p in procs.tagged(REXTEST=world.tag)
            )
            seen.discard("")
            return len(seen) == 3

        assert procs.wait_until(all_started, 30), (world.tmp / "launcher.out").read_text()
        run_id = read_events(events)[0]["run"]
        runs.append(run_id)
        assert launcher.poll() is None  # still mid-wave: p0 and p1 cannot be ready yet
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(5)
        for flag in flags[:2]:
            flag.write_text("")
        # ready 6 s + callback 2 s + stop 1 s at most, then slack for a loaded machine
        agents = [f"{h.state_dir_for(world.rig.login)}/{AGENT_FILE}" for h in hosts]

        def survivors() -> list[int]:
            return procs.tagged(REX_RUN=run_id) + [p for a in agents for p in procs.running(a)]

        assert procs.wait_until(lambda: not survivors(), 30), procs.describe(survivors())
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for flag in flags:
            flag.unlink(missing_ok=True)


# --- what reaches the program ----------------------------------------------------------------

NASTY = [
    "; touch {s}1",
    "$(touch {s}2)",
    "`touch {s}3`",
    "&& touch {s}4 #",
    "| touch {s}5",
    "it's",
    'say "hi"',
    "back\\slash\\",
    "two\nlines\n",
    "",
    " lead and trail ",
    "-c",
    "*",
    "~",
    "$HOME",
    "tab\there",
    "\u00e9\u2603",
]


def test_argv_and_env_reach_the_program_byte_for_byte(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    home = host.state_dir_for(world.rig.login)
    sentinel = f"{home}/sentinel-{world.tag}-"
    args = [a.format(s=sentinel) for a in NASTY]
    out = f"{home}/argv-{world.tag}.json"
    dump = (
        "import json,os,sys,time; p=sys.argv[1]; f=open(p+'.t','w');"
        " json.dump([sys.argv[2:], os.environ['NASTY']], f); f.close(); os.replace(p+'.t', p);"
        " time.sleep(300)"
    )
    m = world.manifest(
        [host],
        {
            "echo": {
                "on": [host.name],
                "run": ["python3", "-c", dump, out, *args],
                "env": {"NASTY": args[1] + args[2] + args[8]},
                "ready": {"file": out},
            }
        },
    )
    world.distribute(m)
    run = world.apply(m)
    try:
        assert run.code == 0, run.out + run.err
        got = json.loads(Path(out).read_text(encoding="utf-8"))
        assert got == [args, args[1] + args[2] + args[8]]
        assert not list(Path(home).glob(f"sentinel-{world.tag}-*"))
    finally:
        world.stop(run)
        Path(out).unlink(missing_ok=True)


# --- output and exit codes -------------------------------------------------------------------


def summary_hosts(display: str) -> list[str]:
    """The host column of the plain summary: the lines above the totals line."""
    lines = display.splitlines()
    totals = next(i for i in range(len(lines) - 1, -1, -1) if " host(s), " in lines[i])
    count = int(lines[totals].split()[0])
    return [line.split()[0] for line in lines[totals - count : totals]]


def test_json_events_summary_and_unreachable_exit_code(world: World, sshd_hosts: Hosts) -> None:
    good, other = sshd_hosts(2)
    dead = {"dead": {"address": "127.0.0.1", "port": free_port()}}
    m = world.manifest(
        [good, other],
        {"svc": {"on": [good.name, other.name, "dead"], **SLEEPER}},
        extra_hosts=dead,
    )
    world.distribute(m, "--limit", f"{good.name},{other.name}")

    run = world.apply(m, "--json")
    world.stop(run)
    assert run.code == 3, run.err
    doc = json.loads(run.out)
    assert doc["format"] == 1 and doc["run"] == run.id and doc["exit"] == 3
    steps = {s["id"]: s for s in doc["steps"]}
    assert set(steps) == {f"svc@{good.name}", f"svc@{other.name}", "svc@dead"}
    assert steps["svc@dead"]["state"] == "unreachable"
    assert steps[f"svc@{good.name}"]["state"] == "ready" and steps[f"svc@{good.name}"]["pid"]
    assert doc["counts"] == {"ready": 2, "unreachable": 1}
    assert sorted(summary_hosts(run.err)) == sorted([good.name, other.name, "dead"])

    run = world.apply(m, events="-")
    world.stop(run)
    assert run.code == 3
    kinds = [e["kind"] for e in run.events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_done"
    assert {e["run"] for e in run.events} == {run.id}
    assert run.states() == {
        f"svc@{good.name}": "ready",
        f"svc@{other.name}": "ready",
        "svc@dead": "unreachable",
    }
    assert sorted(summary_hosts(run.err)) == sorted([good.name, other.name, "dead"])
