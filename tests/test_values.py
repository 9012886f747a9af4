"""Per-host values and Jinja2 templates (issue 18 part 1): rendering at load, errors with
file:line:column, the sandbox, shell syntax left alone, and the spec digest per step."""

from __future__ import annotations

from pathlib import Path

import pytest

from rexplan.core import manifest, plan, spec, templates
from rexplan.core.model import Step
from rexplan.errors import Diagnostic, ManifestError

HEAD = """\
rex: 1
defaults:
  user: app
  vars: {base: 8000, greeting: hi, tags: [a, b], db: {name: main, port: 5432}}
hosts:
  web[1-3]:
    address: 127.0.0.{n}
  edge:
    address: 127.0.0.9
    vars: {greeting: hello, weight: 3}
users:
  app: {login: svc}
authorize: ['*.*.*']
"""


def load(programs: str, tmp_path: Path | None = None) -> list[Step]:
    text = HEAD + "programs:\n" + programs
    if tmp_path is None:
        return list(plan.compile(manifest.loads(text, "m.yaml")).steps)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return list(plan.compile(manifest.load(path)).steps)


def errors(programs: str, tmp_path: Path | None = None) -> list[Diagnostic]:
    with pytest.raises(ManifestError) as info:
        load(programs, tmp_path)
    return list(info.value.diagnostics)


#: the line of the first program line in HEAD + "programs:\n" (1-based)
FIRST = HEAD.count("\n") + 2


def test_every_variable_renders_per_step() -> None:
    steps = load(
        """\
  web:
    on: [web1, web2, web3, edge]
    run: [srv, "{{ address }}", "{{ vars.base + index }}", "{{ host }}/{{ count }}"]
    env: {GREET: "{{ vars.greeting }} {{ login }}", DB: "{{ vars.db.name }}:{{ vars.db.port }}"}
    cwd: "/srv/{{ host }}"
    ready: {command: [check, "{{ vars.tags | join(',') }}"]}
  lb:
    on: edge
    shell: 'echo {{ programs.web.addresses | join(" ") }} {{ programs.web.hosts[0] }}'
"""
    )
    web = [s for s in steps if s.program == "web"]
    assert [s.argv for s in web] == [
        ("srv", "127.0.0.1", "8000", "web1/4"),
        ("srv", "127.0.0.2", "8001", "web2/4"),
        ("srv", "127.0.0.3", "8002", "web3/4"),
        ("srv", "127.0.0.9", "8003", "edge/4"),
    ]
    assert [(s.index, s.count) for s in web] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # host vars over defaults.vars, key by key
    assert dict(web[3].env) == {"GREET": "hello svc", "DB": "main:5432"}
    assert dict(web[0].env)["GREET"] == "hi svc"
    assert web[1].cwd == "/srv/web2"
    assert web[0].ready.argv == ("check", "a,b")
    (lb,) = [s for s in steps if s.program == "lb"]
    assert lb.argv == ("/bin/sh", "-c", "echo 127.0.0.1 127.0.0.2 127.0.0.3 127.0.0.9 web1")


def test_shell_parameter_syntax_is_not_template_syntax() -> None:
    (step,) = load(
        """\
  s:
    on: web1
    shell: 'x=abc; echo ${#x} ${x#a} {# not a comment #} {{ host }}'
"""
    )
    assert step.shell == "x=abc; echo ${#x} ${x#a} {# not a comment #} web1"


def test_strings_without_template_syntax_are_untouched_and_shared() -> None:
    steps = load("  s:\n    on: [web1, web2]\n    run: [echo, '{x} }} {#']\n")
    assert steps[0].argv == steps[1].argv == ("echo", "{x} }} {#")
    assert steps[0].argv is steps[1].argv  # the fast path: nothing rendered, nothing copied


def test_an_undefined_name_is_an_error_at_the_field() -> None:
    (d,) = errors("  s:\n    on: [web1, edge]\n    run: [echo, '{{ vars.weight }}']\n")
    assert (d.line, d.col, d.path) == (FIRST + 2, 17, "programs.s.run.1")
    assert "undefined" in d.message and "weight" in d.message and "'web1'" in d.message


def test_a_syntax_error_is_an_error_at_the_field() -> None:
    (d,) = errors("  s:\n    on: web1\n    env: {A: '{{ host '}\n    run: [x]\n")
    assert (d.line, d.col, d.path) == (FIRST + 2, 14, "programs.s.env.A")
    assert "syntax error" in d.message


def test_a_multiline_template_names_its_line() -> None:
    (d,) = errors(
        "  s:\n    on: web1\n    shell: |\n      echo {{ host }}\n      echo {{ nope }}\n"
    )
    assert d.path == "programs.s.shell" and d.line == FIRST + 2
    assert "(template line 2)" in d.message


@pytest.mark.parametrize(
    ("field", "path", "why"),
    [
        ("run: [echo, '{{ vars.missing | default(\"\") }}']", "programs.s.run.1", "is empty"),
        ("run: ['{{ \"\" }}']", "programs.s.run.0", "is empty"),
        ("run: [x]\n    cwd: '{{ \"\" }}'", "programs.s.cwd", "is empty"),
        (
            "run: [x]\n    ready: {tcp: {host: '{{ \"a b\" }}', port: 1}}",
            "programs.s.ready.tcp.host",
            "",
        ),
        ("run: [x]\n    ready: {http: '{{ host }}'}", "programs.s.ready.http", "not an http"),
        (
            "run: [x]\n    files: [{src: m.yaml, dest: '../{{ host }}'}]",
            "programs.s.files.0.dest",
            "leaves",
        ),
    ],
)
def test_a_rendered_value_that_breaks_its_field_rules_is_an_error(
    field: str, path: str, why: str
) -> None:
    (d,) = errors(f"  s:\n    on: web1\n    {field}\n")
    assert d.path == path and d.line > FIRST and why in d.message
    assert "rendered value" in d.message


