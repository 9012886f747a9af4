"""`rex import ansible`: inventories written as in Ansible's documentation become rex hosts."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexplan.cli import importer
from rexplan.cli import inventory as ansible
from rexplan.cli import rex as cli
from rexplan.core import manifest
from rexplan.core import plan as planner
from rexplan.errors import ManifestError

DATA = Path(__file__).resolve().parent / "data" / "ansible"
INVENTORIES = sorted(p.name for p in DATA.iterdir())


def hosts_of(name: str) -> dict[str, importer.ImportedHost]:
    path = DATA / name
    hosts, _notes = importer.convert(ansible.parse_inventory(path.read_text(), str(path)))
    return {h.name: h for h in hosts}


def wrap(hosts_yaml: str, users: set[str]) -> str:
    """The imported section in a minimal manifest: one program on every host."""
    declared = "".join(f"  {u}: {{}}\n" for u in sorted(users | {"ops"}))
    return (
        "rex: 1\n"
        + hosts_yaml
        + f"users:\n{declared}"
        + "programs:\n  agent: {on: ['*'], user: ops, run: [sleep, '60']}\n"
        + "authorize: ['*.*.*']\n"
    )


# --- ranges and host patterns (Ansible's inventory helpers) -------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("www[01:03].example.com", ["www01.example.com", "www02.example.com", "www03.example.com"]),
        ("db-[a:c].example.com", ["db-a.example.com", "db-b.example.com", "db-c.example.com"]),
        ("www[01:09:4]", ["www01", "www05", "www09"]),
        ("node[8:11]", ["node8", "node9", "node10", "node11"]),
        ("n[:2]", ["n0", "n1", "n2"]),
        ("r[1:2]-n[a:b]", ["r1-na", "r1-nb", "r2-na", "r2-nb"]),
        ("plain.example.com", ["plain.example.com"]),
    ],
)
def test_expand_range(pattern: str, expected: list[str]) -> None:
    assert ansible.expand_range(pattern) == expected


def test_the_documented_ranges_have_the_documented_sizes() -> None:
    assert len(ansible.expand_range("www[01:50].example.com")) == 50
    assert ansible.expand_range("www[01:50:2].example.com")[-1] == "www49.example.com"
    assert len(ansible.expand_range("db-[a:f].example.com")) == 6


@pytest.mark.parametrize(
    "pattern",
    [
        "web[01:5]",
        "web[5:1]",
        "web[f:a]",
        "web[1]",
        "web[1:2:3:4]",
        "web[1:]",
        "web[a:5]",
        "web[1:2",
        "web[1:9:0]",
        "web[0:99999999]",
    ],
)
def test_bad_ranges(pattern: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        ansible.expand_range(pattern)


@pytest.mark.parametrize(
    ("pattern", "names", "port"),
    [
        ("badwolf.example.com:5309", ["badwolf.example.com"], 5309),
        ("web[1:2]:2222", ["web1", "web2"], 2222),
        ("web[1:2]", ["web1", "web2"], None),
        ("192.0.2.50", ["192.0.2.50"], None),
    ],
)
def test_expand_hostpattern(pattern: str, names: list[str], port: int | None) -> None:
    assert ansible.expand_hostpattern(pattern) == (names, port)


# --- the documentation's inventories ------------------------------------------------------------


def test_groups_and_children() -> None:
    hosts = hosts_of("basic.ini")
    assert list(hosts) == [
        "mail.example.com",
        "foo.example.com",
        "bar.example.com",
        "one.example.com",
        "two.example.com",
        "three.example.com",
    ]
    assert hosts["mail.example.com"].groups == ()
    assert hosts["foo.example.com"].groups == ("webservers", "east", "prod")
    assert hosts["three.example.com"].groups == ("dbservers", "west", "test")


@pytest.mark.parametrize(("ini", "yaml"), [("basic.ini", "basic.yaml"), ("vars.ini", "vars.yaml")])
def test_ini_and_yaml_forms_give_the_same_hosts(ini: str, yaml: str) -> None:
    assert hosts_of(ini) == hosts_of(yaml)


def test_ranges_ports_and_aliases() -> None:
    hosts = hosts_of("ranges.ini")
    assert [h for h in hosts if h.startswith("www")] == [
        f"www0{i}.example.com" for i in range(1, 6)
    ]
    assert [h for h in hosts if h.startswith("node")] == [
        "node1",
        "node3",
        "node5",
        "node7",
        "node9",
    ]
    assert [h for h in hosts if h.startswith("db-")] == [f"db-{c}.example.com" for c in "abcdef"]
    assert [h for h in hosts if h.startswith("r")] == ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]
    assert hosts["badwolf.example.com"].port == 5309
    jumper = hosts["jumper"]
    assert (jumper.address, jumper.port, jumper.groups) == ("192.0.2.50", 5555, ("bastions",))


def test_variables_combine_as_in_ansible() -> None:
    hosts = hosts_of("vars.ini")
    # southeast's ansible_user and ansible_port reach host1 through atlanta; host2's own wins
    assert (hosts["host1"].user, hosts["host1"].port) == ("deploy", 2222)
    assert (hosts["host2"].user, hosts["host2"].port) == ("admin", 2222)
    assert hosts["host2"].groups == ("atlanta", "raleigh", "southeast", "usa")
    assert (hosts["host4"].address, hosts["host4"].port, hosts["host4"].user) == (
        "10.0.4.4",
        None,
        None,
    )
    assert hosts["localhost"].transport == "local"
    assert hosts["other1.example.com"].user == "myuser"
    assert hosts["other1.example.com"].transport is None
    assert hosts["other2.example.com"].user is None
    assert any(
        "'My.Other.User' is not a rex user name" in n for n in hosts["other2.example.com"].notes
    )
    assert any("winrm" in n for n in hosts["win1.example.com"].notes)


def test_deeper_groups_win_and_names_break_ties() -> None:
    inventory = """\
