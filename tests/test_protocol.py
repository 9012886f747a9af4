"""rex-cb/1 as pure code: frames, strict messages, the transcript, proofs and the launch line."""

from __future__ import annotations

import _operator
import ast
import hashlib
import hmac
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexplan.wire import chars, codes, crypto, handshake, jsonstrict, keyfile, messages, probes
from rexplan.wire.frames import MAX_FRAME, FrameReader, decode_frame, encode_frame
from rexplan.wire.launch import (
    MAX_LAUNCH,
    LaunchError,
    Probe,
    make_kill,
    make_launch,
    parse_kill,
    parse_launch,
    spec_digest,
)

PACKAGE = Path(__file__).resolve().parent.parent / "rexplan"
#: the modules of rexplan/wire, shipped to hosts with the agent
WIRE = sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "wire").glob("*.py"))
#: what ships to hosts from rexplan/remote: the agent's modules, its first stages, the relay
REMOTE = sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "remote").rglob("*.py"))
KEY = bytes(range(32))
NL = bytes(range(100, 116))


def hello(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run": "run1",
        "step": "app@h1",
        "triple": "h1.alice.app",
        "key_id": keyfile.key_id(KEY),
        "na": bytes(16),
        "pid": 4242,
        "pgid": 4242,
        "start": "123456",
    }
    fields.update(over)
    return handshake.make_hello(**fields)


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def code_of(exc: pytest.ExceptionInfo[codes.FrameError]) -> str:
    return exc.value.code


# ---- frames ----


def test_frame_round_trip() -> None:
    msg = hello()
    frame = encode_frame(msg)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert decode_frame(frame) == msg


def test_reader_reassembles_frames_fed_byte_by_byte() -> None:
    frames = encode_frame(hello()) + encode_frame(handshake.make_resp(bytes(32)))
    reader = FrameReader()
    got: list[dict[str, Any]] = []
    for i in range(len(frames)):
        got += reader.feed(frames[i : i + 1])
    assert got == [hello(), handshake.make_resp(bytes(32))]
    assert reader.idle


def test_reader_asks_for_exactly_one_frame() -> None:
    frame = encode_frame(handshake.make_resp(bytes(32)))
    reader = FrameReader()
    assert reader.wanted() == 4
    reader.feed(frame[:4])
    assert reader.wanted() == len(frame) - 4


def test_oversize_header_rejected_before_any_payload() -> None:
    reader = FrameReader()
    with pytest.raises(codes.FrameError) as exc:
        reader.feed(struct.pack(">I", MAX_FRAME + 1))
    assert code_of(exc) == codes.OVERSIZE


def test_largest_frame_accepted_and_encoder_refuses_oversize() -> None:
    payload = b'{"t":"x","pad":"' + b"a" * (MAX_FRAME - 18) + b'"}'
    assert len(payload) == MAX_FRAME
    assert decode_frame(raw_frame(payload))["t"] == "x"
    with pytest.raises(codes.FrameError) as exc:
        encode_frame({"t": "no", "ref": "a" * MAX_FRAME})
    assert code_of(exc) == codes.OVERSIZE


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(struct.pack(">I", 0), id="zero-length"),
        pytest.param(encode_frame(hello())[:-1], id="truncated"),
        pytest.param(encode_frame(hello()) + b"x", id="trailing"),
        pytest.param(raw_frame(b'{"t":"\xff"}'), id="not-utf8"),
        pytest.param(raw_frame(b'{"t":"no","t":"no"}'), id="duplicate-key"),
        pytest.param(raw_frame(b'["hello"]'), id="not-an-object"),
        pytest.param(raw_frame(b'{"t":NaN}'), id="nan"),
        pytest.param(raw_frame(b'{"t":-Infinity}'), id="infinity"),
        pytest.param(raw_frame(b'{"t":1e999}'), id="overflowing-float"),
        pytest.param(raw_frame(b"[" * 3000), id="deep-nesting"),
        pytest.param(raw_frame(b"{"), id="not-json"),
    ],
)
def test_bad_frames_are_malformed(frame: bytes) -> None:
    with pytest.raises(codes.FrameError) as exc:
        decode_frame(frame)
    assert code_of(exc) == codes.MALFORMED


