"""Issue 18 parts 1-3 over real sshds: templated argv and config files on 4 hosts, a changed
host var restarting exactly its step, REX_HOST/INDEX/COUNT and the login environment."""

from __future__ import annotations

import json
import pwd
import random
from collections.abc import Iterator
from pathlib import Path

import helpers_procs as procs
import pytest
from helpers_world import Hosts, World, nothing_left

SERVER = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.bind((sys.argv[1], int(sys.argv[2])))\n"
    "s.listen()\n"
    "time.sleep(300)\n"
)
CONF = (
    "upstream web {\n"
    "{% for a in programs.web.addresses %}"
    "  server {{ a }}:{{ vars.base_port + loop.index0 }};\n"
    "{% endfor %}}\n"
    "listen {{ address }}:{{ vars.base_port + index }};  # ${#x} stays\n"
)


@pytest.fixture(autouse=True)
def _nothing_left_running(tag: str) -> Iterator[None]:
    yield
    nothing_left(lambda env: env.get("REXTEST") == tag)


Vars = dict[str, object]


def _with_vars(path: Path, defaults: Vars, hosts: dict[str, Vars]) -> None:
    doc = json.loads(path.read_text())
    doc["defaults"]["vars"] = defaults
    for name, values in hosts.items():
        doc["hosts"][name]["vars"] = values
    path.write_text(json.dumps(doc, indent=2) + "\n")


def test_one_web_program_on_four_hosts_gets_its_place_and_a_rendered_config(
    world: World, sshd_hosts: Hosts
) -> None:
    hosts = sshd_hosts(4)
    names = [h.name for h in hosts]
    base = random.randrange(20000, 40000)
    (world.tmp / "web.conf.j2").write_text(CONF)
    m = world.manifest(
        hosts,
        {
            "web": {
                "on": names,
                "run": ["python3", "-c", SERVER, "{{ address }}", "{{ vars.base_port + index }}"],
                "env": {"WEIGHT": "{{ vars.weight }}"},
                "ready": {"tcp": {"host": "{{ address }}", "port": "{{ vars.base_port + index }}"}},
                "files": [{"src": "web.conf.j2", "dest": "conf/web.conf", "template": True}],
            }
        },
    )
    _with_vars(m, {"base_port": base, "weight": 1}, {names[2]: {"weight": 5}})
    world.distribute(m)
    first = world.apply(m)
    assert first.code == 0, first.out + first.err
    login = pwd.getpwnam(world.rig.login)
    upstream = "".join(f"  server {h.address}:{base + i};\n" for i, h in enumerate(hosts))
    for i, h in enumerate(hosts):
        (pid,) = world.tagged(h.name, "web")
        assert procs.cmdline(pid)[-2:] == [h.address, str(base + i)]
        env = procs.environ(pid)
        assert env["REX_HOST"] == h.name
        assert (env["REX_INDEX"], env["REX_COUNT"]) == (str(i), "4")
        assert env["WEIGHT"] == ("5" if i == 2 else "1")
        assert env["HOME"] == login.pw_dir
        assert env["USER"] == env["LOGNAME"] == login.pw_name
        assert env["SHELL"] == (login.pw_shell or "/bin/sh")
        triple = f"{h.name}.{world.user}.web"
        conf = Path(world.home(h.name), "files", triple, "conf", "web.conf").read_text()
        assert conf == (
            f"upstream web {{\n{upstream}}}\nlisten {h.address}:{base + i};  # ${{#x}} stays\n"
        )

    # one host's var changes: exactly that host's step restarts
    _with_vars(m, {"base_port": base, "weight": 1}, {names[2]: {"weight": 6}})
    second = world.apply(m)
    assert second.code == 0, second.out + second.err
    assert second.actions() == {
        f"web@{n}": ("restarted" if n == names[2] else "unchanged") for n in names
    }
    (pid,) = world.tagged(names[2], "web")
    assert procs.environ(pid)["WEIGHT"] == "6"
    assert world.rex("stop", str(m))[0] == 0


def test_env_wins_over_the_login_environment_and_env_clear_keeps_it_out(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    sleeper = {"run": ["sleep", "300"], "ready": {"alive": 0.2}}
    m = world.manifest(
        [host],
        {
            "mine": {**sleeper, "on": [host.name], "env": {"HOME": "/srv/mine"}},
            "bare": {**sleeper, "on": [host.name], "env_clear": True},
        },
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 0, run.out + run.err
    (mine,) = world.tagged(host.name, "mine")
    (bare,) = world.tagged(host.name, "bare")
    assert procs.environ(mine)["HOME"] == "/srv/mine"
    assert procs.environ(mine)["USER"] == world.rig.login
    env = procs.environ(bare)
    assert not {"HOME", "USER", "LOGNAME", "SHELL", "LANG"} & set(env)
    assert (env["REX_HOST"], env["REX_INDEX"], env["REX_COUNT"]) == (host.name, "0", "1")
    assert world.rex("stop", str(m))[0] == 0
