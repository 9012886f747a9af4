"""Fuzzing the parsers that read untrusted bytes: the manifest loader, rex-cb/1 frames, the
agent's launch line and its kill request.

Only the documented errors may escape (ManifestError; FrameError, LaunchError), each case uses
under CPU_LIMIT seconds of CPU (and WALL_LIMIT of wall time) and allocates under MEMORY_CAP.
CPU time rather than hypothesis' wall-clock deadline: on a loaded CI machine a 15 ms case can
take 1.8 s of wall time, and a flaky deadline would hide nothing but noise. CI runs EXAMPLES
cases per target; REX_FUZZ_LONG=1 runs FUZZ_LONG_EXAMPLES. Inputs that ever broke a parser
(or were built to) live in tests/data/fuzz/<target>/ and are replayed by test_regression_inputs.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rexplan.core import manifest
from rexplan.core import plan as planner
from rexplan.errors import ManifestError
from rexplan.wire import chars, codes, frames, handshake, keyfile, messages
from rexplan.wire.launch import (
    LaunchError,
    make_kill,
    make_launch,
    parse_kill,
    parse_launch,
    spec_digest,
)

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = Path(__file__).resolve().parent / "data" / "fuzz"
PLAYBOOKS = sorted((ROOT / "playbooks").glob("*.yaml"))
MEMORY_CAP = 64 * 1024 * 1024
CPU_LIMIT = 1.0
WALL_LIMIT = 10.0
FUZZ_LONG_EXAMPLES = 20_000
EXAMPLES = FUZZ_LONG_EXAMPLES if os.environ.get("REX_FUZZ_LONG") == "1" else 200

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,  # bounded() checks CPU time instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def bounded(run: Callable[[], object]) -> None:
    """Run one case; fail past CPU_LIMIT, WALL_LIMIT or MEMORY_CAP.

    Tracing covers the case only, so hypothesis generating the input is not slowed by it
    (tracemalloc also slows the case itself several times: the CPU limit allows for it).
    """
    tracemalloc.start()
    cpu, wall = time.thread_time(), time.monotonic()
    try:
        run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    assert peak < MEMORY_CAP, f"one case allocated {peak / 2**20:.1f} MiB"
    assert cpu < CPU_LIMIT and wall < WALL_LIMIT, f"one case took {cpu:.2f} s CPU, {wall:.2f} s"


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    """Compile the schema and import what the loader imports lazily before any timed case."""
    for path in PLAYBOOKS:
        load_manifest(path.read_bytes())
    load_manifest("rex: 1\nhosts: {a: {port: x}}\nbogus: 1\n")


def load_manifest(data: bytes | str) -> None:
    """The loader and the planner: records, or ManifestError (PlanError is one)."""
    try:
        planner.compile(manifest.loads(data, "fuzz.yaml"))
    except ManifestError as exc:
        assert exc.diagnostics and str(exc)


# ---- manifest: random bytes, grammar-built YAML, mutated playbooks -------------------------------

KEYS = [
    "rex", "defaults", "hosts", "users", "programs", "authorize", "callback", "forks",
    "address", "port", "user", "transport", "groups", "login", "identity", "ssh_options",
    "python", "run", "shell", "on", "requires", "ready", "tcp", "http", "command", "file",
    "notify", "alive", "timeout", "interval", "settle", "env", "cwd", "files", "src", "dest",
    "mode", "placement", "restart", "kind", "timeouts", "connect", "start", "stop_timeout",
    "bind", "advertise", "db1", "app[1-3]", "node[001-100]", "web", "www-data", "postgres",
    "<<", "?", "-",
]  # fmt: skip
SCALARS = [
    "1", "0", "-1", "22", "65536", "0x1F", "0o17", "1e3", ".inf", "-.nan", "true", "no", "on",
    "null", "~", "", "''", '""', "local", "ssh", "service", "job", "always", "on-failure",
    "127.0.0.1", "::1", "localhost", "group:db", "*.*.*", "db1.postgres.db", "app*",
    "node[1-3]", "node[3-1]", "node[01-1000000]", "[", "]", "{", "}", "*", "&a", "*a",
    "!!str", "!!python/object:os.system", "!!binary aGk=", "%YAML 1.1", "---", "...",
    "'it''s'", '"\\u0000"', '"\\x85"', "a: b", "- x", "|", ">", "#", "@", "`", "\t",
    "/bin/sh", "~/.ssh/id_ed25519", "../../etc/passwd", "$(id)", "a" * 300,
]  # fmt: skip
TOKENS = [
    ":", " ", "\n", "  ", "-", "- ", "[", "]", "{", "}", ",", "&x ", "*x", "!!map ", "'",
    '"', "#", "|\n", ">-\n", "? ", "<<: *x\n", "---\n", "\t", "\ufeff", "%TAG ! x\n",
]  # fmt: skip


def random_node(rng: random.Random, depth: int = 0) -> Any:
    """A scalar, a list, or a key list (a mapping that may repeat keys), up to depth 4."""
    roll = rng.random()
    if depth >= 4 or roll < 0.45:
        pick = rng.random()
        if pick < 0.7:
            return rng.choice(SCALARS)
        if pick < 0.85:
            return str(rng.randint(-(2**70), 2**70))
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(8)))
    size = rng.randrange(5)
    if roll < 0.65:
        return [random_node(rng, depth + 1) for _ in range(size)]
    return [(rng.choice(KEYS), random_node(rng, depth + 1)) for _ in range(size)]


def render(node: Any, indent: int, flow: bool) -> str:
    """YAML-ish text of ``node``: block or flow style; a key list may repeat keys."""
    pad = " " * indent
    if isinstance(node, str):
        return node
    if not node:
        return "[]" if flow else "{}"
    if isinstance(node[0], tuple):
        if flow:
            return "{" + ", ".join(f"{k}: {render(v, 0, True)}" for k, v in node) + "}"
        lines = []
        for key, value in node:
            if isinstance(value, list) and value:
                lines.append(f"{pad}{key}:\n{render(value, indent + 2, False)}")
            else:
                lines.append(f"{pad}{key}: {render(value, indent + 2, True)}")
        return "\n".join(lines)
    if flow:
        return "[" + ", ".join(render(v, 0, True) for v in node) + "]"
    return "\n".join(f"{pad}- {render(v, indent + 2, True)}" for v in node)


def yamlish(rng: random.Random) -> str:
    """Text from the grammar of rex manifests, often broken on purpose.

    Built from one seed rather than from hypothesis draws: generating a document draw by draw
    costs ~50 ms, a hundred times the loader's own time on it.
    """
    body = [(rng.choice(KEYS), random_node(rng)) for _ in range(rng.randint(1, 8))]
    text = render(body, 0, rng.random() < 0.3)
    if rng.random() < 0.7:
        text = "rex: 1\n" + text
    for _ in range(rng.randrange(4)):
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(TOKENS) + text[at:]
    return text


@st.composite
def mutated_playbook(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(PLAYBOOKS)).read_bytes())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "delete", "duplicate", "insert", "token"]))
        if how == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif how == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 200))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[at:at] = draw(st.sampled_from(TOKENS + SCALARS)).encode()
    return bytes(data)


@fuzz
@given(st.binary(max_size=4096))
def test_manifest_random_bytes(data: bytes) -> None:
    bounded(lambda: load_manifest(data))


@fuzz
@given(st.randoms(use_true_random=False))
def test_manifest_grammar_built_yaml(rng: random.Random) -> None:
    text = yamlish(rng)
    bounded(lambda: load_manifest(text))


@fuzz
@given(mutated_playbook())
def test_manifest_mutated_playbooks(data: bytes) -> None:
    bounded(lambda: load_manifest(data))


# ---- frames, messages and the launch line ----------------------------------------------------


def read_frames(data: bytes, cuts: list[int]) -> None:
    """Feed ``data`` to one FrameReader in chunks cut at ``cuts``; stop at the first error."""
    reader = frames.FrameReader()
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    try:
        for a, b in itertools.pairwise(edges):
            for msg in reader.feed(data[a:b]):
                assert isinstance(msg, dict)
                with_type(msg)
    except codes.FrameError as exc:
        assert exc.code in codes.CODES


def with_type(msg: dict[str, Any]) -> None:
    """check_message as each side calls it; a hello that passes has a transcript."""
    expectations = [(kind,) for kind in MESSAGE_TYPES]
    expectations += [("chal", "no"), ("ok", "no"), ("resp", "decl", "same")]
    for expected in expectations:
        try:
            checked = messages.check_message(msg, *expected)
        except codes.FrameError as exc:
            assert exc.code in codes.CODES
            continue
        if checked["t"] == "hello":
            assert handshake.transcript(checked)


HELLO = handshake.make_hello(
    run="run1",
    step="app@h1",
    triple="h1.alice.app",
    key_id=keyfile.key_id(bytes(32)),
    na=bytes(16),
    pid=4242,
    pgid=4242,
    start="99",
)
GOOD_FRAMES = [
    frames.encode_frame(HELLO),
    frames.encode_frame(handshake.make_chal(bytes(16), bytes(32))),
    frames.encode_frame(handshake.make_resp(bytes(32))),
    frames.encode_frame(handshake.make_ok(bytes(32))),
    frames.encode_frame(handshake.make_no("abc123")),
]
#: every message type and field rex-cb/1 knows, read from its schema so new ones are fuzzed too
MESSAGE_TYPES = sorted(messages._MESSAGES)
MESSAGE_KEYS = ["t", *sorted({name for fields in messages._MESSAGES.values() for name in fields})]
WORDS = [*MESSAGE_TYPES, "rex-cb/1", "rex-cb/2", "0" * 32, "a" * 64, "1", "aGk=", "=="]
WORDS += ["h1.alice.app", "app@h1", "run1", "", " ", "\n", "\u0000", "\ud800", "A" * 64]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, leaning to the words and numbers rex-cb/1 messages hold."""
    roll = rng.random()
    if depth >= 3 or roll < 0.7:
        return rng.choice(
            [
                None,
                True,
                False,
                rng.choice(WORDS),
                rng.randint(-(2**64), 2**64),
                rng.choice([0, 1, 2, 4242, 2**31, 2**32]),
                rng.uniform(-1e300, 1e300),
                "".join(chr(rng.randrange(0x20, 0x800)) for _ in range(rng.randrange(6))),
            ]
        )
    if roll < 0.85:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return random_message(rng, depth + 1)