# ---- messages ----


def test_hello_passes_its_own_check() -> None:
    assert messages.check_message(hello(), "hello") == hello()


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"v": "rex-cb/2"}, codes.VERSION_MISMATCH),
        ({"extra": 1}, codes.MALFORMED),
        ({"pid": "4242"}, codes.MALFORMED),
        ({"pid": True}, codes.MALFORMED),
        ({"pgid": 1}, codes.MALFORMED),
        ({"na": "00" * 15}, codes.MALFORMED),
        ({"na": "AA" * 16}, codes.MALFORMED),
        ({"step": "has space"}, codes.MALFORMED),
        ({"step": "line\n"}, codes.MALFORMED),
        ({"key_id": "k" * 16}, codes.MALFORMED),
        ({"start": 12}, codes.MALFORMED),
        ({"t": "bogus"}, codes.MALFORMED),
        ({"t": 3}, codes.MALFORMED),
    ],
)
def test_bad_hello_fields(change: dict[str, Any], code: str) -> None:
    msg = {**hello(), **change}
    with pytest.raises(codes.FrameError) as exc:
        messages.check_message(msg, "hello")
    assert code_of(exc) == code


def test_missing_key_is_malformed() -> None:
    msg = hello()
    del msg["start"]
    with pytest.raises(codes.FrameError) as exc:
        messages.check_message(msg, "hello")
    assert code_of(exc) == codes.MALFORMED


def test_known_message_at_the_wrong_time_is_out_of_order() -> None:
    with pytest.raises(codes.FrameError) as exc:
        messages.check_message(hello(), "resp")
    assert code_of(exc) == codes.OUT_OF_ORDER


@pytest.mark.parametrize(
    "msg",
    [
        handshake.make_chal(bytes(16), bytes(32)),
        handshake.make_resp(bytes(32)),
        handshake.make_ok(bytes(32)),
        handshake.make_no("0123abcd"),
    ],
)
def test_other_messages_check_and_reject_bad_values(msg: dict[str, Any]) -> None:
    assert messages.check_message(msg, msg["t"]) == msg
    field = next(k for k in msg if k != "t")
    for bad in ("zz", "", 7, msg[field] + "zz"):
        with pytest.raises(codes.FrameError):
            messages.check_message({**msg, field: bad}, msg["t"])


# ---- transcript and proofs ----


def test_transcript_is_injective_on_field_boundaries() -> None:
    a = hello(step="ab", triple="c.alice.app")
    b = hello(step="a", triple="bc.alice.app")
    assert handshake.transcript(a) != handshake.transcript(b)


def test_transcript_covers_every_field() -> None:
    base = handshake.transcript(hello())
    changes = {
        "run": "run2",
        "step": "app@h2",
        "triple": "h2.alice.app",
        "key_id": "0" * 16,
        "na": bytes([1] * 16),
        "pid": 4243,
        "pgid": 4243,
        "start": "123457",
    }
    for name, value in changes.items():
        assert handshake.transcript(hello(**{name: value})) != base, name
    assert handshake.transcript(hello()).startswith(
        struct.pack(">H", len(messages.VERSION)) + messages.VERSION.encode()
    )


def test_proofs_verify_and_bind_everything() -> None:
    k_l, k_a = handshake.direction_keys(KEY)
    assert k_l != k_a
    t, ns = handshake.transcript(hello()), bytes(range(16))
    lp = handshake.launcher_proof(k_l, t, ns, NL)
    ap = handshake.agent_proof(k_a, t, ns, NL, lp)
    mac = handshake.ok_mac(k_l, t, ns, NL, ap)
    assert len({lp, ap, mac}) == 3
    assert handshake.verify_launcher_proof(k_l, t, ns, NL, lp)
    assert handshake.verify_agent_proof(k_a, t, ns, NL, lp, ap)
    assert handshake.verify_ok_mac(k_l, t, ns, NL, ap, mac)
    other_t = handshake.transcript(hello(pid=4243))
    assert not handshake.verify_launcher_proof(k_l, other_t, ns, NL, lp)
    assert not handshake.verify_launcher_proof(k_a, t, ns, NL, lp)
    assert not handshake.verify_agent_proof(k_a, t, bytes(16), NL, lp, ap)
    assert not handshake.verify_agent_proof(k_a, t, ns, bytes(16), lp, ap)
    assert not handshake.verify_ok_mac(k_l, t, ns, NL, ap, bytes([mac[0] ^ 1]) + mac[1:])
    other_k_l, _ = handshake.direction_keys(bytes(32))
    assert not handshake.verify_launcher_proof(other_k_l, t, ns, NL, lp)


