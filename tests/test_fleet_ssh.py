"""Issue 17 parts 1, 2 and 5: ssh_config honoured, users.*.ssh_options, bastions pinned.

A bastion sshd of the rig in front of two target sshds (all on 127.0.0.x, LogLevel VERBOSE so
their logs show every connection and login). The launcher runs in this process: a spy on
socket.create_connection shows which servers it dialled itself.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_world import SLEEPER, World
from sshrig import RigHost, SshdRig

from rexplan.cli.rex import main
from rexplan.core.manifest import load
from rexplan.core.model import Host, User
from rexplan.core.plan import compile as compile_plan
from rexplan.engine.adhoc import adhoc_manifest
from rexplan.engine.endpoints import callback_endpoints
from rexplan.errors import ManifestError, TransportError, UnreachableError
from rexplan.transport import route as route_mod
from rexplan.transport import scan as scan_mod
from rexplan.transport.bastion import auth_kwargs
from rexplan.transport.pool import connect
from rexplan.transport.route import Hop, route

VERBOSE = "100:30:200"  # a rig MaxStartups that also turns on LogLevel VERBOSE


# --- manifest checks (no sshd) ----------------------------------------------------------------


def _errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load(str(path))
    return [d.format() for d in info.value.diagnostics]


def test_ssh_options_other_than_the_applied_ones_are_rejected_at_line_and_column(
    tmp_path: Path,
) -> None:
    text = (
        "rex: 1\n"
        "users:\n"
        "  app:\n"
        "    ssh_options:\n"
        "      port: '2222'\n"
        "      StrictHostKeyChecking: 'no'\n"
        "      ConnectTimeout: soon\n"
        "      PORT: '22'\n"
    )
    found = _errors(tmp_path, text)
    assert any(
        ":6:7:" in e
        and "StrictHostKeyChecking" in e
        and "HostName, Port, User, IdentityFile, IdentitiesOnly, ProxyJump, ConnectTimeout" in e
        for e in found
    ), found
    assert any(":7:23:" in e and "ConnectTimeout is a whole number" in e for e in found), found
    # one of the two spellings of Port is reported as repeating the other
    assert any(
        (":8:7:" in e and "repeats 'port'" in e) or (":5:7:" in e and "repeats 'PORT'" in e)
        for e in found
    ), found
    assert len(found) == 3, found


def test_bad_jumps_and_jump_loops_are_rejected(tmp_path: Path) -> None:
    text = (
        "rex: 1\nusers: {app: {}}\n"
        "hosts:\n"
        "  a: {jump: 'ssh://b'}\n"
        "  b: {jump: c}\n"
        "  c: {jump: b}\n"
        "  d: {jump: 'x@y:99999'}\n"
    )
    found = _errors(tmp_path, text)
    assert any(":4:13:" in e and "ssh:// URIs are not supported" in e for e in found), found
    assert any("jump loop" in e for e in found), found
    assert any(":7:13:" in e and "not a port" in e for e in found), found


def test_a_jump_naming_a_manifest_host_goes_through_its_own_bastions(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "rex: 1\nusers: {app: {}}\n"
        "hosts:\n"
        "  outer: {address: 10.0.0.1, port: 2022}\n"
        "  inner: {jump: outer}\n"
        "  db: {address: 10.1.0.5, jump: 'inner,ops@gw:22'}\n"
    )
    m = load(str(path))
    assert m.host("inner").jump == "10.0.0.1:2022"
    assert m.host("db").jump == "10.0.0.1:2022,inner,ops@gw:22"
    assert (m.host("db").address_set, m.host("db").port_set) == (True, False)


# --- route resolution (ssh_config files of the test's own) ------------------------------------


@pytest.fixture
def ssh_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Write the ssh_config rex reads ($REX_SSH_CONFIG): never root's own ~/.ssh/config."""
    path = tmp_path / "ssh_config"
    monkeypatch.setenv(route_mod.ENV, str(path))

    def write(text: str) -> Path:
        path.write_text(text)
        return path

    return write