def random_message(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A JSON object over the message keys; often a real message with a few fields changed."""
    msg = dict(rng.choice([HELLO, {}, *({"t": kind} for kind in MESSAGE_TYPES)]))
    for _ in range(rng.randrange(5)):
        if msg and rng.random() < 0.3:
            msg.pop(rng.choice(sorted(msg)))
        else:
            msg[rng.choice(MESSAGE_KEYS)] = random_json(rng, depth + 1)
    return msg


def frame_stream(rng: random.Random) -> bytes:
    """Frames back to back: good, raw bytes, any JSON object, mutated, or a bare header."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["good", "raw", "json", "mutated", "header"])
        if kind == "good":
            parts.append(rng.choice(GOOD_FRAMES))
        elif kind == "raw":
            parts.append(rng.randbytes(rng.randrange(300)))
        elif kind == "json":
            payload = json.dumps(random_message(rng)).encode()
            parts.append(len(payload).to_bytes(4, "big") + payload)
        elif kind == "mutated":
            frame = bytearray(rng.choice(GOOD_FRAMES))
            frame[rng.randrange(len(frame))] = rng.randrange(256)
            parts.append(bytes(frame))
        else:
            parts.append(rng.randrange(2**32).to_bytes(4, "big"))
    return b"".join(parts)


@fuzz
@given(st.randoms(use_true_random=False))
def test_frame_reader_in_random_chunks(rng: random.Random) -> None:
    data = frame_stream(rng)
    cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(20))]
    bounded(lambda: read_frames(data, cuts))