def _compared_names(node: ast.expr) -> set[str]:
    """Names, attributes and subscript keys in an operand; len(secret) reveals nothing."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len":
        return set()
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            names.add(sub.attr)
        elif isinstance(sub, ast.Subscript) and isinstance(sub.slice, ast.Constant):
            names.add(str(sub.slice.value))
    return names


SECRET_WORDS = {"mac", "lp", "ap", "proof", "digest", "secret", "nl", "ns", "na"}


@pytest.mark.parametrize("name", [*WIRE, "engine/listener.py", "engine/pending.py", *REMOTE])
def test_no_mac_is_compared_with_equality(name: str) -> None:
    tree = ast.parse((PACKAGE / name).read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)) for op in node.ops):
            continue
        for operand in [node.left, *node.comparators]:
            for word in _compared_names(operand):
                tokens = set(word.lower().split("_"))
                assert not tokens & SECRET_WORDS, f"{name}:{node.lineno} compares {word!r}"


def test_equality_scan_catches_a_mac_compare() -> None:
    tree = ast.parse("ok = msg['mac'] == expected\nok = lp != x\nok = len(secret) == 32")
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert [bool(_compared_names(c.left) & SECRET_WORDS) for c in compares] == [True, True, False]


def test_protocol_verifies_with_compare_digest_only() -> None:
    source = "".join((PACKAGE / name).read_text() for name in WIRE)
    # launcher proof, agent proof, ok verdict, a decline, an unchanged, and the job frames
    assert source.count(" compare_digest(") == 6
    assert "==" not in "".join(line for line in source.splitlines() if "compare_digest(" in line)


def test_compare_digest_is_the_constant_time_comparison() -> None:
    # hmac.compare_digest is OpenSSL's CRYPTO_memcmp where hmac has OpenSSL, else this one
    assert crypto.compare_digest is _operator._compare_digest
    assert crypto.compare_digest(b"a" * 32, b"a" * 32)
    assert not crypto.compare_digest(b"a" * 32, b"a" * 31 + b"b")


@pytest.mark.parametrize("key_len", [0, 1, 32, 63, 64, 65, 131])
@pytest.mark.parametrize("msg_len", [0, 1, 55, 56, 64, 4096])
def test_hmac_sha256_matches_the_hmac_module(key_len: int, msg_len: int) -> None:
    key, msg = os.urandom(key_len), os.urandom(msg_len)
    assert crypto.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


def test_hmac_sha256_rfc4231_vectors() -> None:
    # RFC 4231 test cases 1, 2 and 6 (a key longer than the block)
    cases = [
        (
            b"\x0b" * 20,
            b"Hi There",
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        ),
        (
            b"Jefe",
            b"what do ya want for nothing?",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        (
            b"\xaa" * 131,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        ),
    ]
    for key, msg, want in cases:
        assert crypto.hmac_sha256(key, msg).hex() == want


@pytest.mark.parametrize("name", [*WIRE, *REMOTE])
def test_shipped_code_parses_as_python_3_8(name: str) -> None:
    ast.parse((PACKAGE / name).read_text(), feature_version=(3, 8))


# ---- the launch message ----


def launch_args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "run": "run1",
        "step": "app@h1",
        "triple": "h1.alice.app",
        "key_path": "h1/alice/app.key",
        "nl": NL,
        "callback": ("127.0.0.1", 4000),
        "deadlines": {"start": 5, "ready": 5.5, "callback": 5, "stop": 2},
        "argv": ["/bin/echo", "; touch X", "$(id)", "a\nb", "'\""],
        "env": {"A": "1", "EMPTY": ""},
        "cwd": "/tmp",
        "ready": {"kind": "tcp", "port": 80, "host": "127.0.0.1", "url": None},
        "kind": "service",
        "log": "app",
        "tags": {"REX_SPEC": "abc"},
    }
    args.update(over)
    return args


def test_launch_round_trip_is_one_line() -> None:
    line = make_launch(**launch_args())
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    launch = parse_launch(line)
    assert launch.argv == ("/bin/echo", "; touch X", "$(id)", "a\nb", "'\"")
    assert launch.nl == NL
    assert launch.callback == ("127.0.0.1", 4000)
    assert launch.deadline("ready") == 5.5
    assert launch.env == (("A", "1"), ("EMPTY", ""))
    assert launch.ready == Probe(kind="tcp", port=80)
    assert launch.tags == (("REX_SPEC", "abc"),)
    assert NL.hex() not in repr(launch)


@pytest.mark.parametrize(
    "change",
    [
        {"argv": []},
        {"argv": ["a\0b"]},
        {"argv": [""]},
        {"env": {"A=B": "1"}},
        {"env": {"REX_RUN": "x"}},
        {"tags": {"NOT_REX": "x"}},
        {"key_path": "../alice.key"},
        {"key_path": "h1/../app.key"},
        {"key_path": "h1/alice/app"},
        {"key_path": "/etc/alice.key"},
        {"nl": b"short"},
        {"callback": ("127.0.0.1", 0)},
        {"callback": ("h\u00f6st", 7000)},  # the agent passes it to getaddrinfo as ASCII bytes
        {"deadlines": {"start": 1, "ready": 1, "callback": 1}},
        {"deadlines": {"start": 1, "ready": -1, "callback": 1, "stop": 1}},
        {"ready": {"kind": "tcp"}},
        {"ready": {"kind": "http", "url": "file:///etc/passwd"}},
        {"ready": {"kind": "command", "argv": []}},
        {"ready": {"kind": "psychic"}},
        {"ready": {"kind": "alive", "timeout": 3}},
        {"kind": "daemon"},
        {"log": "Bad.Name"},
        {"step": "two words"},
        {"run": "r" * 65},
    ],
)
def test_launch_rejects(change: dict[str, Any]) -> None:
    with pytest.raises(LaunchError):
        make_launch(**launch_args(**change))


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"[]",
        b'{"v": "rex-cb/2"}',
        b"x" * (MAX_LAUNCH + 1),
    ],
)
def test_parse_launch_rejects_garbage(text: bytes) -> None:
    with pytest.raises(LaunchError):
        parse_launch(text)


def test_parse_launch_rejects_unknown_and_duplicate_keys() -> None:
    msg = json.loads(make_launch(**launch_args()))
    with pytest.raises(LaunchError):
        parse_launch(json.dumps({**msg, "extra": 1}).encode())
    text = make_launch(**launch_args()).rstrip(b"}\n") + b',"run":"run2"}'
    with pytest.raises(LaunchError):
        parse_launch(text)


def test_kill_request_round_trip_is_one_line() -> None:
    run = "20260101T000000-" + "ab" * 16
    line = make_kill(run, "app@h1", 2)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_kill(line) == (run, "app@h1", 2.0)


@pytest.mark.parametrize(
    ("run", "step", "grace"),
    [("bad run", "app@h1", 1), ("r", "a b", 1), ("r", "s", -1), ("r", "s", 86401)],
)
def test_kill_request_rejects(run: str, step: str, grace: float) -> None:
    with pytest.raises(LaunchError):
        make_kill(run, step, grace)


def test_spec_digest_follows_the_program_not_the_run() -> None:
    a = parse_launch(make_launch(**launch_args()))
    b = parse_launch(make_launch(**launch_args(run="run2", nl=bytes(16))))
    c = parse_launch(make_launch(**launch_args(argv=["/bin/true"])))
    assert spec_digest(a) == spec_digest(b) != spec_digest(c)


def test_key_relpath_rejects_a_trailing_newline() -> None:
    with pytest.raises(keyfile.KeyFormatError):
        keyfile.key_relpath("h1", "alice\n", None)


# ---- the protocol's own pattern and JSON code against re and json ---------------------------

PATTERNS = {
    name: getattr(chars, name)
    for name in dir(chars)
    if isinstance(getattr(chars, name), (chars.Chars, chars.Dotted))
    and getattr(chars, name).pattern
}
#: characters around every set's edges, a dot, the padding, controls, non-ASCII
EDGES = "azAZ09_-.=+/!~ \x1f\x7f\n\t\u00e9\u0660REX"


def test_every_pattern_is_checked() -> None:
    assert {"NAME_RE", "RUN_RE", "STEP_RE", "TRIPLE_RE", "HOST_RE", "B64_RE", "SHA_RE"} <= set(
        PATTERNS
    )


@pytest.mark.parametrize("name", sorted(PATTERNS))
@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(
        st.text(alphabet=EDGES, max_size=70),
        st.text(max_size=20),
        st.text(alphabet="0123456789abcdef", min_size=14, max_size=66),
        st.text(alphabet="abc.-_", max_size=300),
    )
)
def test_patterns_match_exactly_what_their_regex_matches(name: str, value: str) -> None:
    pattern = PATTERNS[name]
    want = re.match(pattern.pattern, value) is not None
    assert (pattern.match(value) is not None) == want, (name, value)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_patterns_at_their_length_bounds(name: str) -> None:
    pattern = PATTERNS[name]
    for n in (0, 1, 2, 3, 15, 16, 17, 31, 32, 33, 60, 61, 63, 64, 65, 128, 129, 200, 201):
        for ch in "a0_A-.=":
            for value in (ch * n, "REX_" + ch * n, "a" + ch * n, ch * n + "=="):
                want = re.match(pattern.pattern, value) is not None
                assert (pattern.match(value) is not None) == want, (name, value)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, sort_keys=st.booleans(), compact=st.booleans())
def test_dumps_writes_what_json_dumps_writes(value: Any, sort_keys: bool, compact: bool) -> None:
    separators = (",", ":") if compact else (", ", ": ")
    want = json.dumps(value, sort_keys=sort_keys, separators=separators)
    assert jsonstrict.dumps(value, sort_keys=sort_keys, compact=compact) == want
    assert jsonstrict.loads(want) == json.loads(want)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=' \t\n\r{}[]":,0123456789.eE+-truefalsnNaIiy\\u', max_size=30))
def test_loads_refuses_what_json_loads_refuses(text: str) -> None:
    try:
        want: Any = json.loads(text)
    except ValueError:
        want = ValueError
    try:
        got: Any = jsonstrict.loads(text)
    except ValueError:
        got = ValueError
    if want is ValueError or got is ValueError:
        assert got is want, text
    else:
        assert json.dumps(got) == json.dumps(want), text


def test_loads_reports_bad_json_in_a_fresh_interpreter() -> None:
    # before Python 3.12 json's C scanner needs json.decoder imported to raise its errors
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(PACKAGE.parent)!r})\n"
        "from rexplan.wire import chars, codes, crypto, frames, handshake, jobs, jsonstrict\n"
        "from rexplan.wire import keyfile, launch, messages, record\n"
        "assert 'json' not in sys.modules and 're' not in sys.modules, sorted(sys.modules)\n"
        "for bad in ('{', '[1,', '{\"a\" 1}', '\"\\x01\"', 'nul', '1 2'):\n"
        "    try:\n"
        "        jsonstrict.loads(bad)\n"
        "    except ValueError:\n"
        "        continue\n"
        "    raise SystemExit('accepted ' + bad)\n"
        "print(jsonstrict.loads(' {\"a\": [1, 2.5, null]} '))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'a': [1, 2.5, None]}"


def test_the_probe_table_is_the_launch_message_s_and_the_records() -> None:
    # wire.probes.KINDS is the one list of probe kinds: the launch message's ready keys are its
    # keys, and each kind's fields are attributes of the agent's Probe and the manifest's Ready
    from rexplan.core.model import Ready
    from rexplan.wire import launch

    assert launch.PROBE_KINDS == tuple(probes.KINDS)
    assert launch.PROBE_KEYS == Probe._fields
    for kind in probes.KINDS.values():
        assert set(kind.required) <= set(kind.fields) <= set(Probe._fields) - {"kind"}
        assert set(kind.fields) <= set(vars(Ready()))
    with pytest.raises(LaunchError, match=r"a tcp probe needs ready\.port"):
        launch._probe({"kind": "tcp"})
