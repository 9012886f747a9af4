"""The launch message (launcher -> agent stdin, one JSON line) and the agent's kill request.

make_launch builds a launch line and parse_launch reads it; it is the only place the launch
nonce ``nl`` travels.
"""

from __future__ import annotations

from rexplan.wire.chars import (
    BECOME_RE,
    ENV_NAME_RE,
    HOST_RE,
    NAME_RE,
    NONCE_RE,
    OWNER_RE,
    RUN_RE,
    SHA_RE,
    STEP_RE,
    TAG_NAME_RE,
    TRIPLE_RE,
    Chars,
    safe_relpath,
)
from rexplan.wire.codes import FrameError
from rexplan.wire.crypto import sha256
from rexplan.wire.frames import MAX_FRAME
from rexplan.wire.jobs import LOG_KEEP, LOG_KEEP_MAX, LOG_MAX_SIZE, LOG_MAX_SIZE_RANGE
from rexplan.wire.jsonstrict import dumps, encode_object, parse_object
from rexplan.wire.messages import VERSION
from rexplan.wire.probes import KEYS, KINDS
from rexplan.wire.record import Frozen

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from typing import Any

MAX_LAUNCH = 1 << 20
RESERVED_ENV = (
    "REX_RUN",
    "REX_STEP",
    "REX_TRIPLE",
    "REX_HOST",
    "REX_INDEX",
    "REX_COUNT",
    "NOTIFY_SOCKET",
)


class LaunchError(ValueError):
    """A launch message is malformed."""


#: keys of the ``ready`` probe dict (model.Ready's fields, less the timeout in deadline_s)
PROBE_KEYS = KEYS
PROBE_KINDS = tuple(KINDS)
DEADLINE_KEYS = ("start", "ready", "callback", "stop")
_LAUNCH_KEYS = (
    "v",
    "run",
    "step",
    "triple",
    "key_path",
    "nl",
    "callback",
    "deadline_s",
    "argv",
    "env",
    "cwd",
    "ready",
    "kind",
    "log",
    "tags",
)
#: launch keys an older launcher may leave out; their defaults are Launch's
_OPTIONAL_LAUNCH_KEYS = (
    "replace",
    "restart",
    "files",
    "when",
    "unchanged",
    "become",
    "logs",
    "index",
    "count",
    "env_clear",
    "owner",
    "take_over",
    "renew",
    "autostart",
)
#: the most steps one program may have (REX_COUNT), as the manifest's MAX_STEPS
_MAX_COUNT = 1_000_000
#: the longest manifest path a launch (and so a record) carries
MAX_OWNER_PATH = 4096
RESTART_POLICIES = ("no", "on-failure", "always")


class Probe(Frozen):
    """A readiness probe as the agent runs it."""

    kind: str = "alive"
    interval: float = 0.2
    settle: float = 0.5
    host: str = "127.0.0.1"
    port: int | None = None
    url: str | None = None
    argv: tuple[str, ...] = ()
    path: str | None = None


