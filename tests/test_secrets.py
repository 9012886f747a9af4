"""Secret hygiene: no key and no nonce ever shows in argv, an environment, an output or a log.

One three-host run of `rex_key create`, `rex_key distribute`, `rex audit --remote` and `rex
apply` while a sampler reads every /proc/*/cmdline and /proc/*/environ each 50 ms. Then every
sample, every output and every file the run wrote (outside the key stores, where keys belong)
is searched for each key (and its two derived MAC keys) and each nonce this process drew, raw,
in hex and in base64.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import helpers_procs as procs
import pytest
from oracle import Oracle
from sshrig import RigHost, SshdRig

from rexplan.cli.rex import main
from rexplan.cli.rex_key import main as rex_key
from rexplan.wire import handshake, keyfile

SAMPLE_EVERY = 0.05
MAX_SAMPLES = 20_000  # distinct cmdline/environ contents kept; far above what a run makes
MAX_FILE = 8 << 20


class ProcSampler:
    """A bounded background thread keeping each distinct /proc/*/{cmdline,environ} content."""

    def __init__(self) -> None:
        self.seen: dict[bytes, str] = {}
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                for part in ("cmdline", "environ"):
                    with contextlib.suppress(OSError):
                        data = Path(f"/proc/{name}/{part}").read_bytes()
                        if data not in self.seen and len(self.seen) < MAX_SAMPLES:
                            self.seen[data] = f"/proc/{name}/{part}"
            self.rounds += 1
            self._stop.wait(SAMPLE_EVERY)


def forms(secret: bytes) -> list[bytes]:
    """How a secret could show: raw, hex (both cases), base64 (standard and URL-safe)."""
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
    ]


def files_under(root: Path, skip: Callable[[Path], bool]) -> Iterator[Path]:
    if not root.exists():
        return
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and not skip(path):
            yield path


@pytest.fixture
def nonces(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every nonce drawn in this process (the launch nonces nl, the listener's ns)."""
    drawn: list[bytes] = []
    real = handshake.new_nonce

    def recording() -> bytes:
        nonce = real()
        drawn.append(nonce)
        return nonce

    monkeypatch.setattr(handshake, "new_nonce", recording)
    return drawn


def test_no_key_or_nonce_leaks_anywhere(
    sshd_rig: SshdRig,
    fresh_sshd: Callable[[], RigHost],
    tmp_path: Path,
    nonces: list[bytes],
    no_orphans: Oracle,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    # hosts of its own: shared ones hold other tests' keys, which audit rightly reports
    hosts = [fresh_sshd() for _ in range(3)]
    user = f"s{secrets.token_hex(4)}"
    programs = {"svc": {"run": ["sleep", "300"], "ready": {"alive": 0.2}}}
    doc = {
        "rex": 1,
        "defaults": {
            "user": user,
            "timeouts": {"connect": 5, "start": 5, "callback": 5, "ready": 3},
            "stop_timeout": 1,
        },
        "hosts": {h.name: {"address": h.address, "port": h.port} for h in hosts},
        "users": {user: {"login": sshd_rig.login, "identity": sshd_rig.identity}},
        "programs": {
            p: {**spec, "on": [h.name for h in hosts], "env": {"REXTEST": no_orphans.tag}}
            for p, spec in programs.items()
        },
        "authorize": ["*.*.*"],
    }
    manifest = tmp_path / "site.yaml"
    manifest.write_text(json.dumps(doc))
    keys = tmp_path / "keys"
    events = tmp_path / "events.jsonl"
    pinned = ["--known-hosts", sshd_rig.known_hosts]
    store = ["--keys", str(keys)]
    commands = [
        (rex_key, ["create", "-m", str(manifest), *store]),
        (rex_key, ["distribute", "-m", str(manifest), *store, *pinned]),
        (main, ["audit", str(manifest), "--remote", *store, *pinned]),
        (main, ["apply", str(manifest), "-y", *store, *pinned, "--events", str(events)]),
    ]
    outputs: list[tuple[str, str]] = []
    homes = [Path(h.state_dir_for(sshd_rig.login)) for h in hosts]
    with ProcSampler() as sampler:
        for entry, argv in commands:
            code = entry(argv)
            out, err = capsys.readouterr()
            outputs.append((f"rex {argv[0]} output", out + err))
            assert code == 0, out + err
        time.sleep(2 * SAMPLE_EVERY)  # a last round with every program running
    try:
        assert sampler.rounds >= 3
        ready = [json.loads(line) for line in events.read_text().splitlines()]
        pids = [e["pid"] for e in ready if e["kind"] == "step" and e["state"] == "ready"]
        assert len(pids) == 3
    finally:
        for home in homes:
            record = json.loads(procs.record_path(home, "svc").read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(record["agent"]), signal.SIGTERM)
        end = time.monotonic() + 10
        while any(Path(f"/proc/{r}").exists() for r in pids) and time.monotonic() < end:
            time.sleep(0.05)

    # what must never show
    needles: dict[bytes, str] = {}
    triples = []
    for path in keys.rglob("*.key"):
        triple, _, secret = keyfile.parse_key_file(path.read_bytes())
        triples.append(triple)
        k_l, k_a = handshake.direction_keys(secret)
        for what, value in (("key", secret), ("K_L", k_l), ("K_A", k_a)):
            for form in forms(value):
                needles[form] = f"{what} of {triple}"
    assert sorted(triples) == sorted(f"{h.name}.{user}.svc" for h in hosts)
    launch_nonces = len(pids)  # one nl per step, one ns per connection
    assert len(nonces) >= 2 * launch_nonces
    for nonce in nonces:
        for form in forms(nonce):
            needles[form] = "a nonce"

    # where it must not show
    haystacks: list[tuple[str, bytes]] = [(where, data) for data, where in sampler.seen.items()]
    haystacks += [(where, text.encode()) for where, text in outputs]
    haystacks.append(("log records", caplog.text.encode()))
    for home in homes:
        for path in files_under(home, lambda p, h=home: p.is_relative_to(h / "keys")):
            haystacks.append((str(path), path.read_bytes()[:MAX_FILE]))
    for path in files_under(tmp_path, lambda p: p.is_relative_to(keys)):
        haystacks.append((str(path), path.read_bytes()[:MAX_FILE]))
    for path in files_under(Path(sshd_rig.base) / "hosts", lambda p: p.suffix != ".log"):
        haystacks.append((str(path), path.read_bytes()[:MAX_FILE]))
    # the sampler saw the programs (their environment) and the agents (their argv)
    assert any(f"REXTEST={no_orphans.tag}".encode() in data for data in sampler.seen)
    assert any(b"agent-" in data and b"-I\0-S" in data for data in sampler.seen)
    assert any(where.endswith(".svc.log") and "/logs/" in where for where, _ in haystacks)
    assert any("events.jsonl" in where for where, _ in haystacks)

    hits = [
        f"{label} in {where}"
        for where, data in haystacks
        for needle, label in needles.items()
        if needle in data
    ]
    assert hits == [], "\n".join(hits)
    searched = sum(len(data) for _, data in haystacks)
    assert searched > 100_000, searched  # the search really looked at something
