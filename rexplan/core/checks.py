"""Semantic checks of a schema-valid manifest (names, references, cycles), building its records."""

from __future__ import annotations

import fnmatch
import posixpath
import re
from dataclasses import replace
from typing import Any

from rexplan.core import cycles, hostrange, perhost, settings, sshchecks
from rexplan.core.become import Become
from rexplan.core.model import (
    MAX_STEPS,
    NAME_RE,
    Authorization,
    Callback,
    Host,
    Program,
    Timeouts,
    User,
    When,
    triple,
)
from rexplan.core.schema import close
from rexplan.core.values import (
    address_problem,
    as_int,
    as_map,
    as_num,
    as_pairs,
    as_str,
    host_problem,
    name_items,
    name_problem,
)
from rexplan.core.yamlpos import KeyPath, Report
from rexplan.wire.chars import OWNER_RE
from rexplan.wire.jobs import LOG_KEEP, LOG_MAX_SIZE
from rexplan.wire.launch import RESERVED_ENV

#: hosts after range expansion, across the manifest
MAX_HOSTS = hostrange.MAX_HOSTS

_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LOGIN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_PYTHON_RE = re.compile(r"[A-Za-z0-9_./+-]+\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_GLOB_CHARS = frozenset("*?[")
_PATTERN_HOST_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+\Z")
_PATTERN_NAME_RE = re.compile(r"[a-z0-9_*?\[\]!-]+\Z")


class Checker:
    """Semantic checks over the schema-shaped tree; builds the records as it goes."""

    def __init__(self, doc: dict[str, Any], report: Report, base_dir: str) -> None:
        self.doc = doc
        self.report = report
        self.base_dir = base_dir
        defaults = as_map(doc.get("defaults"))
        self.defaults = defaults
        self.timeouts = self._timeouts(defaults.get("timeouts"), Timeouts())
        self.logs = settings.logs(
            report, ("defaults", "logs"), defaults.get("logs"), (LOG_MAX_SIZE, LOG_KEEP)
        )
        self.users: dict[str, User] = {}
        self.hosts: list[Host] = []
        self.index: dict[str, int] = {}  # host name -> position in manifest order
        self.entries: dict[str, list[str]] = {}  # hosts key as written -> its names
        self.groups: dict[str, list[str]] = {}
        self.programs: list[Program] = []
        self._specs: dict[str, dict[str, Any]] = {}  # program name -> its spec, for templates
        self.steps = 0  # programs x their hosts so far (MAX_STEPS)
        self.authorize: list[tuple[Authorization, re.Pattern[str], re.Pattern[str], str]] = []
        self._on_cache: dict[str, list[str]] = {}
        self._pythons: set[str] = set()  # interpreters already found valid
        self.strategy = "flat"
        self.fanout = 4
        self.relay_identity: str | None = None
        self.become = Become(doc, report)
        #: where ``via: ssh`` is set (the top level's, or a host entry's): tree rejects them
        self.via_ssh: list[KeyPath] = []

    def run(self) -> tuple[Callback, int]:
        rex = self.doc.get("rex")
        if isinstance(rex, int) and not isinstance(rex, bool) and rex != 1:
            self.report.value(
                ("rex",), f"unsupported manifest version {rex}", "this rex reads 'rex: 1'"
            )
        name = self.doc.get("name")
        if isinstance(name, str) and name and not OWNER_RE.match(name):
            self.report.value(
                ("name",),
                f"invalid manifest name {name!r}",
                "letters, digits, '_', '.' and '-', at most 64, not starting with '.' or '-'",
            )
        self._users()
        user = self.defaults.get("user")
        if isinstance(user, str) and user not in self.users:
            self._unknown(("defaults", "user"), "user", user, self.users)
        self._hosts()
        self._authorize()
        self._programs()
        self.become.check_all()
        self._render()
        self._strategy()
        return self._callback(), as_int(self.defaults.get("forks"), 64)

    def persist(self) -> float:
        return as_num(self.defaults.get("persist"), 0.0)

    def _unknown(self, path: KeyPath, what: str, name: str, known: Any) -> None:
        hint = close(name, known) or (
            f"add 'groups: [{name}]' to a host" if what == "group" else f"declare it under {what}s:"
        )
        self.report.value(path, f"unknown {what} {name!r}", hint)

    def _timeouts(self, value: Any, base: Timeouts) -> Timeouts:
        spec = as_map(value)
        return Timeouts(
            connect=as_num(spec.get("connect"), base.connect),
            start=as_num(spec.get("start"), base.start),
            callback=as_num(spec.get("callback"), base.callback),
            ready=as_num(spec.get("ready"), base.ready),
        )

    def _callback(self) -> Callback:
        spec = as_map(self.doc.get("callback"))
        for field in ("bind", "advertise"):
            address = spec.get(field)
            problem = address_problem(address) if isinstance(address, str) else None
            if problem:
                self.report.value(("callback", field), f"address {address!r} {problem}")
        return Callback(
            bind=as_str(spec.get("bind"), None),
            port=as_int(spec.get("port"), 0),
            advertise=as_str(spec.get("advertise"), None),
            via=as_str(spec.get("via"), "direct") or "direct",
        )

    def _strategy(self) -> None:
        d = self.defaults
        self.strategy = as_str(d.get("strategy"), "flat") or "flat"
        self.fanout = as_int(d.get("fanout"), 4)
        self.relay_identity = as_str(d.get("relay_identity"), None)
        identity = self.relay_identity
        if identity is not None and (
            _CONTROL_RE.search(identity) or not identity.startswith(("/", "~/"))
        ):
            self.report.value(
                ("defaults", "relay_identity"),
                f"{identity!r} is not an absolute path on the relay hosts",
                "give /path/to/key or ~/path/to/key (tilde: the relay login's home)",
            )
            self.relay_identity = None
            identity = ""  # reported once: tree_problems need not add that it is missing
        if self.strategy == "tree":
            problems = settings.tree_problems(
                self.programs, identity, self.hosts, tuple(self.users.values())
            )
            for path, message, hint in problems:
                self.report.value(path, message, hint)
            for path in self.via_ssh:
                self.report.value(path, *settings.TREE_VIA_SSH)

    def _users(self) -> None:
        for name, value in as_map(self.doc.get("users")).items():
            path: KeyPath = ("users", name)
            spec = as_map(value)
            problem = name_problem(name)
            if problem:
                self.report.key(path, f"invalid user name {name!r}: {problem}")
            login_set = isinstance(spec.get("login"), str)
            login = as_str(spec.get("login"), name) or name
            if "login" in spec and isinstance(spec["login"], str) and not _LOGIN_RE.match(login):
                self.report.value((*path, "login"), f"invalid login {login!r}")
            identity = as_str(spec.get("identity"), None)
            if identity is not None and (
                identity.startswith("-") or any(ord(c) < 32 for c in identity)
            ):
                self.report.value((*path, "identity"), f"invalid identity file {identity!r}")
            options = sshchecks.ssh_options(self.report, path, as_pairs(spec.get("ssh_options")))
            self.users[name] = User(name, login, identity, options, login_set=login_set)

    def _hosts(self) -> None:
        d = self.defaults
        ssh_config = as_str(d.get("ssh_config"), None)
        if ssh_config is not None:
            if _CONTROL_RE.search(ssh_config):
                self.report.value(("defaults", "ssh_config"), f"invalid file {ssh_config!r}")
            elif not ssh_config.startswith(("/", "~")):
                ssh_config = posixpath.join(self.base_dir, ssh_config)
        base = Host(
            "",
            "",
            port=as_int(d.get("port"), 22),
            port_set="port" in d,
            ssh_config=ssh_config,
            transport=as_str(d.get("transport"), "ssh") or "ssh",
            python=as_str(d.get("python"), "python3") or "python3",
            max_startups=as_int(d.get("max_startups"), Host.max_startups),
            load=as_str(d.get("load"), Host.load) or Host.load,
            callback=as_str(as_map(self.doc.get("callback")).get("via"), "direct") or "direct",
        )
        if base.callback == "ssh":
            self.via_ssh.append(("callback", "via"))
        where: dict[str, str] = {}  # host name -> the hosts key that defined it
        for key, value in as_map(self.doc.get("hosts")).items():
            if not self._host_entry(key, as_map(value), base, where):
                return
        sshchecks.resolve_jumps(self.report, self.hosts, self.index, where)

    def _host_entry(
        self, key: str, spec: dict[str, Any], base: Host, where: dict[str, str]
    ) -> bool:
        """Add the hosts of one ``hosts`` entry; False once the manifest has too many."""
        path: KeyPath = ("hosts", key)
        try:
            expanded = hostrange.expand(key)
        except ValueError as exc:
            self.report.key(path, f"invalid host range: {exc}")
            return True
        if len(self.hosts) + len(expanded) > MAX_HOSTS:
            self.report.key(path, f"the manifest has more than {MAX_HOSTS} hosts")
            return False
        for h in expanded:
            problem = host_problem(h.name)
            if problem:
                self.report.key(path, f"invalid host name {h.name!r}: {problem}")
                return True
        user = as_str(spec.get("user"), None)
        if user is not None and user not in self.users:
            self._unknown((*path, "user"), "user", user, self.users)
        python = as_str(spec.get("python"), base.python) or base.python
        if python not in self._pythons:
            if _PYTHON_RE.match(python) and python[0] != "-":
                self._pythons.add(python)
            else:
                self.report.value((*path, "python"), f"invalid interpreter {python!r}")
        groups: list[str] = []
        listed = spec.get("groups")
        for i, group in enumerate(listed if isinstance(listed, list) else []):
            if not isinstance(group, str) or group in groups:
                continue
            problem = None if group in self.groups else name_problem(group)
            if problem:
                message = f"invalid group name {group!r}: {problem}"
                self.report.value((*path, "groups", i), message)
            else:
                groups.append(group)
        address = as_str(spec.get("address"), None)
        templated = address is not None and ("{" in address or "}" in address)
        if address is not None and templated:
            try:
                hostrange.check_template(address, len(expanded[0].values))
            except ValueError as exc:
                self.report.value((*path, "address"), f"bad address template: {exc}")
                address = None
        port = as_int(spec.get("port"), base.port)
        port_set = base.port_set or "port" in spec
        jump = sshchecks.jump(self.report, path, spec.get("jump"))
        max_startups = as_int(spec.get("max_startups"), base.max_startups)
        load = as_str(spec.get("load"), base.load) or base.load
        transport = as_str(spec.get("transport"), base.transport) or base.transport
        via = as_str(as_map(spec.get("callback")).get("via"), None)
        if via == "ssh" and transport == "local":
            self.report.value(
                (*path, "callback", "via"),
                "a transport: local host has no SSH connection to forward its callback over",
                "remove callback.via here: local agents call back on the loopback",
            )
        elif via == "ssh":
            self.via_ssh.append((*path, "callback", "via"))
        callback = via or base.callback
        groups_, vars_ = tuple(groups), perhost.freeze_vars(spec.get("vars"))
        names: list[str] = []
        bad_address = False
        for h in expanded:
            if h.name in where:
                other = where[h.name]
                line, col = self.report.where(("hosts", other), key=True)
                message = f"host {h.name!r} is already defined by {other!r} at {line}:{col}"
                self.report.key(path, message)
                break
            where[h.name] = key
            if address is None:
                addr = h.name
            else:
                addr = hostrange.render(address, h) if templated else address
            problem = None if bad_address else address_problem(addr)
            if problem:
                bad_address = True
                self.report.value((*path, "address"), f"address {addr!r} {problem}")
            self.index[h.name] = len(self.hosts)
            self.hosts.append(
                Host(
                    h.name,
                    addr,
                    port,
                    user,
                    transport,
                    python,
                    groups_,
                    vars_,
                    max_startups=max_startups,
                    load=load,
                    callback=callback,
                    address_set=address is not None,
                    port_set=port_set,
                    jump=jump,
                    ssh_config=base.ssh_config,
                )
            )
            names.append(h.name)
            for group in groups:
                self.groups.setdefault(group, []).append(h.name)
        self.entries[key] = names
        return True

    def _authorize(self) -> None:
        value = self.doc.get("authorize")
        for i, pattern in enumerate(value if isinstance(value, list) else []):
            if not isinstance(pattern, str):
                continue
            parts = pattern.rsplit(".", 2)
            ok = (
                len(parts) == 3
                and all(parts)
                and _PATTERN_HOST_RE.match(parts[0]) is not None
                and all(_PATTERN_NAME_RE.match(p) for p in parts[1:])
            )
            if not ok:
                self.report.value(
                    ("authorize", i),
                    f"{pattern!r} is not a host.user.program pattern",
                    "use shell globs per component, e.g. 'web*.app.*' or '*.*.db'",
                )
                continue
            host, user, program = parts
            auth = Authorization(pattern, host, user, program)
            user_rx = re.compile(fnmatch.translate(user))
            program_rx = re.compile(fnmatch.translate(program))
            self.authorize.append((auth, user_rx, program_rx, fnmatch.translate(host)))

    def _unauthorized(self, hosts: tuple[str, ...], user: str, program: str) -> list[str]:
        host_res = [
            host_re
            for _, user_rx, program_rx, host_re in self.authorize
            if user_rx.match(user) and program_rx.match(program)
        ]
        if not host_res:
            return list(hosts)
        combined = re.compile("|".join(f"(?:{h})" for h in host_res))
        return [h for h in hosts if not combined.match(h)]

    def _on(self, path: KeyPath, item: str) -> list[str] | None:
        """Host names one `on` item selects, or None after reporting why it selects none."""
        if item in self._on_cache:
            return self._on_cache[item]
        names: list[str] | None = None
        if item.startswith("group:"):
            group = item[len("group:") :]
            names = self.groups.get(group)
            if names is None:
                self._unknown(path, "group", group, self.groups)
        elif item in self.entries:
            names = self.entries[item]
        elif item in self.index:
            names = [item]
        else:
            expanded = None
            if hostrange.is_range(item):
                try:
                    expanded = [h.name for h in hostrange.expand(item)]
                except ValueError:
                    expanded = None  # not a range: read it as a glob below
            if expanded is not None:
                missing = [n for n in expanded if n not in self.index]
                if missing:
                    self._unknown(path, "host", missing[0], self.index)
                else:
                    names = expanded
            elif _GLOB_CHARS.intersection(item):
                rx = re.compile(fnmatch.translate(item))
                names = [h.name for h in self.hosts if rx.match(h.name)]
                if not names:
                    self.report.value(path, f"{item!r} matches no host")
                    names = None
            else:
                self._unknown(path, "host", item, self.index)
        if names is not None:  # failures are not cached: each use gets its own diagnostic
            self._on_cache[item] = names
        return names

    def _programs(self) -> None:
        programs = as_map(self.doc.get("programs"))
        graph: dict[str, list[str]] = {}
        following: dict[str, list[str]] = {}
        for name, value in programs.items():
            spec = as_map(value)
            path: KeyPath = ("programs", name)
            problem = name_problem(name)
            if problem:
                self.report.key(path, f"invalid program name {name!r}: {problem}")
            requires = []
            for i, req in name_items(spec.get("requires")):
                req_path = (*path, "requires") if i is None else (*path, "requires", i)
                if req not in programs:
                    self._unknown(req_path, "program", req, programs)
                elif req not in requires:
                    requires.append(req)
            graph[name] = requires
            followed = self._names(path, "restart_with", spec, programs)
            following[name] = followed
            program = self._program(name, path, spec, tuple(requires))
            if program is not None:
                tags = tuple(self._names(path, "tags", spec, None))
                autostart = spec.get("autostart") is True
                if autostart and program.kind == "job":
                    self.report.value(
                        (*path, "autostart"),
                        "a job cannot autostart: it runs once, when rex apply launches it",
                        "remove autostart, or make the program a service",
                    )
                self.programs.append(
                    replace(program, tags=tags, restart_with=tuple(followed), autostart=autostart)
                )
                self._specs[name] = spec
        if not cycles.report_cycles(self.report, graph, list(programs), "requires"):
            # restart_with orders a program after what it follows, as requires does
            both = {n: [*graph[n], *following[n]] for n in graph}
            cycles.report_cycles(self.report, both, list(programs), "restart_with", following)

    def _render(self) -> None:
        """Render each program's templated fields for each of its hosts (core.perhost)."""
        perhost.render_programs(
            self.report,
            self.programs,
            self._specs,
            hosts=self.hosts,
            logins={name: u.login for name, u in self.users.items()},
            defaults=dict(perhost.freeze_vars(self.defaults.get("vars"))),
        )

    def _names(
        self, path: KeyPath, key: str, spec: dict[str, Any], programs: dict[str, Any] | None
    ) -> list[str]:
        """A program's ``restart_with`` (``programs``: names that must be programs) or ``tags``
        (None: names that must be valid names), each once, in order."""
        names: list[str] = []
        for i, item in name_items(spec.get(key)):
            where = (*path, key) if i is None else (*path, key, i)
            if programs is not None and item not in programs:
                self._unknown(where, "program", item, programs)
            elif programs is None and name_problem(item):
                self.report.value(where, f"invalid tag {item!r}: {name_problem(item)}")
            elif item not in names:
                names.append(item)
        return names

    def _program(
        self, name: str, path: KeyPath, spec: dict[str, Any], requires: tuple[str, ...]
    ) -> Program | None:
        report, d = self.report, self.defaults
        run, shell = spec.get("run"), spec.get("shell")
        if "run" in spec and "shell" in spec:
            report.key((*path, "shell"), "give either run or shell, not both")
        elif "run" not in spec and "shell" not in spec:
            report.key(
                path,
                f"program {name!r} has neither run nor shell",
                "add run: [argv...] or shell: 'command line'",
            )
        on = name_items(spec.get("on"))
        selected: set[str] = set()
        # past MAX_STEPS (reported once) a program's hosts are not gathered: the manifest
        # is refused, and 200 programs on 100,000 hosts must not cost their 20 million steps
        over = self.steps > MAX_STEPS
        for i, item in on:
            on_path = (*path, "on") if i is None else (*path, "on", i)
            names = self._on(on_path, item)
            if names and not over:
                selected.update(names)
        hosts = tuple(sorted(selected, key=self.index.__getitem__))
        self.steps += len(hosts)
        if self.steps > MAX_STEPS and not over:
            where = (*path, "on") if "on" in spec else path
            report.add(
                report.where(where, key="on" not in spec),
                where,
                f"the manifest makes more than {MAX_STEPS:,} steps (programs x their hosts): "
                f"{self.steps:,} with this program's {len(hosts):,}",
                "split the manifest, or narrow on: (rex --limit narrows a run, not the manifest)",
            )
        if spec.get("on") == []:
            report.value((*path, "on"), "'on' selects no host")
        user, host_users = self._program_users(path, spec, hosts)
        timeouts = self._timeouts(spec.get("timeouts"), self.timeouts)
        ready = settings.ready(report, (*path, "ready"), spec.get("ready"), timeouts.ready)
        placement = settings.placement(
            report, (*path, "placement"), spec.get("placement"), len(hosts)
        )
        files = settings.files(report, (*path, "files"), spec.get("files"), self.base_dir)
        env = as_pairs(spec.get("env"))
        for key, _ in env:
            if not _ENV_RE.match(key):
                report.key((*path, "env", key), f"invalid environment variable name {key!r}")
            elif key in RESERVED_ENV:
                report.key((*path, "env", key), f"{key} is set by rex; choose another name")
        when = as_map(spec.get("when"))
        become = self.become.of(path, spec, user)
        if user is None:
            return None
        by_user: dict[str, list[str]] = {}
        for h in hosts:
            by_user.setdefault(host_users.get(h, user), []).append(h)
        for who, theirs in by_user.items():
            if not (NAME_RE.match(name) and NAME_RE.match(who)):
                continue
            denied = self._unauthorized(tuple(theirs), who, name)
            if denied:
                shown = ", ".join(triple(h, who, name) for h in denied[:3])
                more = f" and {len(denied) - 3} more" if len(denied) > 3 else ""
                where = (*path, "on") if "on" in spec else path
                report.add(
                    report.where(where, key="on" not in spec),
                    where,
                    f"{len(denied)} step(s) not authorized: {shown}{more}",
                    f"add a pattern to authorize, e.g. '{triple(denied[0], who, name)}' "
                    f"or '*.{who}.{name}'",
                )
        return Program(
            name=name,
            hosts=hosts,
            user=user,
            run=tuple(run) if isinstance(run, list) else None,
            shell=shell if isinstance(shell, str) else None,
            on=tuple(item for _, item in on),
            requires=requires,
            ready=ready,
            env=env,
            cwd=as_str(spec.get("cwd"), None),
            kind=as_str(spec.get("kind"), as_str(d.get("kind"), "service")) or "service",
            restart=as_str(spec.get("restart"), as_str(d.get("restart"), "no")) or "no",
            placement=placement,
            when=When(
                max_load=as_num(when["max_load"], 0.0) if "max_load" in when else None,
                min_free_mb=as_int(when["min_free_mb"], 0) if "min_free_mb" in when else None,
                required=when.get("required") is True,
            ),
            files=files,
            stop_timeout=as_num(spec.get("stop_timeout"), as_num(d.get("stop_timeout"), 10.0)),
            timeouts=timeouts,
            policy=settings.policy(spec, d),
            become=become,
            logs=settings.logs(report, (*path, "logs"), spec.get("logs"), self.logs),
            env_clear=spec.get("env_clear", d.get("env_clear")) is True,
            host_users=tuple(host_users.items()),
        )

    def _program_users(
        self, path: KeyPath, spec: dict[str, Any], hosts: tuple[str, ...]
    ) -> tuple[str | None, dict[str, str]]:
        """(the program's user, {host: user} where a host's own user differs from it).

        The program's ``user``, else per host its ``hosts.*.user``, else defaults.user, else
        the only user."""
        d = self.defaults
        user = as_str(spec.get("user"), None)
        if user is not None:
            if user not in self.users:
                self._unknown((*path, "user"), "user", user, self.users)
                return None, {}
            return user, {}
        if isinstance(d.get("user"), str):
            fallback = d["user"] if d["user"] in self.users else None
        elif len(self.users) == 1:
            fallback = next(iter(self.users))
        else:
            fallback = None
        own = {h: u for h in hosts if (u := self.hosts[self.index[h]].user) in self.users}
        if fallback is None and hosts and len(own) == len(hosts):
            fallback = own[hosts[0]]
        if fallback is None:
            if not d.get("user") or d["user"] in self.users:
                self.report.key(
                    path,
                    f"program {path[-1]!r} has no user",
                    "set user: on the program, hosts.*.user on each of its hosts, or defaults.user",
                )
            return None, {}
        return fallback, {h: u for h, u in own.items() if u != fallback}
