"""Shared by the lifecycle and job tests: manifests over the sshd rig, run through rex's main()."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers_procs as procs
import pytest
from sshrig import RigHost, SshdRig

from rexplan.cli.rex import main
from rexplan.cli.rex_key import main as rex_key

Hosts = Callable[[int], list[RigHost]]
TIMEOUTS = {"connect": 5, "start": 5, "callback": 5, "ready": 3}
SLEEPER = {"run": ["sleep", "300"], "ready": {"alive": 0.2}}


@dataclass
class Run:
    """One `rex apply`: its exit code, events and output."""

    code: int
    events: list[dict[str, Any]]
    out: str = ""
    err: str = ""

    @property
    def id(self) -> str:
        return str(self.events[0]["run"])

    def final(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for e in self.events:
            if e["kind"] == "step":
                out[e["step"]] = e
        return out

    def actions(self) -> dict[str, str]:
        return {s: e.get("action") or e["state"] for s, e in self.final().items()}

    def pids(self) -> dict[str, int]:
        return {s: e["pid"] for s, e in self.final().items() if e.get("pid")}

    def states(self) -> dict[str, str]:
        return {step: e["state"] for step, e in self.final().items()}

    def only(self) -> dict[str, Any]:
        """The last state event of the run's one step."""
        (event,) = self.final().values()
        return event

    def index(self, program: str, state: str) -> list[int]:
        """Positions in the event stream where a step of ``program`` entered ``state``."""
        return [
            i
            for i, e in enumerate(self.events)
            if e["kind"] == "step" and e["program"] == program and e["state"] == state
        ]

    def summarized(self, program: str, reason: str) -> bool:
        """The plain summary names the program with this reason."""
        return f"{program}: {reason}" in self.out


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON events a run wrote to ``path`` so far ([] before it wrote any)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def new_tag() -> str:
    """Put into every test program's environment (REXTEST) to find what a test started."""
    return secrets.token_hex(8)


def nothing_left(match: Callable[[dict[str, str]], bool]) -> None:
    """Fail if a process ``match`` accepts still runs; kill such leftovers by pid."""
    left = procs.find(match)
    described = procs.describe(left)
    procs.kill(left)
    assert not left, f"processes of this test still running: {described}"


@dataclass
class World:
    """Manifests over rig hosts for one manifest user of this test's own (own keys, triples)."""

    rig: SshdRig
    tmp: Path
    tag: str
    capsys: pytest.CaptureFixture[str]
    user: str = field(default_factory=lambda: f"u{secrets.token_hex(4)}")
    hosts: dict[str, RigHost] = field(default_factory=dict)
    programs: set[str] = field(default_factory=set)
    leftovers: list[Path] = field(default_factory=list)
    count: int = 0

    @property
    def keys(self) -> Path:
        return self.tmp / "keys"

    def manifest(
        self,
        hosts: Sequence[RigHost],
        programs: Mapping[str, Mapping[str, Any]],
        *,
        defaults: Mapping[str, Any] | None = None,
        name: str = "m.yaml",
    ) -> Path:
        self.hosts.update({h.name: h for h in hosts})
        self.programs.update(programs)
        doc: dict[str, Any] = {
            "rex": 1,
            "defaults": {
                "user": self.user,
                "timeouts": TIMEOUTS,
                "stop_timeout": 1,
                **(defaults or {}),
            },
            "hosts": {h.name: {"address": h.address, "port": h.port} for h in hosts},
            "users": {self.user: {"login": self.rig.login, "identity": self.rig.identity}},
            "programs": {
                p: {**spec, "env": {**spec.get("env", {}), "REXTEST": self.tag}}
                for p, spec in programs.items()
            },
            "authorize": ["*.*.*"],
        }
        path = self.tmp / name
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    def distribute(self, manifest: Path) -> None:
        for argv in (
            ["create", "-m", str(manifest)],
            ["distribute", "-m", str(manifest), "--known-hosts", self.rig.known_hosts],
        ):
            code = rex_key([*argv, "--keys", str(self.keys)])
            out, err = self.capsys.readouterr()
            assert code == 0, out + err

    def rex(self, *argv: str) -> tuple[int, str, str]:
        """`rex COMMAND ...` in this process, with this world's keys and known_hosts."""
        command, *rest = argv
        code = main(
            [command, "--keys", str(self.keys), "--known-hosts", self.rig.known_hosts, *rest]
        )
        out, err = self.capsys.readouterr()
        return code, out, err

    def apply(self, manifest: Path, *extra: str) -> Run:
        self.count += 1
        path = self.tmp / f"events-{self.count}.jsonl"
        code, out, err = self.rex("apply", str(manifest), "-y", "--events", str(path), *extra)
        events = [json.loads(line) for line in path.read_text().splitlines()]
        return Run(code, events, out, err)

    def status(self, manifest: Path, *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
        code, out, _ = self.rex("status", str(manifest), "--json", *extra)
        doc = json.loads(out)
        return code, {s["id"]: s for s in doc["steps"]}

    def home(self, host: str) -> str:
        return self.hosts[host].state_dir_for(self.rig.login)

    def triple(self, host: str, program: str) -> str:
        return f"{host}.{self.user}.{program}"

    def record(self, host: str, program: str) -> dict[str, Any]:
        """The agent's record of the triple host.user.program (named by the triple)."""
        return dict(procs.read_state(self.home(host), self.triple(host, program)))

    def tagged(self, host: str | None = None, program: str | None = None) -> list[int]:
        """This test's live processes, or those of one triple."""
        if host is None or program is None:
            return procs.tagged(REXTEST=self.tag)
        return procs.tagged(REXTEST=self.tag, REX_TRIPLE=f"{host}.{self.user}.{program}")

    def cleanup(self) -> None:
        for path in self.leftovers:
            path.unlink(missing_ok=True)
        for host in self.hosts.values():
            home = Path(host.state_dir_for(self.rig.login))
            for program in self.programs:
                for named in (program, *(self.triple(h, program) for h in self.hosts)):
                    for name in (
                        f"run/{named}.json",
                        f"run/{named}.id",
                        f"run/{named}.lock",
                        f"logs/{named}.log",
                    ):
                        (home / name).unlink(missing_ok=True)
                    shutil.rmtree(home / "files" / named, ignore_errors=True)
            # the keys this world's user distributed there: a later test auditing that host
            # must not find them (they would show as UNAUTHORIZED triples of another user)
            for name in self.hosts:
                shutil.rmtree(home / "keys" / name / self.user, ignore_errors=True)
                (home / "keys" / name / f"{self.user}.key").unlink(missing_ok=True)


def open_world(
    rig: SshdRig,
    tmp_path: Path,
    tag: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    """The body of a ``world`` fixture: a World, stopped and cleaned up afterwards."""
    monkeypatch.setenv("REX_STATE_DIR", str(tmp_path / "state"))
    w = World(rig, tmp_path, tag, capsys)
    yield w
    left = w.tagged()
    described = procs.describe(left)
    manifest = tmp_path / "m.yaml"
    if left and manifest.exists():
        w.rex("stop", str(manifest), "--force")
    w.cleanup()
    assert not left, f"processes of this test still running: {described}"