def test_ssh_config_fills_what_the_manifest_leaves_unset(
    ssh_config: Callable[[str], Path],
) -> None:
    ssh_config(
        "Host web*\n  HostName 192.0.2.7\n  Port 2200\n  User deploy\n"
        "  IdentityFile ~/.ssh/web_key\n  IdentitiesOnly yes\n  ConnectTimeout 3\n"
        "  ProxyJump ops@gw1:2022,gw2\n"
        "Host gw2\n  HostName 198.51.100.2\n  User jumper\n  IdentityFile /k/gw2\n"
        "Host gw1\n  ProxyJump edge\n"
    )
    alias = Host("web1", "web1", address_set=False, port_set=False)
    user = User("app", "app", login_set=False)
    r = route(alias, user)
    t = r.target
    assert (t.address, t.port, t.login, t.identities_only, t.connect_timeout) == (
        "192.0.2.7",
        2200,
        "deploy",
        True,
        3.0,
    )
    assert t.identities == (str(Path("~/.ssh/web_key").expanduser()),)
    # gw1's own ProxyJump (edge) comes first, as OpenSSH's ssh -W to gw1 would follow it
    assert [(h.address, h.port, h.login) for h in r.jumps] == [
        ("edge", 22, "deploy"),
        ("gw1", 2022, "ops"),
        ("198.51.100.2", 22, "jumper"),
    ]
    assert r.jumps[2].identities == ("/k/gw2",)
    assert r.jumps[0].identities == t.identities  # a hop without IdentityFile: the target's

    # the manifest's explicit values win, then the user's ssh_options, then ssh_config
    explicit = Host("web1", "10.9.9.9", 22, jump="none")
    opts = User(
        "app",
        "app",
        ssh_options=(("port", "2300"), ("USER", "optuser"), ("ProxyJump", "gw2")),
        login_set=False,
    )
    r = route(explicit, opts)
    assert (r.target.address, r.target.port, r.target.login, r.jumps) == (
        "10.9.9.9",
        22,
        "optuser",
        (),
    )
    r = route(alias, opts)
    assert (r.target.address, r.target.port) == ("192.0.2.7", 2300)
    assert [h.address for h in r.jumps] == ["198.51.100.2"]
    r = route(alias, User("app", "named", identity="/k/mine"))
    assert (r.target.login, r.target.identities, r.target.identities_only) == (
        "named",
        ("/k/mine",),
        True,
    )


# --- a bastion in front of two targets (real sshds) -------------------------------------------


class Fleet:
    def __init__(self, rig: SshdRig, bastion: RigHost, targets: list[RigHost]) -> None:
        self.rig = rig
        self.bastion = bastion
        self.targets = targets

    def accepted(self, host: RigHost) -> int:
        return self.rig.log_text(host).count("Accepted publickey")

    def connections(self, host: RigHost) -> int:
        return self.rig.log_text(host).count("Connection from")


@pytest.fixture
def fleet(fresh_sshd: Callable[..., RigHost], sshd_rig: SshdRig) -> Fleet:
    fleet = Fleet(sshd_rig, fresh_sshd(VERBOSE), [fresh_sshd(VERBOSE), fresh_sshd(VERBOSE)])
    # the rig's readiness probe (a TCP connect, closed at once) is logged a moment later
    end = time.monotonic() + 10
    for h in (fleet.bastion, *fleet.targets):
        while "kex_exchange_identification" not in sshd_rig.log_text(h):
            assert time.monotonic() < end, sshd_rig.log_text(h)
            time.sleep(0.01)
    return fleet