@pytest.mark.parametrize(
    "expression",
    [
        '"".__class__',
        '"".__class__.__mro__[1].__subclasses__()',
        "vars.tags.append(1)",
        "range.__globals__",
        '"x" * 100000000',
        "2 ** 100000",
        "lipsum()",
        "cycler",
        "self.__init__",
    ],
)
def test_the_sandbox_refuses_attribute_tricks_mutation_and_bombs(expression: str) -> None:
    (d,) = errors(f"  s:\n    on: web1\n    run: [echo, '{{{{ {expression} }}}}']\n")
    assert d.path == "programs.s.run.1"
    assert "sandbox" in d.message or "undefined" in d.message or "error" in d.message


def test_the_environment_is_locked_down() -> None:
    env = templates._ENV
    assert env.autoescape is False
    assert env.undefined.__name__ == "StrictUndefined"
    assert set(env.globals) == {"range"}
    assert "\x00" in env.comment_start_string
    # no built-in filter reads files or the network; none of these exist
    assert not {"include_file", "read", "fileglob", "lookup", "url"} & set(env.filters)
    with pytest.raises(templates.TemplateProblem, match="sandbox"):
        templates.render("{{ ''.__class__ }}", {})


def test_template_files_render_per_step_and_errors_name_their_line(tmp_path: Path) -> None:
    (tmp_path / "up.conf.j2").write_text(
        "upstream web {\n{% for a in programs.web.addresses %}  server {{ a }};\n"
        "{% endfor %}}\n# me: {{ host }} ${#x}\n"
    )
    steps = load(
        """\
  web:
    on: [web1, edge]
    run: [x]
    files: [{src: up.conf.j2, dest: "conf/{{ host }}.conf", template: true, mode: "0600"}]
""",
        tmp_path,
    )
    assert [f.dest for s in steps for f in s.files] == ["conf/web1.conf", "conf/edge.conf"]
    content = steps[1].files[0].content
    assert content == (
        b"upstream web {\n  server 127.0.0.1;\n  server 127.0.0.9;\n}\n# me: edge ${#x}\n"
    )
    assert steps[0].files[0].mode == 0o600
    (tmp_path / "up.conf.j2").write_text("ok\n{{ vars.nope }}\n")
    files = "    files: [{src: up.conf.j2, dest: a, template: true}]\n"
    (d,) = errors("  web:\n    on: web1\n    run: [x]\n" + files, tmp_path)
    assert (d.line, d.path) == (FIRST + 3, "programs.web.files.0.src")
    assert "up.conf.j2 line 2" in d.message


def test_a_changed_var_changes_only_that_steps_spec_digest() -> None:
    prog = (
        "  web:\n    on: [web1, web2, web3, edge]\n    run: [srv, '{{ vars.weight|default(1) }}']\n"
    )
    before = {s.id: spec.expected_spec(s) for s in load(prog)}
    text = HEAD.replace("vars: {greeting: hello, weight: 3}", "vars: {greeting: hello, weight: 4}")
    after = {
        s.id: spec.expected_spec(s)
        for s in plan.compile(manifest.loads(text + "programs:\n" + prog, "m.yaml")).steps
    }
    assert [k for k in before if before[k] != after[k]] == ["web@edge"]


def test_index_and_count_travel_in_the_launch_but_not_in_the_digest() -> None:
    prog = "  web:\n    on: [web1, web2]\n    run: [srv]\n"
    two = {s.id: spec.expected_spec(s) for s in load(prog)}
    three = {s.id: spec.expected_spec(s) for s in load(prog.replace("web2]", "web2, web3]"))}
    assert two["web@web1"] == three["web@web1"]  # a host added restarts nothing else
    step = load(prog)[1]
    args = spec.launch_args(
        step, run="r", key_path="web2/app.key", nl=bytes(16), callback=("127.0.0.1", 1)
    )
    assert (args["index"], args["count"]) == (1, 2)


def test_vars_take_any_yaml_value_and_env_clear_is_read() -> None:
    steps = load("  s:\n    on: edge\n    run: ['{{ vars.weight * 2 }}']\n    env_clear: true\n")
    assert steps[0].argv == ("6",) and steps[0].env_clear is True
    assert load("  s:\n    on: edge\n    run: [x]\n")[0].env_clear is False


def test_a_tcp_port_may_be_a_template_and_must_render_a_port() -> None:
    ready = "    ready: {tcp: {host: '{{ address }}', port: '{{ vars.base + index }}'}}\n"
    steps = load("  s:\n    on: [web1, web2]\n    run: [x]\n" + ready)
    assert [(s.ready.host, s.ready.port) for s in steps] == [
        ("127.0.0.1", 8000),
        ("127.0.0.2", 8001),
    ]
    (d,) = errors("  s:\n    on: web1\n    run: [x]\n    ready: {tcp: {port: '{{ 70000 }}'}}\n")
    assert (d.line, d.path) == (FIRST + 3, "programs.s.ready.tcp.port")
    assert "is not a port" in d.message
    (d,) = errors("  s:\n    on: web1\n    run: [x]\n    ready: {tcp: {port: '80'}}\n")
    assert d.path == "programs.s.ready.tcp.port" and "not a port or a template" in d.message


def test_rex_names_are_reserved_in_env() -> None:
    (d,) = errors("  s:\n    on: edge\n    run: [x]\n    env: {REX_INDEX: '1'}\n")
    assert d.path == "programs.s.env.REX_INDEX" and "set by rex" in d.message