class Launch(Frozen):
    """A parsed launch message. ``deadlines`` are seconds: start, ready, callback, stop."""

    _hidden = ("nl",)
    run: str
    step: str
    triple: str
    key_path: str
    nl: bytes
    callback: tuple[str, int]
    deadlines: tuple[tuple[str, float], ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str | None
    ready: Probe
    kind: str
    log: str
    tags: tuple[tuple[str, str], ...]
    replace: bool = False  # stop a running instance of the triple first, else refuse
    restart: str = "no"  # the supervisor's policy when the program ends: RESTART_POLICIES
    #: (dest, sha256 hex, mode): files the launcher put under REX_HOME/files/<log>/
    files: tuple[tuple[str, str, int], ...] = ()
    #: preconditions: ("max_load", 1-minute load average) and ("min_free_mb", MemAvailable)
    when: tuple[tuple[str, float], ...] = ()
    #: an instance of the same spec alive is proven to the listener (``same``), not refused
    unchanged: bool = False
    #: the account the program runs as, through ``sudo -n`` (None: the SSH login)
    become: str | None = None
    #: (max_size bytes, keep): the program log rotates at max_size, keeping that many old files
    logs: tuple[int, int] = (LOG_MAX_SIZE, LOG_KEEP)
    index: int = 0  # the step's place among its program's steps (REX_INDEX) and their number
    count: int = 1  # (REX_COUNT); not part of the spec digest
    env_clear: bool = False  # no login environment (HOME, USER, LOGNAME, SHELL, LANG)
    #: (name, path) of the manifest that launches it, kept in the record: the triple's owner;
    #: ("", "") when the launcher names none
    owner: tuple[str, str] = ("", "")
    #: replace an instance that another manifest owns, instead of failing ``owned``
    take_over: bool = False
    #: with ``replace``: an instance of the same spec is replaced too (rex restart)
    renew: bool = False
    #: the host's boot entry starts it again at boot (agent --boot), without a launcher
    autostart: bool = False

    def deadline(self, name: str) -> float:
        return dict(self.deadlines)[name]


def make_launch(
    *,
    run: str,
    step: str,
    triple: str,
    key_path: str,
    nl: bytes,
    callback: tuple[str, int],
    deadlines: Mapping[str, float],
    argv: Sequence[str],
    env: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    cwd: str | None = None,
    ready: Mapping[str, Any] | None = None,
    kind: str = "service",
    log: str,
    tags: Mapping[str, str] | None = None,
    replace: bool = False,
    restart: str = "no",
    files: Sequence[tuple[str, str, int]] = (),
    when: Mapping[str, float] | None = None,
    unchanged: bool = False,
    become: str | None = None,
    logs: tuple[int, int] = (LOG_MAX_SIZE, LOG_KEEP),
    index: int = 0,
    count: int = 1,
    env_clear: bool = False,
    owner: tuple[str, str] | None = None,
    take_over: bool = False,
    renew: bool = False,
    autostart: bool = False,
) -> bytes:
    """The launch message as one JSON line (newline-terminated); raises LaunchError.

    ``ready`` takes PROBE_KEYS (None values mean the default); ``deadlines`` takes
    DEADLINE_KEYS. The result is parsed back before it is returned, so a launcher can never
    send a message its agent would refuse.
    """
    probe = {k: v for k, v in (ready or {"kind": "alive"}).items() if v is not None}
    if "argv" in probe:
        probe["argv"] = list(probe["argv"])
    msg = {
        "v": VERSION,
        "run": run,
        "step": step,
        "triple": triple,
        "key_path": key_path,
        "nl": nl.hex(),
        "callback": [callback[0], callback[1]],
        "deadline_s": dict(deadlines),
        "argv": list(argv),
        "env": dict(env),
        "cwd": cwd,
        "ready": probe,
        "kind": kind,
        "log": log,
        "tags": dict(tags or {}),
        "replace": replace,
        "restart": restart,
        "files": [list(f) for f in files],
        "when": dict(when or {}),
    }
    if unchanged:
        msg["unchanged"] = True
    if become is not None:
        msg["become"] = become
    if tuple(logs) != (LOG_MAX_SIZE, LOG_KEEP):
        rotation: list[object] = [logs[0], logs[1]]
        msg["logs"] = rotation
    if (index, count) != (0, 1):
        msg["index"], msg["count"] = index, count  # type: ignore[assignment]
    if env_clear:
        msg["env_clear"] = True
    if owner is not None:
        msg["owner"] = {"name": owner[0], "path": owner[1]}
    if take_over:
        msg["take_over"] = True
    if renew:
        msg["renew"] = True
    if autostart:
        msg["autostart"] = True
    try:
        line = encode_object(msg) + b"\n"
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"launch message cannot be encoded: {exc}") from None
    parse_launch(line)
    return line