@pytest.fixture
def dialled(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Every (address, port) this process opened a TCP connection to."""
    seen: list[tuple[str, int]] = []
    real = socket.create_connection

    def spy(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        seen.append((str(address[0]), int(address[1])))
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    yield seen


def _fleet_manifest(world: World, fleet: Fleet, **edit: Any) -> Path:
    on = [t.name for t in fleet.targets]
    path = world.manifest(fleet.targets, {"svc": {**SLEEPER, "on": on}})
    doc = json.loads(path.read_text())
    for name, spec in edit.get("hosts", {}).items():
        doc["hosts"][name].update(spec)
    doc["users"][world.user].update(edit.get("user", {}))
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


@pytest.mark.parametrize("pin", ["missing", "changed"])
def test_an_unpinned_bastion_is_never_logged_in_to_and_nothing_reaches_the_targets(
    world: World, fleet: Fleet, tmp_path: Path, dialled: list[tuple[str, int]], pin: str
) -> None:
    b = fleet.bastion
    jump = f"{b.address}:{b.port}"
    m = _fleet_manifest(world, fleet, hosts={t.name: {"jump": jump} for t in fleet.targets})
    # the rig's known_hosts without the bastion's line, or pinning another key for it
    known = tmp_path / "known_hosts"
    name = f"[{b.address}]:{b.port}"
    lines = Path(fleet.rig.known_hosts).read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(name + " ")]
    if pin == "changed":
        kept.append(f"{name} {fleet.targets[0].host_key}\n")
    known.write_text("".join(kept))
    # the rig's own readiness probe connected once to each sshd
    before = {h.name: fleet.connections(h) for h in (b, *fleet.targets)}
    events = tmp_path / "events.jsonl"
    argv = ["apply", str(m), "-y", "--keys", str(world.keys), "--known-hosts", str(known)]
    code = main([*argv, "--events", str(events)])
    out, err = world.capsys.readouterr()
    assert code != 0
    assert events.exists(), out + err
    steps = [json.loads(line) for line in events.read_text().splitlines()]
    final = {e["step"]: e for e in steps if e["kind"] == "step"}
    assert len(final) == 2
    words = "unknown host key" if pin == "missing" else "host key CHANGED"
    for step in final.values():
        assert step["state"] != "ready"
        assert step["reason"] == "host_key", step
        assert f"bastion {jump}" in step["detail"] and words in step["detail"], step
    assert fleet.connections(b) > before[b.name]  # dialled: its key was read, and refused
    assert fleet.accepted(b) == 0
    for t in fleet.targets:
        log = fleet.rig.log_text(t)
        assert fleet.connections(t) == before[t.name] and fleet.accepted(t) == 0, log
    assert {a for a in dialled if a[0].startswith("127.0.0.")} <= {(b.address, b.port)}


def test_apply_distribute_and_stop_go_through_one_pinned_bastion_connection(
    world: World, fleet: Fleet, dialled: list[tuple[str, int]]
) -> None:
    b = fleet.bastion
    # the bastion from the user's ssh_options, the targets explicit in the manifest
    m = _fleet_manifest(
        world,
        fleet,
        user={"ssh_options": {"proxyjump": f"{fleet.rig.login}@{b.address}:{b.port}"}},
    )
    world.distribute(m)
    # the remote audit reads the keys distribute put on the targets, through the bastion
    code, out, err = world.rex("audit", str(m), "--remote", "--json")
    assert code == 0, out + err
    rows = json.loads(out)["rows"]
    assert len(rows) == 2 and {r["state"] for r in rows} == {"OK"}, rows
    before = fleet.accepted(b)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    assert set(run.states().values()) == {"ready"}
    assert len(run.pids()) == 2
    # both targets' connections went through ONE login to the bastion
    assert fleet.accepted(b) == before + 1
    for t in fleet.targets:
        assert fleet.accepted(t) >= 3  # distribute, audit, apply
    code, steps = world.status(m)
    assert code == 0 and {s["status"] for s in steps.values()} == {"running"}, steps
    code, out, err = world.rex("stop", str(m))
    assert code == 0, out + err
    assert not world.tagged()
    targets = {(t.address, t.port) for t in fleet.targets}
    assert not targets & set(dialled), "the launcher dialled a target itself"
    assert (b.address, b.port) in dialled


def test_hostkeys_scan_reaches_targets_through_the_bastion_only_once_it_is_pinned(
    world: World, fleet: Fleet, tmp_path: Path
) -> None:
    b = fleet.bastion
    m = _fleet_manifest(
        world, fleet, hosts={t.name: {"jump": f"{b.address}:{b.port}"} for t in fleet.targets}
    )
    known = tmp_path / "pins"
    known.write_text("")
    code = main(["hostkeys", "scan", "-m", str(m), "--known-hosts", str(known)])
    out, _ = world.capsys.readouterr()
    assert code == 3, out  # the targets are not reached: the bastion is not pinned
    assert "bastion of" in out and "not pinned" in out
    assert fleet.accepted(b) == 0 and known.read_text() == ""
    code = main(["hostkeys", "scan", "-m", str(m), "--known-hosts", str(known), "--accept"])
    out, _ = world.capsys.readouterr()
    assert code == 0, out
    assert "recorded 3 new host keys" in out
    pinned = known.read_text()
    for h in (b, *fleet.targets):
        assert f"[{h.address}]:{h.port} {h.host_key}" in pinned
    code = main(["hostkeys", "verify", "-m", str(m), "--known-hosts", str(known)])
    out, _ = world.capsys.readouterr()
    assert code == 0, out
    # a rebuilt bastion: its CHANGED key is refused, then replaced by name
    label = f"{b.address}:{b.port}"
    name = f"[{b.address}]:{b.port}"
    bad = fleet.targets[0].host_key
    known.write_text(pinned.replace(f"{name} {b.host_key}", f"{name} {bad}"))
    logins = fleet.accepted(b)
    code = main(["hostkeys", "scan", "-m", str(m), "--known-hosts", str(known)])
    out, _ = world.capsys.readouterr()
    assert code == 6, out
    assert f"bastion {label}: host key CHANGED" in out and f"--replace {label}" in out
    assert fleet.accepted(b) == logins  # no login to a bastion whose key changed
    argv = ["hostkeys", "scan", "-m", str(m), "--known-hosts", str(known), "--replace", label]
    code = main(argv)
    out, _ = world.capsys.readouterr()
    assert code == 0, out
    assert f"{name} {b.host_key}" in known.read_text()
    assert f"{name} {bad}" not in known.read_text()
    code = main(["hostkeys", "verify", "-m", str(m), "--known-hosts", str(known)])
    out, _ = world.capsys.readouterr()
    assert code == 0, out


def test_an_alias_only_manifest_is_reached_through_ssh_config(
    world: World, fleet: Fleet, ssh_config: Callable[[str], Path], dialled: list[tuple[str, int]]
) -> None:
    b, (t1, t2) = fleet.bastion, fleet.targets
    rig = fleet.rig
    text = "".join(
        f"Host {alias}\n  HostName {h.address}\n  Port {h.port}\n  User {rig.login}\n"
        f"  IdentityFile {rig.identity}\n  IdentitiesOnly yes\n  ConnectTimeout 5\n"
        + ("  ProxyJump bast\n" if alias != "bast" else "")
        for alias, h in (("bast", b), ("app1", t1), ("app2", t2))
    )
    ssh_config(text)
    # the "run" job: its keys (host.user.run) are those rex run proves itself with
    run_job = {"on": ["app1", "app2"], "kind": "job", "run": ["true"]}
    path = world.manifest([], {"svc": {**SLEEPER, "on": ["app1", "app2"]}, "run": run_job})
    doc = json.loads(path.read_text())
    doc["hosts"] = {"app1": None, "app2": None}
    doc["users"] = {world.user: None}  # login, key, port and address: all from ssh_config
    path.write_text(json.dumps(doc) + "\n")
    world.hosts.update({"app1": t1, "app2": t2})
    argv = ["hostkeys", "verify", "-m", str(path), "--known-hosts", rig.known_hosts, "--json"]
    assert main(argv) == 0
    doc = json.loads(world.capsys.readouterr().out)
    assert [(h["host"], h["address"], h["port"], h["status"]) for h in doc["hosts"]] == [
        ("bast", b.address, b.port, "ok"),  # the bastion, as ProxyJump names it
        ("app1", t1.address, t1.port, "ok"),
        ("app2", t2.address, t2.port, "ok"),
    ]
    world.distribute(path)
    run = world.apply(path)
    assert run.code == 0, run.out + run.err
    assert set(run.states()) == {"svc@app1", "svc@app2", "run@app1", "run@app2"}
    assert set(run.states().values()) <= {"ready", "succeeded"}, run.states()
    code, out, err = world.rex("run", "*", "-m", str(path), "--json", "--", "hostname")
    assert code == 0, out + err
    assert [h["host"] for h in json.loads(out)["hosts"]] == ["app1", "app2"]
    assert {(t.address, t.port) for t in fleet.targets}.isdisjoint(dialled)
    code, out, err = world.rex("stop", str(path))
    assert code == 0, out + err


def test_a_hosts_user_is_who_programs_naming_none_run_as_there(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    text = (
        "rex: 1\ndefaults: {user: app}\n"
        "users: {app: {}, deploy: {login: ubuntu}}\n"
        "hosts:\n  web1: {address: 10.0.0.1, user: deploy}\n  web2: {address: 10.0.0.2}\n"
        "programs:\n"
        "  svc: {run: [x], on: [web1, web2]}\n"
        "  pinned: {run: [x], on: [web1, web2], user: app}\n"
        "authorize: ['*.*.*']\n"
    )
    path.write_text(text)
    plan = compile_plan(load(str(path)))
    got = {s.id: (s.user, s.login, s.triple) for s in plan.steps}
    assert got == {
        "svc@web1": ("deploy", "ubuntu", "web1.deploy.svc"),
        "svc@web2": ("app", "app", "web2.app.svc"),
        # the program's own user wins over the host's
        "pinned@web1": ("app", "app", "web1.app.pinned"),
        "pinned@web2": ("app", "app", "web2.app.pinned"),
    }
    # with no defaults.user and two users, hosts.*.user alone is enough
    path.write_text(text.replace("defaults: {user: app}\n", "").replace("user: app}", "}"))
    path.write_text(path.read_text().replace("web2: {address: 10.0.0.2}", "web2: {user: app}"))
    plan = compile_plan(load(str(path)))
    assert {s.id: s.user for s in plan.steps}["svc@web1"] == "deploy"
    # and its triples must be authorized like any other
    path.write_text(text.replace("authorize: ['*.*.*']", "authorize: ['*.app.*']"))
    found = _errors(tmp_path, path.read_text())
    assert any("web1.deploy.svc" in e for e in found), found


def test_tree_strategy_refuses_jumps_and_ssh_options(tmp_path: Path) -> None:
    text = (
        "rex: 1\nusers: {app: {ssh_options: {Port: '2222'}}}\n"
        "defaults: {strategy: tree, relay_identity: /k/relay}\n"
        "hosts: {a: {jump: gw}}\n"
    )
    found = _errors(tmp_path, text)
    assert any(":3:22:" in e and "cannot reach host 'a' through its jump" in e for e in found)
    assert any(":3:22:" in e and "does not apply users.app.ssh_options" in e for e in found)


def test_bad_ssh_config_values_are_transport_errors_naming_the_file(
    ssh_config: Callable[[str], Path],
) -> None:
    alias = Host("web1", "web1", address_set=False, port_set=False)
    user = User("app", "app")
    for text, words in (
        ("Host web1\n  Port abc\n", "'abc' is not a port"),
        ("Host web1\n  HostName -oProxyCommand=x\n", "HostName '-oProxyCommand=x' starts"),
        ("Host web1\n  ProxyJump ssh://gw\n", "ssh:// URIs are not supported"),
        ("Host web1\n  ProxyJump gw\nHost gw\n  ProxyJump web1\n", "ProxyJump loop"),
    ):
        path = ssh_config(text)
        with pytest.raises(TransportError) as info:
            route(alias, user)
        assert str(path) in str(info.value) and words in str(info.value)


def test_defaults_ssh_config_is_read_instead_of_the_environments(
    tmp_path: Path, ssh_config: Callable[[str], Path]
) -> None:
    ssh_config("Host web1\n  Port 1111\n")  # $REX_SSH_CONFIG: not read when the manifest names one
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ssh").write_text("Host web1\n  Port 2222\n  HostName 192.0.2.9\n")
    path = tmp_path / "m.yaml"
    path.write_text("rex: 1\ndefaults: {ssh_config: conf/ssh}\nusers: {app: {}}\nhosts: {web1: }\n")
    m = load(str(path))
    host = m.host("web1")
    assert host.ssh_config == str(tmp_path / "conf" / "ssh")
    r = route(host, m.user("app"))
    assert (r.target.address, r.target.port, r.target.login) == ("192.0.2.9", 2222, "app")


def test_an_unreachable_bastion_fails_each_host_behind_it_naming_the_bastion(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jump = f"127.0.0.1:{port}"
    for name in ("a", "b"):
        host = Host(name, "10.0.0.1", 22, jump=jump)
        with pytest.raises(UnreachableError) as info:
            connect(host, User("app", "app"), known_hosts=str(tmp_path / "none"))
        text = str(info.value)
        assert text == f"{name}: connect: bastion {jump}: connection refused by {jump}", text


def test_hosts_behind_a_bastion_call_back_on_the_route_to_the_bastion(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "rex: 1\nusers: {app: {}}\n"
        # a name only the bastion's resolver knows: rex must not resolve it here
        "hosts: {db: {address: db.internal.invalid, jump: '127.0.0.7:2222'}}\n"
        "programs: {p: {run: [x], on: db}}\nauthorize: ['*.*.*']\n"
    )
    m = load(str(path))
    bind, advertise = callback_endpoints(m, compile_plan(m))
    assert (bind, advertise("db.internal.invalid")) == ("127.0.0.1", "127.0.0.1")


def test_hostkeys_fetches_one_key_per_sshd_reached_directly(
    sshd_hosts: Callable[[int], list[RigHost]],
    sshd_rig: SshdRig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (h,) = sshd_hosts(1)
    calls: list[str] = []
    real = scan_mod.fetch_key

    def counted(host: Host, *args: Any, **kwargs: Any) -> Any:
        calls.append(host.name)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(scan_mod, "fetch_key", counted)
    path = tmp_path / "m.yaml"
    at = f"{{address: {h.address}, port: {h.port}}}"
    path.write_text(f"rex: 1\nusers: {{app: }}\nhosts: {{one: {at}, two: {at}}}\n")
    code = main(["hostkeys", "verify", "-m", str(path), "--known-hosts", sshd_rig.known_hosts])
    out, _ = capsys.readouterr()
    assert code == 0, out
    assert calls == ["one"]


def test_rex_run_without_user_runs_as_each_hosts_user(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "rex: 1\nusers: {app: {}, deploy: {login: ubuntu}}\n"
        "hosts: {web1: {user: deploy}, web2: {user: app}}\nauthorize: ['*.*.*']\n"
    )
    m = load(str(path))
    plan = compile_plan(adhoc_manifest(m, None, ["true"]))
    assert {s.host: (s.user, s.login) for s in plan.steps} == {
        "web1": ("deploy", "ubuntu"),
        "web2": ("app", "app"),
    }
    plan = compile_plan(adhoc_manifest(m, "app", ["true"]))
    assert {s.user for s in plan.steps} == {"app"}


def test_keys_offered_as_openssh_offers_them() -> None:
    def offered(identities: tuple[str, ...], only: bool) -> tuple[bool, bool, list[str]]:
        kw = auth_kwargs(Hop("h", "127.0.0.1", 22, "u", identities, only, None))
        return kw["look_for_keys"], kw["allow_agent"], kw.get("key_filename", [])

    missing = "/nonexistent/key"
    assert offered((), False) == (True, True, [])  # the agent and ~/.ssh defaults
    assert offered((), True) == (True, False, [])  # IdentitiesOnly: no agent
    assert offered((missing,), False) == (False, True, [missing])  # that key, and the agent
    assert offered((missing,), True) == (False, False, [missing])  # that key only