[a]
h1
[b]
h1
[parent:children]
a
[a:vars]
ansible_port=2201
[b:vars]
ansible_port=2202
ansible_user=bee
[parent:vars]
ansible_user=parent
ansible_host=10.9.9.9
"""
    (h1,), _ = importer.convert(ansible.parse_ini(inventory))
    # a (a child of parent) is deeper than b and parent, so its port wins over b's; b and
    # parent are one below all, and parent comes later by name, so its user wins over b's
    assert (h1.port, h1.user, h1.address) == (2201, "parent", "10.9.9.9")


def test_values_of_other_variables_never_appear() -> None:
    text = importer.import_ansible((DATA / "vars.ini").read_text(), "vars.ini")
    assert "hunter2" not in text
    assert "ansible_password" in text
    assert "ntp.atlanta.example.com" not in text
    assert "ntp_server" in text
    yaml_text = importer.import_ansible((DATA / "vars.yaml").read_text(), "vars.yaml")
    assert "ANSIBLE_VAULT" not in yaml_text


@pytest.mark.parametrize("name", INVENTORIES)
def test_the_output_loads_as_a_rex_manifest(name: str) -> None:
    path = DATA / name
    text = importer.import_ansible(path.read_text(), str(path))
    assert text.startswith("# rex hosts imported from ")
    users = {h.user for h in hosts_of(name).values() if h.user}
    loaded = manifest.loads(wrap(text, users), f"{name}.yaml")
    assert [h.name for h in loaded.hosts] == list(hosts_of(name))
    for host in loaded.hosts:
        imported = hosts_of(name)[host.name]
        assert host.address == (imported.address or host.name)
        assert host.port == (imported.port or 22)
        assert host.user == imported.user
        assert host.transport == (imported.transport or "ssh")
        assert host.groups == imported.groups
    assert len(planner.compile(loaded).steps) == len(loaded.hosts)


def test_names_rex_cannot_take_are_left_out_with_a_comment() -> None:
    inventory = """\
all:
  hosts:
    "-dash.example.com":
    "10.0.0.5":
    "true":
      ansible_host: "{{ lookup('env', 'IP') }}"
  children:
    WebServers:
      hosts:
        web1:
"""
    text = importer.import_ansible(inventory, "inv.yaml")
    assert "host '-dash.example.com' left out" in text
    assert "group 'WebServers' left out" in text
    assert "ansible_host" in text and "not converted" in text
    loaded = manifest.loads(wrap(text, set()), "wrapped.yaml")
    assert [(h.name, h.address, h.groups) for h in loaded.hosts] == [
        ("10.0.0.5", "10.0.0.5", ()),
        ("true", "true", ()),
        ("web1", "web1", ()),
    ]


@pytest.mark.parametrize("inventory", ["[empty]\n", "[bad]\n-dash\n"])
def test_an_inventory_without_hosts_gives_an_empty_section(inventory: str) -> None:
    text = importer.import_ansible(inventory, "inv.ini")
    assert "hosts: {}" in text
    loaded = manifest.loads(f"rex: 1\n{text}users: {{}}\nprograms: {{}}\n", "x.yaml")
    assert loaded.hosts == ()


@pytest.mark.parametrize(
    ("text", "source", "where"),
    [
        ("[web\nh1\n", "bad.ini", "bad.ini:1:1"),
        ("[web:other]\nh1\n", "bad.ini", "bad.ini:1:1"),
        ("[web]\nh1 port\n", "bad.ini", "bad.ini:2:1"),
        ("[web]\nh[1:2\n", "bad.ini", "bad.ini:2:1"),
        ("[web:vars]\nnovalue\n", "bad.ini", "bad.ini:2:1"),
        ("web: [\n", "bad.yaml", "bad.yaml:2:1"),
        ("- a\n- b\n", "bad.yaml", "bad.yaml:1:1"),
        ("web:\n  hosts: [h1]\n", "bad.yaml", "bad.yaml"),
        ("a:\n  children:\n    b:\n      children:\n        a:\n", "bad.yaml", "bad.yaml"),
    ],
)
def test_bad_inventories_name_the_place(text: str, source: str, where: str) -> None:
    with pytest.raises(ManifestError) as info:
        importer.convert(ansible.parse_inventory(text, source))
    assert str(info.value.diagnostics[0].format()).startswith(where + ":")


# --- the command --------------------------------------------------------------------------------


def test_the_command_prints_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["import", "ansible", str(DATA / "basic.ini")]) == 0
    out = capsys.readouterr().out
    assert "  foo.example.com: {groups: [webservers, east, prod]}\n" in out


def test_output_file_is_written_once_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hosts.yaml"
    assert cli.main(["import", "ansible", str(DATA / "basic.ini"), "-o", str(out)]) == 0
    first = out.read_text()
    assert "mail.example.com" in first
    assert capsys.readouterr().out == ""
    assert cli.main(["import", "ansible", str(DATA / "ranges.ini"), "-o", str(out)]) == 5
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == first
    assert cli.main(["import", "ansible", str(DATA / "ranges.ini"), "-o", str(out), "--force"]) == 0
    assert "jumper" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts.yaml"]


def test_unreadable_inventory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["import", "ansible", str(tmp_path / "missing.ini")]) == 4
    assert "cannot read the inventory" in capsys.readouterr().err


# --- hostile inventories (security issue, hole 5) ----------------------------------------------

#: characters YAML takes for a line break (PyYAML: YAML 1.1) besides \n and \r
YAML_BREAKS = "\x85\u2028\u2029"

#: a variable name that, written raw into a comment, ends the comment and adds a host whose
#: python is a file of the inventory author's choosing
SMUGGLER = """\
all:
  hosts:
    web1:
      "pw\\L  evil: {address: 127.0.0.1, python: /tmp/evil/python3}\\L#": 1
  children:
    "g\\Pevil2: {python: /tmp/evil/python3}\\N#":
      hosts:
        web2:
"""


def test_a_variable_name_cannot_smuggle_a_host_into_the_output() -> None:
    text = importer.import_ansible(SMUGGLER, "inv.yaml")
    assert not set(YAML_BREAKS) & set(text)
    loaded = manifest.loads(wrap(text, set()), "wrapped.yaml")
    assert [h.name for h in loaded.hosts] == ["web1", "web2"]
    assert {h.python for h in loaded.hosts} == {"python3"}
    # the names are still shown, as repr() with escapes, not dropped silently
    assert "'pw\\u2028  evil:" in text and "'g\\u2029evil2:" in text


_NAMES = st.text(min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    host_vars=st.lists(_NAMES, max_size=4),
    group_vars=st.lists(_NAMES, max_size=4),
    groups=st.lists(_NAMES, max_size=3),
    hosts=st.lists(_NAMES, max_size=3),
    source=_NAMES,
)
def test_every_comment_stays_one_line_for_any_name(
    host_vars: list[str], group_vars: list[str], groups: list[str], hosts: list[str], source: str
) -> None:
    inv = ansible.Inventory(source)
    for group in groups:
        inv.group(group).vars.update(dict.fromkeys(group_vars, 1))
        for host in ["web1", *hosts]:
            inv.add_host(group, host, dict.fromkeys(host_vars, "x"))
    inv.add_host("ungrouped", "web1", dict.fromkeys(host_vars, "x"))
    hosts_found, notes = importer.convert(inv)
    text = importer.format_hosts(hosts_found, notes, source)
    # YAML's line breaks are \n only: every other one is escaped, in comments and elsewhere
    assert text.splitlines() == text.split("\n")[:-1]
    for line in text.split("\n")[:-1]:
        assert line.isprintable()
        assert (
            line.lstrip().startswith("#")
            or line in ("hosts:", "hosts: {}")
            or (line.startswith("  ") and line.endswith("}"))
        )
    loaded = ansible._safe_load(text)
    kept = [h.name for h in hosts_found if not importer._host_problem(h.name)]
    assert list((loaded or {}).get("hosts") or {}) == kept


# --- small inventories, huge costs (security issue, hole 9) ------------------------------------


def _limited_import(path: Path) -> subprocess.CompletedProcess[str]:
    """``rex import ansible PATH`` in a child held to 60 s of CPU and 1 GiB of address space:
    an import that does not stay bounded is killed (or fails) instead of taking the machine."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    code = "import sys; from rexplan.cli import rex; sys.exit(rex.main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "import", "ansible", str(path)],
        capture_output=True,
        text=True,
        preexec_fn=limits,  # the child runs only rex: no threads yet
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(importer.__file__).parent.parent)},
    )