def _text(value: Any, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty) or "\0" in value:
        raise LaunchError(f"{what} must be a non-empty string without NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise LaunchError(f"{what} is not valid Unicode") from None
    return value


def _seconds(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not 0 < value <= 86400:
        raise LaunchError(f"{what} must be a number of seconds in (0, 86400]")
    return float(value)


def _key_path(value: Any) -> str:
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) not in (2, 3) or not parts[-1].endswith(".key"):
        raise LaunchError("key_path must be HOST/USER.key or HOST/USER/PROGRAM.key")
    names = [*parts[1:-1], parts[-1][: -len(".key")]]
    if (
        not HOST_RE.match(parts[0])
        or parts[0] in (".", "..")
        or not all(NAME_RE.match(name) for name in names)
    ):
        raise LaunchError("key_path has an invalid component")
    return str(value)


def _pairs(value: Any, what: str, name_re: Chars) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise LaunchError(f"{what} must be an object")
    for name, text in value.items():
        if not name_re.match(name) or name in RESERVED_ENV:
            raise LaunchError(f"{what} has an invalid or reserved name {name!r}")
        _text(text, f"{what}.{name}", empty=True)
    return tuple(sorted(value.items()))


def _probe(value: Any) -> Probe:
    if not isinstance(value, dict) or not set(value) <= set(PROBE_KEYS):
        raise LaunchError(f"ready must be an object with keys among {', '.join(PROBE_KEYS)}")
    kind = value.get("kind")
    if kind not in PROBE_KINDS:
        raise LaunchError(f"ready.kind must be one of {', '.join(PROBE_KINDS)}")
    required = KINDS[kind].required
    for field in required:
        if field not in value:
            raise LaunchError(f"a {kind} probe needs ready.{field}")
    port = value.get("port")
    if port is not None and (type(port) is not int or not 0 < port < 65536):
        raise LaunchError("ready.port must be a TCP port")
    url = value.get("url")
    if url is not None and not _text(url, "ready.url").startswith(("http://", "https://")):
        raise LaunchError("ready.url must be an http:// or https:// URL")
    argv = value.get("argv", [])
    if not isinstance(argv, list) or ("argv" in required and not argv):
        raise LaunchError("ready.argv must be a non-empty list of strings")
    return Probe(
        kind=kind,
        interval=_seconds(value.get("interval", 0.2), "ready.interval"),
        settle=_seconds(value.get("settle", 0.5), "ready.settle"),
        host=_text(value.get("host", "127.0.0.1"), "ready.host"),
        port=port,
        url=url,
        argv=tuple(_text(arg, "ready.argv[]", empty=True) for arg in argv),
        path=None if value.get("path") is None else _text(value["path"], "ready.path"),
    )


def _files(value: Any) -> tuple[tuple[str, str, int], ...]:
    if not isinstance(value, list) or len(value) > 1000:
        raise LaunchError("files must be a list of [dest, sha256, mode]")
    out = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not safe_relpath(item[0])
            or not isinstance(item[1], str)
            or not SHA_RE.match(item[1])
            or type(item[2]) is not int
            or not 0 <= item[2] <= 0o7777
        ):
            raise LaunchError("files must be [relative dest, sha256 hex, mode] entries")
        out.append((item[0], item[1], item[2]))
    return tuple(out)


def _message(line: bytes, limit: int, what: str) -> dict[str, Any]:
    """``line`` as a strict JSON object of at most ``limit`` bytes; LaunchError naming ``what``."""
    if len(line) > limit:
        raise LaunchError(f"{what} too long")
    try:
        return parse_object(line)
    except FrameError as exc:
        raise LaunchError(f"{what} is not a strict JSON object: {exc}") from None