def read_one_frame(data: bytes) -> None:
    try:
        with_type(frames.decode_frame(data))
    except codes.FrameError as exc:
        assert exc.code in codes.CODES


@fuzz
@given(st.binary(max_size=600))
def test_decode_frame_random_bytes(data: bytes) -> None:
    bounded(lambda: read_one_frame(data))


@fuzz
@given(st.randoms(use_true_random=False))
def test_decode_frame_and_check_message(rng: random.Random) -> None:
    data = frame_stream(rng)
    msg = random_message(rng)
    bounded(lambda: (read_one_frame(data), with_type(msg)))


GOOD_LAUNCH = make_launch(
    run="run1",
    step="app@h1",
    triple="h1.alice.app",
    key_path="h1/alice/app.key",
    nl=bytes(16),
    callback=("127.0.0.1", 4000),
    deadlines={"start": 5, "ready": 5, "callback": 5, "stop": 2},
    argv=["/bin/echo", "hi"],
    env={"A": "1"},
    cwd="/tmp",
    ready={"kind": "tcp", "port": 80},
    log="app",
    tags={"REX_SPEC": "x"},
)
LAUNCH_KEYS = [*json.loads(GOOD_LAUNCH), "kind", "port", "path", "url", "interval"]


def launch_line(rng: random.Random) -> bytes:
    """Raw bytes, a byte-mutated good line, or a good line with fields dropped or replaced."""
    kind = rng.choice(["raw", "mutated", "fields", "fields"])
    if kind == "raw":
        return rng.randbytes(rng.randrange(600))
    if kind == "mutated":
        line = bytearray(GOOD_LAUNCH)
        for _ in range(rng.randint(1, 4)):
            line[rng.randrange(len(line))] = rng.randrange(256)
        return bytes(line)
    msg = json.loads(GOOD_LAUNCH)
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(LAUNCH_KEYS)
        target = msg.get("ready") if name in ("port", "path", "url", "interval") else msg
        if not isinstance(target, dict):
            continue
        if rng.random() < 0.3:
            target.pop(name, None)
        else:
            target[name] = random_json(rng)
    return json.dumps(msg).encode() + b"\n"


