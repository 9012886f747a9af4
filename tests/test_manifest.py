"""Manifest loading: records from a good manifest, exact positions for bad ones, caps."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rexplan.core import manifest, yamlpos
from rexplan.core import schema as manifest_schema
from rexplan.core import settings as settings_module
from rexplan.core.model import (
    Authorization,
    Callback,
    FileSpec,
    Host,
    Placement,
    Ready,
    Timeouts,
    User,
    When,
)
from rexplan.errors import Diagnostic, ManifestError
from rexplan.wire import probes

BAD = Path(__file__).parent / "data" / "bad"
EXPECT = re.compile(r"# expect: (\d+):(\d+) (.+?): (.*)$")

GOOD = """\
rex: 1
defaults:
  user: app
  port: 2200
  forks: 8
  load: cgroup
  restart: no
  stop_timeout: 7
  timeouts: {connect: 4, ready: 40}
callback: {bind: 127.0.0.1, port: 0, advertise: 127.0.0.1}
hosts:
  web1: {address: 127.0.0.10, port: 2222, user: app, groups: [web], vars: {zone: b, rack: "1"}}
  localhost: {transport: local, load: loadavg}
  "node[01-03]": {address: "127.0.1.{n}", groups: [compute, web]}
users:
  app: {login: svc, identity: ~/.ssh/id_ed25519, ssh_options: {ConnectTimeout: "5"}}
  db: {}
programs:
  app:
    run: [python3, -m, http.server, "8000"]
    on: [web1, "group:web", "node0*"]
    requires: [db]
    ready: {tcp: 8000, timeout: 10}
    env: {KEY: value, A: "1"}
    cwd: /srv/app
    kind: service
    restart: on-failure
    placement: {strategy: least-loaded, count: 2}
    when: {max_load: 2.5, min_free_mb: 100}
    files: [{src: app.conf, dest: conf/app.conf, mode: "0600"}, {src: /etc/hosts, dest: h}]
    stop_timeout: 5
    timeouts: {start: 10}
  db:
    shell: exec postgres -D /srv/db
    on: localhost
    user: db
    kind: job
    ready: {command: [pg_isready]}
authorize:
  - "web*.app.*"
  - "node*.app.app"
  - "localhost.db.*"