def parse_launch(line: bytes) -> Launch:
    """Parse and validate one launch line; raises LaunchError naming the first problem."""
    msg = _message(line, MAX_LAUNCH, "launch message")
    if msg.get("v") != VERSION:
        raise LaunchError(f"launch message is not {VERSION}")
    if any(name not in msg for name in _LAUNCH_KEYS) or not set(msg) <= {
        *_LAUNCH_KEYS,
        *_OPTIONAL_LAUNCH_KEYS,
    }:
        raise LaunchError(
            f"launch message needs exactly the keys {', '.join(_LAUNCH_KEYS)} "
            f"(optional: {', '.join(_OPTIONAL_LAUNCH_KEYS)})"
        )
    for name, pattern in (
        ("run", RUN_RE),
        ("step", STEP_RE),
        ("triple", TRIPLE_RE),
    ):
        if not isinstance(msg[name], str) or not pattern.match(msg[name]):
            raise LaunchError(f"{name} is invalid")
    # the name of the program's record, lock, log and files: its triple (a program name in
    # the layout before records were keyed by triple)
    log = msg["log"]
    if not isinstance(log, str) or not (NAME_RE.match(log) or log == msg["triple"]):
        raise LaunchError("log is invalid: the triple, or a program name")
    if not isinstance(msg["nl"], str) or not NONCE_RE.match(msg["nl"]):
        raise LaunchError("nl must be 16 bytes of lowercase hex")
    callback = msg["callback"]
    if (
        not isinstance(callback, list)
        or len(callback) != 2
        or not isinstance(callback[0], str)
        or not 0 < len(callback[0]) <= 255
        or not callback[0].isascii()  # an address or a DNS name, passed on as bytes
        or type(callback[1]) is not int
        or not 0 < callback[1] < 65536
    ):
        raise LaunchError("callback must be [host, port]")
    deadlines = msg["deadline_s"]
    if not isinstance(deadlines, dict) or set(deadlines) != set(DEADLINE_KEYS):
        raise LaunchError(f"deadline_s needs exactly {', '.join(DEADLINE_KEYS)}")
    argv = msg["argv"]
    if not isinstance(argv, list) or not argv:
        raise LaunchError("argv must be a non-empty list of strings")
    cwd = msg["cwd"]
    if msg["kind"] not in ("service", "job"):
        raise LaunchError("kind must be service or job")
    replace = msg.get("replace", False)
    if type(replace) is not bool:
        raise LaunchError("replace must be true or false")
    unchanged = msg.get("unchanged", False)
    if type(unchanged) is not bool:
        raise LaunchError("unchanged must be true or false")
    renew = msg.get("renew", False)
    if type(renew) is not bool:
        raise LaunchError("renew must be true or false")
    autostart = msg.get("autostart", False)
    if type(autostart) is not bool:
        raise LaunchError("autostart must be true or false")
    restart = msg.get("restart", "no")
    if restart not in RESTART_POLICIES:
        raise LaunchError(f"restart must be one of {', '.join(RESTART_POLICIES)}")
    index, count = msg.get("index", 0), msg.get("count", 1)
    if type(index) is not int or type(count) is not int or not 0 <= index < count <= _MAX_COUNT:
        raise LaunchError(f"index and count need 0 <= index < count <= {_MAX_COUNT}")
    env_clear = msg.get("env_clear", False)
    if type(env_clear) is not bool:
        raise LaunchError("env_clear must be true or false")
    take_over = msg.get("take_over", False)
    if type(take_over) is not bool:
        raise LaunchError("take_over must be true or false")
    owner = msg.get("owner", {"name": "", "path": ""})
    if (
        not isinstance(owner, dict)
        or set(owner) != {"name", "path"}
        or not isinstance(owner["name"], str)
        or not isinstance(owner["path"], str)
        or (owner["name"] and not OWNER_RE.match(owner["name"]))
        or len(owner["path"]) > MAX_OWNER_PATH
        or not owner["path"].isprintable()
    ):
        raise LaunchError("owner must be {name, path}: a manifest name and a printable path")
    when = msg.get("when", {})
    if (
        not isinstance(when, dict)
        or not set(when) <= {"max_load", "min_free_mb"}
        or not all(type(v) in (int, float) and 0 <= v < 1e300 for v in when.values())
    ):
        raise LaunchError("when takes max_load and min_free_mb, non-negative numbers")
    become = msg.get("become")
    if become is not None and (not isinstance(become, str) or not BECOME_RE.match(become)):
        raise LaunchError("become must be an account name")
    logs = msg.get("logs", [LOG_MAX_SIZE, LOG_KEEP])
    low, high = LOG_MAX_SIZE_RANGE
    if (
        not isinstance(logs, list)
        or len(logs) != 2
        or type(logs[0]) is not int
        or not low <= logs[0] <= high
        or type(logs[1]) is not int
        or not 0 <= logs[1] <= LOG_KEEP_MAX
    ):
        raise LaunchError(
            f"logs must be [max_size in [{low}, {high}] bytes, keep in [0, {LOG_KEEP_MAX}]]"
        )
    return Launch(
        run=msg["run"],
        step=msg["step"],
        triple=msg["triple"],
        key_path=_key_path(msg["key_path"]),
        nl=bytes.fromhex(msg["nl"]),
        callback=(callback[0], callback[1]),
        deadlines=tuple((k, _seconds(deadlines[k], f"deadline_s.{k}")) for k in DEADLINE_KEYS),
        argv=(_text(argv[0], "argv[0]"), *(_text(a, "argv[]", empty=True) for a in argv[1:])),
        env=_pairs(msg["env"], "env", ENV_NAME_RE),
        cwd=None if cwd is None else _text(cwd, "cwd"),
        ready=_probe(msg["ready"]),
        kind=msg["kind"],
        log=msg["log"],
        tags=_pairs(msg["tags"], "tags", TAG_NAME_RE),
        replace=replace,
        restart=restart,
        files=_files(msg.get("files", [])),
        when=tuple(sorted((k, float(v)) for k, v in when.items())),
        unchanged=unchanged,
        become=become,
        logs=(logs[0], logs[1]),
        index=index,
        count=count,
        env_clear=env_clear,
        owner=(owner["name"], owner["path"]),
        take_over=take_over,
        renew=renew,
        autostart=autostart,
    )


