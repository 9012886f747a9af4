"""Tree fan-out: the k-ary split, the relay program, and launches through relays on the rig."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers_procs as procs
import pytest
from helpers_world import SLEEPER, Hosts, Run, World
from hypothesis import given
from hypothesis import strategies as st
from sshrig import RigHost, SshdRig

from rexplan.core import manifest as manifests
from rexplan.core.model import Authorization, Host, Manifest, Program, Step, User
from rexplan.core.simulate import Subtree
from rexplan.engine import executor
from rexplan.engine import fanout as tree_module
from rexplan.engine.fanout import RelayError, TreeLauncher, split
from rexplan.errors import UsageError
from rexplan.remote.relay.client import EXIT_BAD_INPUT, Gate, classify, dropped
from rexplan.transport import base, pool
from rexplan.transport.pool import TransportPool
from rexplan.transport.shipping import (
    RELAY_BOOTSTRAP,
    RELAY_ENTRY,
    agent_name,
    bundle_sha,
    relay_bundle,
    relay_source,
    sources,
)

HOOKED = hasattr(executor, "TreeLauncher")
needs_hook = pytest.mark.skipif(not HOOKED, reason="the executor has no tree hook yet")


def shape(trees: list[Subtree] | tuple[Subtree, ...]) -> list[Any]:
    """``[host, [children...]]`` nested lists, easy to compare."""
    return [[t.host, shape(t.children)] if t.children else t.host for t in trees]


def names(n: int) -> list[str]:
    return [f"h{i}" for i in range(n)]


# --- the split ------------------------------------------------------------------------------


def test_split_at_the_boundaries_other_tree_launchers_hang_at() -> None:
    k = 2
    assert shape(split([], k)) == []
    assert shape(split(names(1), k)) == ["h0"]
    assert shape(split(names(k), k)) == ["h0", "h1"]  # N = k: no relay at all
    assert shape(split(names(k + 1), k)) == [["h0", ["h2"]], "h1"]
    # N = k^2 + 1: one relay gets one host more than the other; h0's share exceeds nothing
    assert shape(split(names(k * k + 1), k)) == [["h0", ["h2", "h3"]], ["h1", ["h4"]]]
    assert shape(split(names(10), 3)) == [
        ["h0", ["h3", "h4", "h5"]],
        ["h1", ["h6", "h7"]],
        ["h2", ["h8", "h9"]],
    ]
    # a share larger than k gets relays of its own
    assert shape(split(names(9), 2)) == [
        ["h0", [["h2", ["h4"]], ["h3", ["h5"]]]],
        ["h1", [["h6", ["h8"]], "h7"]],
    ]


def _walk(trees: tuple[Subtree, ...] | list[Subtree]) -> Iterator[Subtree]:
    for t in trees:
        yield t
        yield from _walk(t.children)


@given(n=st.integers(min_value=0, max_value=200), k=st.integers(min_value=2, max_value=9))
def test_split_is_a_balanced_k_ary_tree_over_every_host_once(n: int, k: int) -> None:
    hosts = names(n)
    trees = split(hosts, k)
    assert sorted(t.host for t in _walk(trees)) == sorted(hosts)
    assert len(trees) == min(k, n)
    for node in [Subtree("launcher", tuple(trees)), *_walk(trees)]:
        assert len(node.children) <= k
        sizes = [c.size for c in node.children]
        assert not sizes or max(sizes) - min(sizes) <= 1
        # a node hands hosts down only once all k of its children are taken
        assert all(not c.children for c in node.children) or len(node.children) == k
    depth = max((t.depth for t in trees), default=0)
    assert n <= sum(k**i for i in range(1, depth + 1))


# --- the relay program, without sshd ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "stderr", "expected"),
    [
        (255, b"Host key verification failed.\r\n", ("host_key", "hostkey")),
        (255, b"rex@h: Permission denied (publickey).\r\n", ("auth", "auth")),
        (255, b"ssh: connect to host h port 1: Connection refused\r\n", ("unreachable", "connect")),
        (255, b"Connection timed out during banner exchange\r\n", ("unreachable", "connect")),
        (255, b"something else\n", ("exec", "start")),
        (1, b"Permission denied\n", ("exec", "start")),  # the remote command's, not ssh's
    ],
)  # fmt: skip
def test_relay_classifies_ssh_failures(
    status: int, stderr: bytes, expected: tuple[str, str]
) -> None:
    assert classify(status, stderr) == expected


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (b"kex_exchange_identification: Connection closed by remote host\r\n"
         b"Connection closed by 127.0.0.10 port 2222\r\n", True),
        (b"kex_exchange_identification: read: Connection reset by peer\r\n"
         b"Connection reset by 127.0.0.10 port 2222\r\n", True),
        (b"ssh_exchange_identification: Connection closed by remote host\r\n", True),
        (b"Connection timed out during banner exchange\r\n", False),
        (b"ssh: connect to host h port 1: Connection refused\r\n", False),
        (b"Host key verification failed.\r\n", False),
        (b"rex@h: Permission denied (publickey).\r\n", False),
    ],
)  # fmt: skip
def test_relay_knows_a_max_startups_drop(stderr: bytes, expected: bool) -> None:
    assert dropped(255, stderr) is expected
    assert dropped(1, stderr) is False  # the remote command's own exit


def test_relay_gate_admits_its_limit_and_learns_from_drops() -> None:
    gate = Gate(3)
    soon = time.monotonic() + 0.05
    assert [gate.acquire(soon) for _ in range(4)] == [True, True, True, False]
    gate.dropped()  # 3 in flight, one of them dropped: the sshd takes 2 at most
    gate.release()
    assert gate.limit == 2 and gate.in_flight == 2
    assert not gate.acquire(time.monotonic() + 0.05)
    gate.release()
    assert gate.acquire(time.monotonic() + 0.05)


def _relay_run(
    python: str, header: dict[str, Any], steps: list[dict[str, Any]], home: Path
) -> subprocess.CompletedProcess[bytes]:
    """The relay as a launcher runs it, on this machine, fed ``steps`` and EOF."""
    source = relay_source()
    sha = hashlib.sha256(source).hexdigest()
    agent = b"# not run\n"
    head = {
        **header,
        "agent": {"sha": hashlib.sha256(agent).hexdigest(), "name": "a.py", "missing": 20},
    }
    data = b"%d\n" % len(source) + source + (json.dumps(head) + "\n").encode()
    data += b"%d\n" % len(agent) + agent + b"".join((json.dumps(s) + "\n").encode() for s in steps)
    env = {"PATH": os.environ["PATH"], "REX_HOME": str(home)}
    argv = [python, "-I", "-S", "-c", RELAY_BOOTSTRAP, sha, header["name"]]
    return subprocess.run(argv, input=data, capture_output=True, env=env, timeout=30, check=False)


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _old_python() -> str | None:
    import glob

    for candidate in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8"))):
        done = subprocess.run([candidate, "-I", "-S", "-c", "pass"], capture_output=True)
        if done.returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("python", ["current", "3.8"])
def test_relay_reports_a_child_it_cannot_reach_and_cleans_up(python: str, tmp_path: Path) -> None:
    exe = sys.executable if python == "current" else _old_python()
    if exe is None:
        pytest.skip("no Python 3.8 on this machine")
    port = _unused_port()  # nothing listens there: ssh is refused at once
    child = {
        "name": "c1",
        "address": "127.0.0.1",
        "port": port,
        "python": "python3",
        "known_hosts": [f"[127.0.0.1]:{port} ssh-ed25519 AAAA"],
    }
    identity = str(tmp_path / "none")
    header = {"name": "r0", "connect": 2, "identity": identity, "children": [child]}
    steps = [
        {"step": "p@c1", "host": "c1", "login": "nobody", "argv": ["python3", "-c", "pass"],
         "line": "{}\n", "timeout": 10, "connect": 2},
        {"step": "p@c9", "host": "c9", "login": "nobody", "argv": ["true"], "line": "{}\n",
         "timeout": 10, "connect": 2},
        {"kill": "p@c1", "host": "c1", "login": "nobody", "argv": ["true"], "timeout": 10,
         "connect": 2},
        {"kill": "p@c9", "host": "c9", "login": "nobody", "argv": ["true"], "timeout": 10,
         "connect": 2},
    ]  # fmt: skip
    done = _relay_run(exe, header, steps, tmp_path / "home")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    assert lines[0] == {"up": "r0"}
    final = {m["step"]: m for m in lines[1:] if "step" in m and "error" in m}
    kills = {m["killed"]: m for m in lines if "killed" in m}
    assert not kills["p@c1"]["ok"] and "Connection refused" in kills["p@c1"]["error"]
    assert not kills["p@c9"]["ok"] and "not below relay r0" in kills["p@c9"]["error"]
    assert final["p@c1"]["reason"] == "unreachable", final
    assert "Connection refused" in final["p@c1"]["error"]
    assert "not below relay r0" in final["p@c9"]["error"]
    # refused before it authenticated: its launch line never went out
    assert final["p@c1"]["launched"] is False
    assert {"step": "p@c1", "launched": True} not in lines
    assert list((tmp_path / "home").iterdir()) == []  # its known_hosts file is gone


def test_relay_refuses_a_damaged_agent(tmp_path: Path) -> None:
    source = relay_source()
    sha = hashlib.sha256(source).hexdigest()
    head = {"name": "r0", "agent": {"sha": "0" * 64}, "children": []}
    data = b"%d\n" % len(source) + source + (json.dumps(head) + "\n").encode() + b"3\nabc"
    argv = [sys.executable, "-I", "-S", "-c", RELAY_BOOTSTRAP, sha, "r0"]
    done = subprocess.run(argv, input=data, capture_output=True, timeout=30, check=False)
    assert done.returncode == EXIT_BAD_INPUT
    assert b"agent damaged in transit" in done.stderr
    bad = subprocess.run(argv, input=b"3\nabc", capture_output=True, timeout=30, check=False)
    assert bad.returncode == 16 and b"relay damaged in transit" in bad.stderr


#: the relay's modules, as its bundle carries them
RELAY_MODULES = sources("remote", skip=("agent", "stages"))


def test_relay_imports_only_the_standard_library() -> None:
    # the bundle's own code (its stages) and every module it carries
    imported = set()
    for text in [relay_source(), *(source for _, _, source in RELAY_MODULES)]:
        tree = ast.parse(text)
        imported |= {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
    relay = {name for name in imported if name.startswith("rexplan.remote.relay.")}
    assert {name.split(".")[0] for name in imported - relay} <= set(sys.stdlib_module_names), (
        imported
    )
    assert relay <= {name for name, _, _ in RELAY_MODULES}, relay


# --- the launcher side, without connecting ------------------------------------------------------


def _manifest(n: int, **fields: Any) -> Manifest:
    hosts = tuple(Host(f"n{i}", f"10.0.0.{i + 1}", 2200 + i) for i in range(n))
    program = Program("app", tuple(h.name for h in hosts), "app", run=("sleep", "9"))
    fields.setdefault("relay_identity", "~/.ssh/rex_relay")
    everything = (Authorization("*.*.*", "*", "*", "*"),)
    return Manifest(
        "m.yaml", "0" * 64, hosts, (User("app", "app"),), (program,), everything, **fields
    )


def _steps(m: Manifest) -> list[Step]:
    from rexplan.core import plan

    return list(plan.compile(m).steps)


@pytest.mark.parametrize(("n", "relayed"), [(1, []), (2, []), (3, ["n2"]), (5, ["n2", "n3", "n4"])])
def test_only_hosts_below_the_launchers_k_children_are_relayed(n: int, relayed: list[str]) -> None:
    m = _manifest(n, strategy="tree", fanout=2)
    with TransportPool(known_hosts=None) as pool:
        tree = TreeLauncher(m, _steps(m), pool, None, 2)
        assert [h.name for h in m.hosts if tree.relayed(h.name)] == relayed
        tree.close()  # nothing was started: nothing to end


def test_relay_header_pins_host_keys_and_holds_no_secret(tmp_path: Path) -> None:
    m = _manifest(5)
    known = tmp_path / "known_hosts"
    known.write_text(
        "[10.0.0.3]:2202 ssh-ed25519 AAAAC3three\n"
        "[10.0.0.4]:2203,other ssh-ed25519 AAAAC3four comment\n"
        "@revoked [10.0.0.5]:2204 ssh-ed25519 AAAAC3old\n"
    )
    with TransportPool(known_hosts=str(known)) as pool:
        tree = TreeLauncher(m, _steps(m), pool, str(known), 2)
        head = json.loads(tree.header("n0", tree.tree[0].children))
    assert head["name"] == "n0" and head["identity"] == "~/.ssh/rex_relay"
    assert head["agent"]["sha"] == bundle_sha()
    children = {c["name"]: c for c in head["children"]}
    assert set(children) == {"n2", "n3"}
    assert children["n2"]["known_hosts"] == ["[10.0.0.3]:2202 ssh-ed25519 AAAAC3three"]
    assert children["n3"]["known_hosts"] == ["[10.0.0.4]:2203 ssh-ed25519 AAAAC3four"]
    assert "relay" not in children["n2"]  # a leaf
    assert children["n2"]["max_startups"] == 10  # the relay paces its handshakes to it
    assert "key" not in json.dumps(head).replace("known_hosts", "")


def test_tree_refuses_what_relays_cannot_do() -> None:
    m = _manifest(3, relay_identity=None)
    with TransportPool(known_hosts=None) as pool, pytest.raises(UsageError) as info:
        TreeLauncher(m, _steps(m), pool, None, 2)
    assert "defaults.strategy: strategy: tree needs defaults.relay_identity" in str(info.value)


def test_manifest_strategy_fields() -> None:
    text = (
        "rex: 1\nusers: {app: {}}\nhosts: {web1: {}}\n"
        "programs: {app: {run: [x], on: web1}}\nauthorize: ['*.*.*']\n"
    )
    m = manifests.loads(text)
    assert (m.strategy, m.fanout, m.relay_identity) == ("flat", 4, None)
    tree = text.replace(
        "users:", "defaults: {strategy: tree, fanout: 3, relay_identity: /k}\nusers:"
    )
    m = manifests.loads(tree)
    assert (m.strategy, m.fanout, m.relay_identity) == ("tree", 3, "/k")


# --- through relays on the sshd rig --------------------------------------------------------------


@pytest.fixture
def relay_identity(sshd_rig: SshdRig) -> Iterator[str]:
    """The rig's client key, readable by the test account only, where relays find it."""
    account = sshd_rig.account(0)
    path = Path(account.home) / ".ssh" / f"rex_relay_{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(Path(sshd_rig.identity).read_bytes())
    os.chown(path, account.uid, account.gid)
    yield str(path)
    path.unlink()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the hosts the launcher opened SSH connections to."""
    opened: list[str] = []
    real = pool.connect

    def spy(host: Host, user: User, **kwargs: Any) -> base.Transport:
        opened.append(host.name)
        return real(host, user, **kwargs)

    monkeypatch.setattr(pool, "connect", spy)
    return opened


def tree_defaults(identity: str) -> dict[str, Any]:
    return {"strategy": "tree", "fanout": 2, "relay_identity": identity}


def _rig_manifest(rig: SshdRig, rig_hosts: list[RigHost], identity: str) -> Manifest:
    hosts = tuple(h.model_host() for h in rig_hosts)
    program = Program("echo", tuple(h.name for h in hosts), "app", run=("true",))
    everything = (Authorization("*.*.*", "*", "*", "*"),)
    user = rig.model_user(name="app")
    return Manifest(
        "m.yaml", "0" * 64, hosts, (user,), (program,), everything, relay_identity=identity
    )


def test_relays_run_the_launchers_command_on_the_hosts_below_them(
    sshd_rig: SshdRig, sshd_hosts: Hosts, relay_identity: str, connections: list[str]
) -> None:
    rig_hosts = sshd_hosts(5)
    m = _rig_manifest(sshd_rig, rig_hosts, relay_identity)
    steps = _steps(m)
    # echoes the line it was given inside a report, as an agent front would report
    argv = ["sh", "-c", 'read -r l; printf \'{"ok": true, "got": %s}\\n\' "$l"']
    with TransportPool(known_hosts=sshd_rig.known_hosts) as pool:
        tree = TreeLauncher(m, steps, pool, sshd_rig.known_hosts, 2)
        try:
            relayed = [s for s in steps if tree.relayed(s.host)]
            assert [s.host for s in relayed] == [h.name for h in rig_hosts[2:]]
            reports = [
                tree.launch(s, b'{"n": %d}\n' % i, 10, argv=argv) for i, s in enumerate(relayed)
            ]
        finally:
            tree.close()
    assert reports == [{"ok": True, "got": {"n": i}} for i in range(3)]
    assert sorted(connections) == [h.name for h in rig_hosts[:2]]


def test_a_relay_pins_host_keys_strictly(
    sshd_rig: SshdRig, sshd_hosts: Hosts, relay_identity: str, tmp_path: Path
) -> None:
    rig_hosts = sshd_hosts(3)
    m = _rig_manifest(sshd_rig, rig_hosts, relay_identity)
    steps = _steps(m)
    leaf = rig_hosts[2]
    pinned = Path(sshd_rig.known_hosts).read_text().splitlines()
    known = tmp_path / "known_hosts"  # the launcher knows its relays, not the host below
    known.write_text("".join(f"{x}\n" for x in pinned if f"[{leaf.address}]:" not in x))
    with TransportPool(known_hosts=sshd_rig.known_hosts) as pool:
        tree = TreeLauncher(m, steps, pool, str(known), 2)
        try:
            with pytest.raises(RelayError) as info:
                tree.launch(steps[2], b"{}\n", 10, argv=["true"])
        finally:
            tree.close()
    # refused before it authenticated: nothing was launched there
    assert (info.value.reason, info.value.phase, info.value.launched) == (
        "host_key",
        "hostkey",
        False,
    )
    assert "Host key verification failed" in str(info.value)


@needs_hook
@pytest.mark.parametrize("n", [2, 3, 5, 7], ids=["N=k", "N=k+1", "N=k^2+1", "relays-below-relays"])
def test_tree_apply_verifies_every_step_connecting_only_to_the_relays(
    n: int, world: World, sshd_hosts: Hosts, relay_identity: str, connections: list[str]
) -> None:
    hosts = sshd_hosts(n)
    m = world.manifest(
        hosts,
        {"app": {"on": [h.name for h in hosts], **SLEEPER}},
        defaults=tree_defaults(relay_identity),
    )
    world.distribute(m)
    homes = [Path(h.state_dir_for(world.rig.login)) for h in hosts[2:]]
    for home in homes:  # relays install the agent where it is missing
        for path in home.glob("agent-*"):
            path.unlink()
    first = world.apply(m)
    assert first.code == 0, first.out + first.err
    for home in homes:
        assert (home / agent_name()).stat().st_mode & 0o777 == 0o600
    assert {e["state"] for e in first.final().values()} == {"ready"}
    assert len(first.final()) == n
    assert sorted(set(connections)) == sorted(h.name for h in hosts[:2])
    # every program runs, verified by its callback: one pid each, on every host
    assert set(first.pids()) == {f"app@{h.name}" for h in hosts}
    connections.clear()
    again = world.apply(m)
    assert again.code == 0, again.out + again.err
    assert set(again.actions().values()) == {"unchanged"}
    assert sorted(set(connections)) == sorted(h.name for h in hosts[:2])
    code, _, err = world.rex("stop", str(m))
    assert code == 0, err


@needs_hook
def test_flat_fallback_on_a_tree_manifest(
    world: World, sshd_hosts: Hosts, relay_identity: str, connections: list[str]
) -> None:
    hosts = sshd_hosts(3)
    m = world.manifest(
        hosts,
        {"app": {"on": [h.name for h in hosts], **SLEEPER}},
        defaults=tree_defaults(relay_identity),
    )
    world.distribute(m)
    run = world.apply(m, "--strategy", "flat")
    assert run.code == 0, run.out + run.err
    assert {e["state"] for e in run.final().values()} == {"ready"}
    assert sorted(set(connections)) == sorted(h.name for h in hosts)
    code, _, err = world.rex("stop", str(m))
    assert code == 0, err


def _relay_pid(host: str) -> int | None:
    """The relay process serving ``host``, by its argv tag (BOOTSTRAP, sha, host name)."""
    for pid in procs.pids():
        argv = procs.cmdline(pid)
        if RELAY_BOOTSTRAP in argv and argv[-1] == host and procs.alive(pid):
            return pid
    return None


def _children(pid: int) -> list[int]:
    out = []
    for p in procs.pids():
        try:
            fields = Path(f"/proc/{p}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and procs.alive(p):
            out.append(p)
    return out


def _wait(what: Callable[[], Any], timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = what()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@needs_hook
def test_relay_killed_mid_boot_fails_its_subtree_relay_lost(
    world: World,
    sshd_rig: SshdRig,
    sshd_hosts: Hosts,
    fresh_sshd: Callable[..., RigHost],
    relay_identity: str,
) -> None:
    shared = sshd_hosts(3)
    below = [fresh_sshd(), fresh_sshd()]
    # split([a, b, c, d, e], 2): a relays c and d, b relays e
    hosts = [shared[0], shared[1], below[0], below[1], shared[2]]
    timeouts = {"connect": 2, "start": 2, "callback": 2, "ready": 2}
    defaults = {**tree_defaults(relay_identity), "timeouts": timeouts}
    m = world.manifest(
        hosts, {"app": {"on": [h.name for h in hosts], **SLEEPER}}, defaults=defaults
    )
    world.distribute(m)
    for host in below:
        sshd_rig.pause(host)  # the relay's ssh to them hangs before the banner: mid-boot
    runs: list[Run] = []
    thread = threading.Thread(target=lambda: runs.append(world.apply(m)))
    thread.start()
    try:
        pid = _wait(lambda: _relay_pid(shared[0].name))
        ssh = _wait(lambda: len(_children(pid)) >= 2 and _children(pid))
        os.kill(pid, signal.SIGKILL)
    finally:
        thread.join()
    run = runs[0]
    final = run.final()
    assert {s: e["state"] for s, e in final.items()} == {
        f"app@{shared[0].name}": "ready",
        f"app@{shared[1].name}": "ready",
        f"app@{shared[2].name}": "ready",
        f"app@{below[0].name}": "failed",
        f"app@{below[1].name}": "failed",
    }, final
    for host in below:
        assert final[f"app@{host.name}"]["reason"] == "relay_lost"
        assert f"relay {shared[0].name} lost" in final[f"app@{host.name}"]["detail"]
    assert run.code == 2
    # the dead relay's ssh clients give up by their ConnectTimeout: nothing stays behind
    _wait(lambda: not any(procs.alive(p) for p in ssh), timeout=10)
    for host in below:
        sshd_rig.resume(host)
    home = Path(shared[0].state_dir_for(sshd_rig.login))
    left = list(home.glob(".relay-*"))  # SIGKILL left its temporary known_hosts (public keys)
    assert [sorted(p.name for p in d.iterdir()) for d in left] == [["known_hosts"]]
    for d in left:
        shutil.rmtree(d)
    code, _, err = world.rex("stop", str(m))
    assert code == 0, err


#: what sshd logs when it turns a connection away past MaxStartups (the rig's sshd logs at
#: VERBOSE when spawned with max_startups, so every drop is there)
DROP_LINES = ("drop connection", "beginning MaxStartups throttling")


@needs_hook
@pytest.mark.parametrize("max_startups", [2, 10], ids=["paced", "retried"])
def test_a_storm_through_a_relay_is_paced_by_max_startups(
    world: World,
    sshd_rig: SshdRig,
    sshd_hosts: Hosts,
    fresh_sshd: Callable[..., RigHost],
    relay_identity: str,
    max_startups: int,
) -> None:
    # the relay on the launcher's first child launches six steps (and the agent's install)
    # on one sshd that drops every connection past two unauthenticated ones
    hosts = [*sshd_hosts(2), fresh_sshd(max_startups="2:100:2")]
    leaf = hosts[2]
    programs = {"app": {"on": [h.name for h in hosts], **SLEEPER}}
    programs.update({f"p{i}": {"on": [leaf.name], **SLEEPER} for i in range(1, 6)})
    timeouts = {"connect": 20, "start": 5, "callback": 5, "ready": 3}
    defaults = {**tree_defaults(relay_identity), "timeouts": timeouts, "max_startups": max_startups}
    m = world.manifest(hosts, programs, defaults=defaults)
    world.distribute(m)
    log_before = len(sshd_rig.log_text(leaf).splitlines())
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    states = {s: e["state"] for s, e in run.final().items()}
    assert set(states.values()) == {"ready"}, run.final()
    assert sorted(s for s in states if s.endswith(f"@{leaf.name}")) == sorted(
        [f"app@{leaf.name}", *(f"p{i}@{leaf.name}" for i in range(1, 6))]
    )
    drops = [
        line
        for line in sshd_rig.log_text(leaf).splitlines()[log_before:]
        if any(d in line for d in DROP_LINES)
    ]
    if max_startups == 2:
        # paced to the sshd's real limit: not one handshake dropped
        assert not drops, drops
    code, _, err = world.rex("stop", str(m))
    assert code == 0, err


@needs_hook
def test_an_interrupted_tree_run_kills_its_relayed_steps_through_the_relays(
    world: World, sshd_rig: SshdRig, sshd_hosts: Hosts, relay_identity: str, tmp_path: Path
) -> None:
    # split(7 hosts, 2) = [h0, [[h2, [h4]], h3]], [h1, [h5, h6]]: h4 is two relays down
    hosts = sshd_hosts(7)
    never = {"file": f"/nonexistent/rex-never-{world.tag}", "timeout": 60}
    m = world.manifest(
        hosts,
        {"slow": {"on": [h.name for h in hosts], "run": ["sleep", "300"], "ready": never}},
        defaults={
            **tree_defaults(relay_identity),
            "timeouts": {"connect": 5, "start": 5, "callback": 5, "ready": 60},
        },
    )
    world.distribute(m)
    events = tmp_path / "events.jsonl"
    argv = [sys.executable, "-c", "import sys; from rexplan.cli.rex import main; sys.exit(main())"]
    argv += ["apply", str(m), "-y", "--keys", str(world.keys)]
    argv += ["--known-hosts", sshd_rig.known_hosts, "--events", str(events)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "NO_COLOR": "1"}
    launcher = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        # every program runs, its agent probing for a file that never comes (for 60 s)
        end = time.monotonic() + 60
        while not all(world.tagged(h.name, "slow") for h in hosts):
            if launcher.poll() is not None or time.monotonic() > end:
                launcher.kill()
                said = launcher.communicate()[0].decode(errors="replace")
                raise AssertionError(f"not every program started: {said} {events.read_text()}")
            time.sleep(0.05)
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 130, out.decode(errors="replace")
    # killed through the relays, long before the agents' own 60 s ready deadline
    for host in hosts:
        _wait(lambda host=host: not world.tagged(host.name, "slow"), timeout=20)


def _lying_relay(lies: dict[str, dict[str, Any]]) -> bytes:
    """The relay, its node module patched: the relay named in ``lies`` answers its first step
    request with "unchanged" reports for the steps ``others`` (none of its subtree), then, with
    ``own``, claims every step it is sent unchanged without launching it (else launches it)."""
    source = next(source for name, _, source in RELAY_MODULES if name == RELAY_ENTRY)
    anchor = '''        leads to it."""\n'''
    lie = (
        "        lies = _LIES.get(self.name)\n"
        "        if lies is not None and 'kill' not in msg:\n"
        "            said = {'ok': True, 'unchanged': True, 'pid': 4242}\n"
        "            for step in lies.pop('others', []):\n"
        "                self.emit({'step': step, 'report': said})\n"
        "            if lies['own']:\n"
        "                self.emit({'step': msg['step'], 'report': said})\n"
        "                return\n"
    )
    assert source.count(anchor) == 1
    source = source.replace(anchor, anchor + lie).replace(
        "\nclass Relay:", f"\n_LIES = {lies!r}\n\n\nclass Relay:"
    )
    return relay_bundle(
        tuple(
            (name, path, source if name == RELAY_ENTRY else text)
            for name, path, text in RELAY_MODULES
        )
    )


@needs_hook
def test_relays_cannot_settle_steps_unchanged_nor_answer_outside_their_subtree(
    world: World,
    sshd_hosts: Hosts,
    relay_identity: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # split(7 hosts, 2) = [h0, [[h2, [h4]], h3]], [h1, [h5, h6]]
    hosts = sshd_hosts(7)
    h = [x.name for x in hosts]
    m = world.manifest(hosts, {"app": {"on": h, **SLEEPER}}, defaults=tree_defaults(relay_identity))
    world.distribute(m)
    lies = {
        # a relay below a relay: its own subtree's step (h4), a sibling's (h3) and a step of
        # the other top relay's subtree (h6), all "unchanged"
        h[2]: {"own": True, "others": [f"app@{h[3]}", f"app@{h[6]}"]},
        # one of the launcher's own children: honest with its subtree, lying about h5
        h[0]: {"own": False, "others": [f"app@{h[5]}"]},
    }
    monkeypatch.setattr(tree_module, "relay_source", lambda: _lying_relay(lies))
    run = world.apply(m)
    final = run.final()
    # the step below the lying relay is neither unchanged nor ready: no agent proved anything
    lied = final[f"app@{h[4]}"]
    assert (lied["state"], lied["reason"]) == ("failed", "no_callback"), lied
    assert f"relay {h[0]} > {h[2]} reported it unchanged" in lied["detail"], lied
    # every other step was launched and verified by its own agent
    assert {s: e["state"] for s, e in final.items() if s != f"app@{h[4]}"} == {
        f"app@{x}": "ready" for x in h if x != h[4]
    }, final
    assert run.code != 0
    notices = [e["detail"] for e in run.events if e["kind"] == "notice"]
    expected = [
        f"relay {h[2]} sent a line for 'app@{h[3]}', a step outside its subtree: dropped",
        f"relay {h[2]} sent a line for 'app@{h[6]}', a step outside its subtree: dropped",
        f"relay {h[0]} sent a line for 'app@{h[5]}', outside its subtree: dropped",
        f"app@{h[4]}: relay {h[0]} > {h[2]} reported it unchanged without its agent's proof",
    ]
    for text in expected:
        assert any(text in n for n in notices), (text, notices)
    # the honest relays, on a re-apply: every running program is unchanged, proven by its
    # agent through them (the step the liar left unlaunched now starts)
    monkeypatch.undo()
    again = world.apply(m)
    assert again.code == 0, again.out + again.err
    actions = again.actions()
    assert actions.pop(f"app@{h[4]}") == "started", again.final()
    assert set(actions.values()) == {"unchanged"}, again.final()
    code, _, err = world.rex("stop", str(m))
    assert code == 0, err