def read_launch(line: bytes) -> None:
    try:
        launch = parse_launch(line)
    except LaunchError as exc:
        assert str(exc)
        return
    assert spec_digest(launch)


@fuzz
@given(st.randoms(use_true_random=False))
def test_parse_launch(rng: random.Random) -> None:
    line = launch_line(rng)
    bounded(lambda: read_launch(line))


GOOD_KILL = make_kill("20260101T000000-" + "0" * 32, "app@h1", 2.0)


def kill_line(rng: random.Random) -> bytes:
    """Raw bytes, a byte-mutated good request, or one with fields dropped or replaced."""
    kind = rng.choice(["raw", "mutated", "fields"])
    if kind == "raw":
        return rng.randbytes(rng.randrange(300))
    if kind == "mutated":
        line = bytearray(GOOD_KILL)
        for _ in range(rng.randint(1, 4)):
            line[rng.randrange(len(line))] = rng.randrange(256)
        return bytes(line)
    msg = json.loads(GOOD_KILL)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["v", "run", "step", "grace", "extra"])
        if rng.random() < 0.3:
            msg.pop(name, None)
        else:
            msg[name] = random_json(rng)
    return json.dumps(msg).encode() + b"\n"


def read_kill(line: bytes) -> None:
    try:
        run, step, grace = parse_kill(line)
    except LaunchError as exc:
        assert str(exc)
        return
    assert chars.RUN_RE.match(run) and chars.STEP_RE.match(step) and 0 <= grace <= 86400


@fuzz
@given(st.randoms(use_true_random=False))
def test_parse_kill(rng: random.Random) -> None:
    line = kill_line(rng)
    bounded(lambda: read_kill(line))


# ---- inputs that once broke a parser (or were built to) --------------------------------------

TARGETS: dict[str, Callable[[bytes], None]] = {
    "manifest": load_manifest,
    "frames": lambda data: read_frames(data, list(range(0, len(data), 7))),
    "launch": read_launch,
    "kill": read_kill,
}


def regression_cases() -> list[Any]:
    return [
        pytest.param(target, path, id=f"{target}/{path.name}")
        for target in sorted(TARGETS)
        for path in sorted((REGRESSIONS / target).glob("*"))
    ]


@pytest.mark.parametrize(("target", "path"), regression_cases())
def test_regression_inputs(target: str, path: Path) -> None:
    data = path.read_bytes()
    bounded(lambda: TARGETS[target](data))


def test_every_target_has_regression_inputs() -> None:
    assert {t for t in TARGETS if any((REGRESSIONS / t).glob("*"))} == set(TARGETS)