def spec_digest(launch: Launch) -> str:
    """sha256 of what the program is (argv, env, cwd, probe, kind, restart, env_clear, files'
    content and modes, the account it runs as), for change detection; ``replace``,
    ``unchanged``, ``when``, ``index`` and ``count`` (a host added to a program does not restart
    the others: a program that must restart on them names ``{{ index }}`` or ``{{ count }}`` in
    a field) and the run's identity are not."""
    """sha256 of what the program is (argv, env, cwd, probe, kind, restart, files' content and
    modes, autostart), for change detection; ``replace``, ``unchanged``, ``renew``, ``when``
    and the run's identity are not."""
    spec: dict[str, Any] = {
        "argv": list(launch.argv),
        "env": dict(launch.env),
        "cwd": launch.cwd,
        "ready": [launch.ready.kind, launch.ready.port, launch.ready.url, launch.ready.path],
        "probe_argv": list(launch.ready.argv),
        "kind": launch.kind,
    }
    if launch.restart != "no":
        spec["restart"] = launch.restart
    if launch.files:
        spec["files"] = [list(f) for f in launch.files]
    if launch.become is not None:
        spec["become"] = launch.become
    if launch.env_clear:
        spec["env_clear"] = True
    if launch.autostart:  # so that turning it on or off updates the record (and boot entry)
        spec["autostart"] = True
    return sha256(dumps(spec, sort_keys=True).encode("ascii")).hexdigest()


#: the probe fields spec_digest covers (``rex apply --dry-run --diff`` compares these)
SPEC_PROBE_KEYS = ("kind", "port", "url", "path", "argv")
#: the launch message fields a record keeps leave out the launch's secret, its nonce
_UNRECORDED = ("nl",)


def recorded_launch(launch: Launch) -> dict[str, Any]:
    """What the agent keeps of a launch in its record, as ``launched``: the launch message
    minus its secret (the nonce ``nl``). ``rex apply --dry-run --diff`` compares its spec
    fields; ``--boot`` starts the program again from it (launch_from_record)."""
    line = make_launch(
        run=launch.run,
        step=launch.step,
        triple=launch.triple,
        key_path=launch.key_path,
        nl=launch.nl,
        callback=launch.callback,
        deadlines=dict(launch.deadlines),
        argv=launch.argv,
        env=launch.env,
        cwd=launch.cwd,
        ready={k: getattr(launch.ready, k) for k in PROBE_KEYS},
        kind=launch.kind,
        log=launch.log,
        tags=dict(launch.tags),
        replace=launch.replace,
        restart=launch.restart,
        files=launch.files,
        when=dict(launch.when),
        unchanged=launch.unchanged,
        renew=launch.renew,
        autostart=launch.autostart,
    )
    msg = parse_object(line.rstrip(b"\n"))
    for key in _UNRECORDED:
        msg.pop(key, None)
    return msg


def launch_from_record(recorded: Any) -> Launch:
    """The Launch a record's ``launched`` describes, with a zero nonce (nothing calls back
    with it); raises LaunchError if it is not one."""
    if not isinstance(recorded, dict):
        raise LaunchError("the record keeps no launch")
    msg = {**recorded, "nl": "00" * 16}
    try:
        line = encode_object(msg) + b"\n"
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"the recorded launch cannot be encoded: {exc}") from None
    return parse_launch(line)


# ---- the kill request ----

#: seconds the agent's ``--kill`` mode waits for its request line on stdin
KILL_WAIT = 30.0
_KILL_KEYS = ("v", "run", "step", "grace")


def make_kill(run: str, step: str, grace: float) -> bytes:
    """The agent's ``--kill`` request, one JSON line for its stdin: end what run ``run``
    started for ``step``, allowing ``grace`` seconds after SIGTERM. The run id goes there, not
    in argv, which every user of the host can read. Raises LaunchError."""
    try:
        line = encode_object({"v": VERSION, "run": run, "step": step, "grace": grace}) + b"\n"
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"kill request cannot be encoded: {exc}") from None
    parse_kill(line)
    return line


def parse_kill(line: bytes) -> tuple[str, str, float]:
    """(run, step, grace) of a kill request line; raises LaunchError."""
    msg = _message(line, MAX_FRAME, "kill request")
    if set(msg) != set(_KILL_KEYS) or msg["v"] != VERSION:
        raise LaunchError(f"kill request needs exactly the keys {', '.join(_KILL_KEYS)}")
    run, step, grace = msg["run"], msg["step"], msg["grace"]
    if not isinstance(run, str) or not RUN_RE.match(run):
        raise LaunchError("run is invalid")
    if not isinstance(step, str) or not STEP_RE.match(step):
        raise LaunchError("step is invalid")
    if type(grace) not in (int, float) or not 0 <= grace <= 86400:
        raise LaunchError("grace must be a number of seconds in [0, 86400]")
    return run, step, float(grace)