def test_aliased_groups_are_walked_once(tmp_path: Path) -> None:
    # each level's body names the one below twice, through an alias: 2**30 walks before
    levels = ['l0: &l0 {hosts: {"h[1:50]": }}']
    levels += [
        f"l{i}: &l{i} {{children: {{a{i}: *l{i - 1}, b{i}: *l{i - 1}}}}}" for i in range(1, 31)
    ]
    inventory = tmp_path / "aliases.yaml"
    inventory.write_text("\n".join([*levels, "top: *l30"]) + "\n")
    done = _limited_import(inventory)
    assert done.returncode == 0, done.stderr
    loaded = _safe_hosts(done.stdout)
    assert list(loaded) == [f"h{n}" for n in range(1, 51)]
    groups = [
        "l0",
        "a1",
        "b1",
        *(g for i in range(1, 30) for g in (f"l{i}", f"a{i + 1}", f"b{i + 1}")),
    ]
    assert loaded["h1"]["groups"] == [*groups, "l30", "top"]


def test_ranges_listed_in_many_groups_are_capped(tmp_path: Path) -> None:
    inventory = tmp_path / "many.ini"
    inventory.write_text("".join(f"[g{i}]\nh[1:100000]\n" for i in range(30)))
    assert len(inventory.read_bytes()) < 600
    done = _limited_import(inventory)
    assert done.returncode == 4, done.stderr
    assert (
        f"{inventory}:22:1: the inventory adds up to more than 1,000,000 host entries"
        in done.stderr
    )


def test_an_alias_bomb_in_a_variable_costs_little(tmp_path: Path) -> None:
    # 583 bytes: ansible_host is 9 lists of 9 lists ... 9 levels down, 9**9 strings; its note
    # used repr() of it all (a MemoryError at 1 GiB after 13 s, exit 1)
    levels = ["a0: &a0 [" + ", ".join(["xxxxxxxxxx"] * 9) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    body = "".join(f"    {line}\n" for line in levels)
    inventory = tmp_path / "laughs.yml"
    inventory.write_text(f"all:\n  vars:\n{body}    ansible_host: *a8\n  hosts:\n    h1:\n")
    assert len(inventory.read_bytes()) < 700
    started = time.monotonic()
    done = _limited_import(inventory)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 20
    assert list(_safe_hosts(done.stdout)) == ["h1"]
    notes = [line for line in done.stdout.splitlines() if line.lstrip().startswith("#")]
    assert "more characters] is not an address rex" in " ".join(notes)
    assert len(done.stdout) < 5_000


@pytest.mark.parametrize(
    ("name", "text", "found"),
    [
        # PyYAML's int() refuses more than 4300 digits with a ValueError, no YAMLError
        ("long.yml", "all:\n  hosts:\n    h1: {ansible_port: " + "1" * 5000 + "}\n", 4),
        # its composer recurses: RecursionError
        ("deep.yml", "all:\n  vars:\n    x: " + "[" * 5000 + "]" * 5000 + "\n", 4),
        # a string of digits as a port: int() of it
        ("text.yml", "all:\n  hosts:\n    h1: {ansible_port: '" + "1" * 5000 + "'}\n", 0),
        # an INI hex literal: 16,000 bits, which repr() refuses to write in decimal
        ("hex.ini", "[g]\nh1 ansible_port=0x" + "f" * 4000 + "\n", 0),
    ],
    ids=["long-int", "deep", "long-port-text", "hex-literal"],
)
def test_numbers_too_long_and_nesting_too_deep_are_documented_outcomes(
    tmp_path: Path, name: str, text: str, found: int
) -> None:
    # each was an internal error (exit 1) at 2afc094 and b45bb26
    inventory = tmp_path / name
    inventory.write_text(text)
    done = _limited_import(inventory)
    assert done.returncode == found, done.stderr
    assert "internal error" not in done.stderr
    if found == 0:
        assert list(_safe_hosts(done.stdout)) == ["h1"]
        assert "is not a TCP port" in done.stdout and len(done.stdout) < 2_000
    else:
        assert f"{inventory}:1:1: invalid YAML" in done.stderr


def _safe_hosts(text: str) -> dict[str, Any]:
    import yaml

    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    hosts: dict[str, Any] = doc["hosts"]
    return hosts