"""


def _load_good(tmp_path: Path) -> manifest.Manifest:
    path = tmp_path / "rex.yaml"
    path.write_text(GOOD)
    return manifest.load(path)


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    # rex does not check it on every run (it costs more than loading a manifest)
    jsonschema.Draft202012Validator.check_schema(manifest_schema.document())


def test_good_manifest_becomes_records(tmp_path: Path) -> None:
    m = _load_good(tmp_path)
    assert m.path == str(tmp_path / "rex.yaml")
    assert len(m.digest) == 64
    assert m.forks == 8
    assert m.callback == Callback(bind="127.0.0.1", port=0, advertise="127.0.0.1")
    assert m.hosts == (
        Host(
            "web1",
            "127.0.0.10",
            2222,
            "app",
            "ssh",
            "python3",
            ("web",),
            (("rack", "1"), ("zone", "b")),
            load="cgroup",
        ),
        Host("localhost", "localhost", 2200, None, "local", "python3", address_set=False),
        Host(
            "node01", "127.0.1.1", 2200, None, "ssh", "python3", ("compute", "web"), load="cgroup"
        ),
        Host(
            "node02", "127.0.1.2", 2200, None, "ssh", "python3", ("compute", "web"), load="cgroup"
        ),
        Host(
            "node03", "127.0.1.3", 2200, None, "ssh", "python3", ("compute", "web"), load="cgroup"
        ),
    )
    assert m.users == (
        User("app", "svc", "~/.ssh/id_ed25519", (("ConnectTimeout", "5"),)),
        User("db", "db", login_set=False),
    )
    assert m.authorize == (
        Authorization("web*.app.*", "web*", "app", "*"),
        Authorization("node*.app.app", "node*", "app", "app"),
        Authorization("localhost.db.*", "localhost", "db", "*"),
    )
    app, db = m.programs
    assert app.hosts == ("web1", "node01", "node02", "node03")
    assert app.on == ("web1", "group:web", "node0*")
    assert app.user == "app"
    assert app.run == ("python3", "-m", "http.server", "8000")
    assert app.shell is None
    assert app.requires == ("db",)
    assert app.ready == Ready("tcp", timeout=10.0, port=8000)
    assert app.env == (("A", "1"), ("KEY", "value"))
    assert app.cwd == "/srv/app"
    assert (app.kind, app.restart) == ("service", "on-failure")
    assert app.placement == Placement("least-loaded", 2)
    assert app.when == When(2.5, 100)
    assert app.files == (
        FileSpec(str(tmp_path / "app.conf"), "conf/app.conf", 0o600),
        FileSpec("/etc/hosts", "h", 0o644),
    )
    assert app.stop_timeout == 5.0
    assert app.timeouts == Timeouts(connect=4.0, start=10.0, callback=30.0, ready=40.0)
    assert db.hosts == ("localhost",)
    assert db.shell == "exec postgres -D /srv/db"
    assert db.argv == ("/bin/sh", "-c", "exec postgres -D /srv/db")
    assert (db.user, db.kind, db.restart, db.stop_timeout) == ("db", "job", "no", 7.0)
    assert db.ready == Ready("command", timeout=40.0, argv=("pg_isready",))
    assert m.authorized("node02", "app", "app")
    assert not m.authorized("node02", "app", "db")


def test_loads_matches_load_and_digest_is_of_the_bytes(tmp_path: Path) -> None:
    m = _load_good(tmp_path)
    again = manifest.loads(GOOD.encode(), str(tmp_path / "rex.yaml"))
    assert again == m
    assert m.digest == hashlib.sha256(GOOD.encode()).hexdigest()


def test_yaml_12_booleans_leave_on_yes_no_as_strings() -> None:
    text = (
        "rex: 1\nusers: {app: {}}\nhosts: {localhost: {transport: local}}\n"
        "programs:\n  p:\n    run: [echo, yes, no, on, off, y, n, Yes, '0644']\n"
        "    on: localhost\n    restart: no\nauthorize: ['*.*.*']\n"
    )
    (p,) = manifest.loads(text).programs
    assert p.run == ("echo", "yes", "no", "on", "off", "y", "n", "Yes", "0644")
    assert p.restart == "no"


def test_yaml_12_numbers_and_no_timestamps() -> None:
    text = "rex: 1\nhosts: {a: {port: 0o17}, b: {port: 0x10}, c: {port: 1e3}}\n"
    assert [h.port for h in manifest.loads(text).hosts] == [15, 16, 1000]
    text = (
        "rex: 1\nhosts: {c: {port: yes}, d: {port: ~}, e: {port: .inf}, f: {port: 2020-01-01},"
        " g: {port: true}}\n"
    )
    assert [d.message for d in _error(text)] == [
        "'yes' is not of type 'integer'",
        "null is not of type 'integer'",
        "'.inf' is not of type 'integer'",
        "'2020-01-01' is not of type 'integer'",
        "true is not of type 'integer'",
    ]


def test_ranges_templates_and_glob_selection() -> None:
    text = (
        "rex: 1\nusers: {app: {}}\nhosts:\n"
        "  'rack[1-2]-n[01-03]': {address: '10.{n1}.0.{n}'}\n"
        "programs:\n  p: {run: [x], on: ['rack2-n[02-03]', 'rack1-*']}\n"
        "authorize: ['rack*.app.p']\n"
    )
    m = manifest.loads(text)
    assert [h.name for h in m.hosts] == [
        "rack1-n01", "rack1-n02", "rack1-n03", "rack2-n01", "rack2-n02", "rack2-n03",
    ]  # fmt: skip
    assert m.host("rack2-n03").address == "10.2.0.3"
    assert m.programs[0].hosts == ("rack1-n01", "rack1-n02", "rack1-n03", "rack2-n02", "rack2-n03")


def _cases() -> list[str]:
    return sorted(p.name for p in BAD.glob("*.yaml"))


def test_there_are_enough_bad_cases() -> None:
    assert len(_cases()) >= 25


@pytest.mark.parametrize("loader", ["libyaml", "pure"])
@pytest.mark.parametrize("name", _cases())
def test_bad_manifest(name: str, loader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if loader == "pure":
        monkeypatch.setattr(yamlpos, "_LOADER", yaml.SafeLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML was built without libyaml")
    path = BAD / name
    expected = []
    for line in path.read_text().splitlines():
        match = EXPECT.match(line)
        if match:
            message, _, hint = match.group(4).partition(" | ")
            key = "" if match.group(3) == "-" else match.group(3)
            expected.append((int(match.group(1)), int(match.group(2)), key, message, hint))
    assert expected, f"{name} has no '# expect:' line"
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    got = info.value.diagnostics
    shown = "\n".join(d.format() for d in got)
    assert len(got) == len(expected), shown
    for d, (line, col, key, message, hint) in zip(got, expected, strict=True):
        assert (d.file, d.line, d.col, d.path) == (str(path), line, col, key), shown
        assert message in d.message, shown
        assert hint in (d.hint or ""), shown
    assert info.value.exit_code == 4


def _error(data: bytes | str) -> list[Diagnostic]:
    with pytest.raises(ManifestError) as info:
        manifest.loads(data, "m.yaml")
    return list(info.value.diagnostics)


def test_larger_than_5_mib_is_refused_unparsed(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"rex: 1\n" + b"#" * manifest.MAX_BYTES)
    with pytest.raises(ManifestError) as info:
        manifest.load(big)
    (d,) = info.value.diagnostics
    assert (d.line, d.col, d.path) == (1, 1, "")
    assert "larger than 5 MiB" in d.message


def test_billion_laughs_fails_fast() -> None:
    lines = ["rex: 1", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (d,) = _error("\n".join(lines) + "\n")
    assert "aliases expand to more than" in d.message
    assert "billion laughs" in (d.hint or "")
    assert d.line == 7  # a5 is where the copies pass 100,000 nodes


def test_deep_nesting_is_refused() -> None:
    depth = 200
    (d,) = _error("rex: 1\nx: " + "[" * depth + "]" * depth + "\n")
    assert d.message == f"nesting is deeper than {yamlpos.MAX_DEPTH} levels"
    assert (d.line, d.col) == (2, 4 + yamlpos.MAX_DEPTH - 1)


def test_block_nesting_is_refused_too() -> None:
    lines = ["rex: 1"] + [" " * i + f"k{i}:" for i in range(100)]
    (d,) = _error("\n".join(lines) + " end\n")
    assert "nesting is deeper" in d.message
    assert d.path.startswith("k0.k1.k2.")


def test_non_utf8_bytes_are_located() -> None:
    (d,) = _error(b"rex: 1\nhosts:\n  caf\xe9: {}\n")
    assert (d.line, d.col, d.path) == (3, 6, "")
    assert d.message == "byte 0xe9 at offset 19 is not UTF-8"


def test_non_utf8_after_multibyte_text_counts_characters() -> None:
    (d,) = _error("rex: 1\n# héé\nx: ".encode() + b"\xff\n")
    assert (d.line, d.col) == (3, 4)


def test_control_characters_are_located() -> None:
    (d,) = _error("rex: 1\nhosts:\n  wéb\x07: {}\n")
    assert (d.line, d.col) == (3, 6)
    assert "U+0007" in d.message


def test_nul_from_an_escape_is_refused() -> None:
    (d,) = _error('rex: 1\nhosts:\n  h: {vars: {k: "a\\0b"}}\n')
    assert (d.line, d.col, d.path) == (3, 17, "hosts.h.vars.k")
    assert "NUL" in d.message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        manifest.load(tmp_path / "missing.yaml")
    (d,) = info.value.diagnostics
    assert (d.line, d.col) == (1, 1)
    assert "cannot read the manifest" in d.message


def test_semantic_and_schema_errors_come_together() -> None:
    text = (
        "rex: 1\nusers: {app: {}}\nhosts: {web1: {port: high}}\n"
        "programs:\n  p: {run: [x], on: web9, requires: [q], kind: batch}\n"
    )
    got = _error(text)
    assert [(d.path, d.line, d.col) for d in got] == [
        ("hosts.web1.port", 3, 22),
        ("programs.p.on", 5, 21),
        ("programs.p.requires.0", 5, 38),
        ("programs.p.kind", 5, 48),
    ]


def test_load_measure_is_loadavg_or_cgroup_with_its_position() -> None:
    text = "rex: 1\ndefaults: {load: cpu}\nhosts:\n  web1: {load: cgrop}\n  web2: {load: 1}\n"
    got = _error(text)
    assert [(d.path, d.line, d.col) for d in got] == [
        ("defaults.load", 2, 18),
        ("hosts.web1.load", 4, 16),
        ("hosts.web2.load", 5, 16),
    ]
    assert got[1].message == "'cgrop' is not one of 'loadavg', 'cgroup'"
    assert got[1].hint == "did you mean 'cgroup'?"
    m = manifest.loads("rex: 1\nhosts: {a: {}, b: {load: cgroup}}\n", "m.yaml")
    assert [h.load for h in m.hosts] == ["loadavg", "cgroup"]


def test_cycles_are_each_reported_once() -> None:
    text = (
        "rex: 1\nusers: {app: {}}\nhosts: {h: {}}\nprograms:\n"
        "  a: {run: [x], on: h, requires: [a]}\n"
        "  b: {run: [x], on: h, requires: [c]}\n"
        "  c: {run: [x], on: h, requires: [b]}\n"
        "  d: {run: [x], on: h, requires: [b]}\n"
        "authorize: ['*.*.*']\n"
    )
    got = _error(text)
    assert [d.message for d in got] == ["requires cycle: a -> a", "requires cycle: b -> c -> b"]
    assert [d.path for d in got] == ["programs.a.requires", "programs.b.requires"]


def test_a_valid_manifest_needs_no_second_pass(tmp_path: Path) -> None:
    raw = GOOD.encode()
    assert manifest._validate(GOOD, raw, str(tmp_path / "rex.yaml"), track=False).programs


def _one(hosts: str, program: str, extra: str = "") -> Diagnostic:
    """The single diagnostic of a small manifest: one host entry, program ``p``, extras."""
    fields = [f for f in (program, "run: [x]", "on: web1") if f]
    fields = [f for f in fields if f == program or f.split(":")[0] + ":" not in program]
    text = (
        f"rex: 1\nusers: {{app: {{}}}}\nhosts:\n  {hosts}\n"
        f"programs:\n  p: {{{', '.join(fields)}}}\n{extra}authorize: ['*.*.*']\n"
    )
    got = _error(text)
    assert len(got) == 1, "\n".join(d.format() for d in got)
    return got[0]


@pytest.mark.parametrize(
    ("hosts", "program", "extra", "path", "message"),
    [
        ("web1: {python: 'py thon'}", "", "", "hosts.web1.python", "invalid interpreter"),
        ("web1: {groups: [Web]}", "", "", "hosts.web1.groups.0", "invalid group name 'Web'"),
        ("web1: {address: '-oProxy'}", "", "", "hosts.web1.address", "starts with '-'"),
        ("web1: {address: 'a b'}", "", "", "hosts.web1.address", "contains whitespace"),
        ("web1: {}", "env: {'A-B': x}", "", "programs.p.env.A-B", "invalid environment"),
        ("web1: {}", "ready: {http: 'ftp://x'}", "", "programs.p.ready.http", "not an http"),
        ("web1: {}", "ready: {notify: false}", "", "programs.p.ready.notify", "not a probe"),
        (
            "web1: {}",
            "ready: {tcp: {host: 'a b', port: 1}}",
            "",
            "programs.p.ready.tcp.host",
            "whitespace",
        ),
        (
            "web1: {}",
            "ready: {tcp: {host: h}}",
            "",
            "programs.p.ready.tcp",
            "missing required field 'port'",
        ),
        (
            "web1: {}",
            "placement: {strategy: all, count: 1}",
            "",
            "programs.p.placement.count",
            "only to least-loaded",
        ),
        ("web1: {}", "placement: some", "", "programs.p.placement", "is not one of 'all'"),
        ("web1: {}", "on: []", "", "programs.p.on", "selects no host"),
        ("web1: {}", "requires: p", "", "programs.p.requires", "requires cycle: p -> p"),
        (
            "web1: {}",
            "files: [{src: a}]",
            "",
            "programs.p.files.0",
            "missing required field 'dest'",
        ),
        (
            "web1: {}",
            "timeouts: {ready: 0}",
            "",
            "programs.p.timeouts.ready",
            "must be greater than 0",
        ),
        ("web1: {}", "stop_timeout: 1e6", "", "programs.p.stop_timeout", "more than the maximum"),
        ("web1: {}", "run: []", "", "programs.p.run", "must not be empty"),
        ("web1: {}", "", "callback: {bind: '1.2.3.4/8'}\n", "callback.bind", "contains '/'"),
        ("web1: {}", "", "users: {}\n", "users", "duplicate key 'users'"),
        ("web1: {}", "", "defaults: {forks: 0}\n", "defaults.forks", "less than the minimum of 1"),
    ],
)
def test_semantic_checks(hosts: str, program: str, extra: str, path: str, message: str) -> None:
    d = _one(hosts, program, extra)
    assert d.path == path
    assert message in d.message


def test_user_logins_identities_and_ssh_options() -> None:
    text = "rex: 1\nusers:\n  app: {login: 'a b', identity: '-i', ssh_options: {'Bad-Opt': x}}\n"
    assert [(d.path, d.message.split(" ")[0]) for d in _error(text)] == [
        ("users.app.login", "invalid"),
        ("users.app.identity", "invalid"),
        ("users.app.ssh_options.Bad-Opt", "ssh"),
    ]


def test_aliases_work_and_errors_inside_them_point_at_the_anchor() -> None:
    text = (
        "rex: 1\nusers: {app: {}}\nhosts: {h1: {}, h2: {}}\n"
        "programs:\n"
        "  a: {run: [x], on: h1, ready: &r {tcp: 80}}\n"
        "  b: {run: [x], on: h2, ready: *r}\n"
        "authorize: ['*.*.*']\n"
    )
    a, b = manifest.loads(text).programs
    assert a.ready == b.ready == Ready("tcp", port=80)
    bad = text.replace("tcp: 80", "tcp: -1")
    got = _error(bad)
    assert [(d.path, d.line, d.col) for d in got] == [
        ("programs.a.ready.tcp", 5, 41),  # b's alias copies a's value: its position is a's
        ("programs.b.ready.tcp", 5, 41),
    ]


_PLACEHOLDERS = {"hosts": "web1", "users": "app", "programs": "app", "env": "KEY", "vars": "zone"}
_PROBES = [
    None, True, False, 0, -1, 1, 1.5, 2.0, 70000, "", "x", "ssh", "no", "all", "least-loaded",
    "job", "0644", [], ["x"], [1], {}, {"port": 80}, {"strategy": "all"}, {"x": 1},
]  # fmt: skip


def _schema_paths(
    schema: dict[str, object], prefix: tuple[object, ...]
) -> list[tuple[object, ...]]:
    defs = manifest_schema.document()["$defs"]
    ref = schema.get("$ref")
    if isinstance(ref, str):
        schema = defs[ref.removeprefix("#/$defs/")]
    found = [prefix]
    props = schema.get("properties", {})
    assert isinstance(props, dict)
    for key, sub in props.items():
        found += _schema_paths(sub, (*prefix, key))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        found += _schema_paths(extra, (*prefix, _PLACEHOLDERS.get(str(prefix[-1]), "k")))
    items = schema.get("items")
    if isinstance(items, dict):
        found += _schema_paths(items, (*prefix, 0))
    return found


def _with(tree: object, path: tuple[object, ...], value: object) -> object:
    """``tree`` with ``value`` at ``path``: containers on the path are copied or made."""
    if not path:
        return value
    step, rest = path[0], path[1:]
    if isinstance(tree, list):
        return [_with(tree[0] if tree else {}, rest, value), *tree[1:]]
    node = dict(tree) if isinstance(tree, dict) else {}
    below = node.get(step)
    if not isinstance(below, (dict, list)):
        below = [] if rest and isinstance(rest[0], int) else {}
    node[str(step)] = _with(below, rest, value)
    return node


def test_fast_schema_check_agrees_with_jsonschema_field_by_field() -> None:
    base = yamlpos.compose(GOOD, yamlpos.Report("x"))
    accepts, validator = manifest_schema.accepts(), manifest_schema.validator()
    assert accepts(base) and validator.is_valid(base)
    paths = _schema_paths(manifest_schema.document(), ())
    assert ("programs", "app", "ready", "tcp", "port") in paths
    for path in paths[1:]:
        for probe in _PROBES:
            doc = _with(base, path, probe)
            assert accepts(doc) == validator.is_valid(doc), (path, probe)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["address", "port", "user", "transport", "groups", "vars", "python", "x"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-5, 70000),
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from(["", "ssh", "local", "app", "127.0.0.1"]),
            st.lists(st.sampled_from(["web", 3, None]), max_size=2),
            st.dictionaries(st.sampled_from(["k", "v"]), st.sampled_from(["x", 1]), max_size=2),
        ),
        max_size=4,
    )
)
def test_fast_schema_check_never_accepts_what_jsonschema_rejects(host: dict[str, object]) -> None:
    doc = {"rex": 1, "hosts": {"h": host}, "programs": {"p": {"on": "h", "ready": host}}}
    assert manifest_schema.accepts()(doc) == manifest_schema.validator().is_valid(doc)


_WORDS = [
    "rex", "defaults", "hosts", "users", "programs", "authorize", "callback", "user", "port",
    "address", "transport", "groups", "vars", "run", "shell", "on", "requires", "ready", "tcp",
    "http", "command", "file", "notify", "alive", "timeout", "env", "placement", "strategy",
    "count", "when", "files", "src", "dest", "mode", "timeouts", "h", "p", "app", "local", "ssh",
    "least-loaded", "all", "group:g", "g", "h*", "h.app.p", "*.*.*", "node[1-3]", "10.0.0.{n}",
    "0644", "http://x/", "connect", "max_load", "bind", "python", "login", "identity",
]  # fmt: skip
_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70000), st.floats(-1, 1e5), st.sampled_from(_WORDS)
)
_VALUES = st.recursive(
    _LEAVES,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(_WORDS), kids, max_size=4)
    ),
    max_leaves=8,
)
_ENTRIES = st.dictionaries(
    st.sampled_from(["h", "p", "q", "app", "node[1-3]", "node2", "Bad.Name", "localhost"]),
    st.dictionaries(st.sampled_from(_WORDS), _VALUES, max_size=6),
    max_size=4,
)


@settings(max_examples=80, deadline=None)
@given(_ENTRIES, _ENTRIES, _ENTRIES, st.dictionaries(st.sampled_from(_WORDS), _VALUES, max_size=3))
def test_any_shape_gives_records_or_diagnostics(
    hosts: object, programs: object, users: object, rest: dict[str, object]
) -> None:
    doc = {**rest, "rex": 1, "hosts": hosts, "users": users, "programs": programs}
    try:
        manifest.loads(json.dumps(doc))
    except ManifestError as exc:
        assert exc.diagnostics
        for d in exc.diagnostics:
            assert d.line >= 1 and d.col >= 1 and d.message


# --- small manifest, huge plan (security issue, hole 9) ----------------------------------------

#: 9.8 kB: 200 programs on 100,000 hosts, 20 million steps; it took `rex validate` past 5.9 GB
STEP_BOMB = (
    "rex: 1\ndefaults: {user: u}\nusers:\n  u: {}\nhosts:\n  'n[1-100000]': {}\nprograms:\n"
    + "".join(f"  p{i}: {{on: ['n[1-100000]'], run: [sleep, '1']}}\n" for i in range(200))
    + "authorize: ['*.*.*']\n"
)


def test_steps_are_capped_before_the_plan_is_made(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(STEP_BOMB)
    assert len(STEP_BOMB) < 10_000

    def limits() -> None:
        # the steps it asked for need gigabytes; the refusal must fit in much less
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_CPU, (120, 120))

    code = "import sys; from rexplan.cli import rex; sys.exit(rex.main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, "validate", str(path)],
        capture_output=True,
        text=True,
        preexec_fn=limits,  # the child runs only rex: no threads yet
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(manifest.__file__).parents[2])},
    )
    assert done.returncode == 4, done.stderr
    # the program that crosses 1,000,000 steps, at its on: key's value
    assert done.stderr.startswith(
        f"{path}:18:13: programs.p10.on: the manifest makes more than 1,000,000 steps"
    ), done.stderr
    assert "Traceback" not in done.stderr


def test_a_manifest_at_the_step_cap_is_accepted() -> None:
    text = STEP_BOMB.replace("n[1-100000]", "n[1-5000]")  # 200 x 5,000 = 1,000,000 steps
    loaded = manifest.loads(text, "cap.yaml")
    assert sum(len(p.hosts) for p in loaded.programs) == 1_000_000
    with pytest.raises(ManifestError, match="more than 1,000,000 steps"):
        manifest.loads(text.replace("n[1-5000]", "n[1-5001]"), "over.yaml")


def test_the_schema_and_the_manifest_reader_know_every_probe_kind_of_the_table() -> None:
    # wire.probes.KINDS is the one list of probe kinds: a kind the schema or the manifest's
    # reader lacks (or one they have that the table does not) is a kind added halfway
    ready = manifest_schema.document()["$defs"]["ready"]["properties"]
    assert set(ready) - {"timeout", "interval"} == set(probes.KINDS)
    assert set(settings_module._READERS) == set(probes.KINDS)
    assert probes.MANIFEST_ORDER[-1] == probes.DEFAULT == "alive"
