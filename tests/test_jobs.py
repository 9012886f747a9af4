"""Jobs on real sshds: kind: job in a manifest, and `rex run` with its folded output."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers_procs as procs
import pytest
from helpers_world import SLEEPER, Hosts, World, nothing_left, open_world
from sshrig import SshdRig

from rexplan.engine import adhoc
from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import EXITED, LOST, JobResult, PendingStep
from rexplan.wire import frames, handshake, keyfile, messages
from rexplan.wire.jobs import OUT_CHUNK, OUT_TAIL, Session, cut_line, make_exit, make_out


@pytest.fixture
def world(
    sshd_rig: SshdRig,
    tmp_path: Path,
    tag: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    """A World; afterwards neither its programs nor its ad-hoc jobs (by its user) remain."""
    worlds = open_world(sshd_rig, tmp_path, tag, capsys, monkeypatch)
    w = next(worlds)
    yield w
    job = f".{w.user}.run"
    nothing_left(lambda env: env.get("REXTEST") == tag or env.get("REX_TRIPLE", "").endswith(job))
    next(worlds, None)  # its own teardown


def jobs(world: World, hosts: list[str], **programs: dict[str, object]) -> dict[str, object]:
    """Programs for a manifest, with the ``run`` job so keys for host.user.run exist."""
    return {"run": {"on": hosts, "kind": "job", "run": ["true"]}, **programs}


def test_job_exit_status_and_output_reach_the_launcher(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    h = host.name
    m = world.manifest(
        [host],
        jobs(
            world,
            [h],
            migrate={"on": [h], "kind": "job", "shell": "echo migrating; echo done >&2"},
            app={"on": [h], "requires": ["migrate"], **SLEEPER},
            broken={"on": [h], "kind": "job", "shell": "echo half way; exit 5"},
            after={"on": [h], "requires": ["broken"], **SLEEPER},
        ),
    )
    world.distribute(m)
    run = world.apply(m)
    assert run.code == 2
    final = run.final()
    migrate = final[f"migrate@{h}"]
    assert (migrate["state"], migrate["status"]) == ("ready", 0)
    assert migrate["output"] == "migrating\ndone\n"
    assert final[f"app@{h}"]["state"] == "ready"  # it waited for the job to succeed
    broken = final[f"broken@{h}"]
    assert (broken["state"], broken["reason"], broken["status"]) == ("failed", "exit_status", 5)
    assert broken["output"] == "half way\n" and "status 5" in broken["detail"]
    assert (final[f"after@{h}"]["state"], final[f"after@{h}"]["reason"]) == (
        "skipped",
        "dependency_failed",
    )
    assert world.record(h, "broken")["state"] == "exited"
    assert world.record(h, "broken")["status"] == 5
    # a job runs again at every apply; the service stays as it is
    again = world.apply(m, "--limit", h)
    assert again.actions()[f"migrate@{h}"] == "started"
    assert again.actions()[f"app@{h}"] == "unchanged"
    assert world.rex("stop", str(m))[0] == 0


def test_rex_run_folds_identical_output_and_exits_with_the_worst(
    world: World, sshd_hosts: Hosts
) -> None:
    hosts = sshd_hosts(3)
    names = [h.name for h in hosts]
    m = world.manifest(hosts, jobs(world, names))
    world.distribute(m)
    odd = names[2]
    script = f'echo same; case "$REX_TRIPLE" in {odd}.*) echo odd >&2; exit 4;; esac'
    code, out, err = world.rex("run", "*", "-m", str(m), "--", "sh", "-c", script)
    assert code == 4, out + err
    assert out == (
        f"----------------\n{names[0]},{names[1]}\n----------------\nsame\n"
        f"----------------\n{odd} (exit 4)\n----------------\nsame\nodd\n"
    )
    code, out, _ = world.rex("run", "*", "-m", str(m), "--json", "--", "sh", "-c", script)
    doc = json.loads(out)
    assert (code, doc["format"], doc["exit"]) == (4, 1, 4), out
    assert [(h["host"], h["status"]) for h in doc["hosts"]] == [
        (n, 4 if n == odd else 0) for n in names
    ]
    assert [g["hosts"] for g in doc["groups"]] == [names[:2], [odd]]
    # the pattern narrows the hosts; a clean run exits 0
    code, out, _ = world.rex("run", names[0], "-m", str(m), "--user", world.user, "--", "true")
    assert code == 0 and out == f"----------------\n{names[0]}\n----------------\n"
    code, _, err = world.rex("run", "*", "-m", str(m), "--user", "nobody", "--", "true")
    assert code == 5 and "unknown user" in err


def test_rex_run_needs_an_authorized_triple(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], {"svc": {"on": [host.name], **SLEEPER}})
    text = m.read_text().replace('"*.*.*"', '"*.*.svc"')
    m.write_text(text)
    code, _, err = world.rex("run", "*", "-m", str(m), "--", "true")
    assert code == 4 and f"{host.name}.{world.user}.run" in err


def test_launcher_killed_during_a_job_kills_the_job(world: World, sshd_hosts: Hosts) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], jobs(world, [host.name]))
    world.distribute(m)
    triple = f"{host.name}.{world.user}.run"
    argv = ["run", "*", "-m", str(m), "--keys", str(world.keys)]
    argv += ["--known-hosts", world.rig.known_hosts, "--", "sleep", "300"]
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from rexplan.cli.rex import main; sys.exit(main())",
            *argv,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    try:
        assert procs.wait_until(lambda: procs.tagged(REX_TRIPLE=triple) != [], 20)
        (job,) = procs.tagged(REX_TRIPLE=triple)
        agent = world.record(host.name, "run")["agent"]
        # running: the agent holds the job while the launcher holds the connection
        assert procs.alive(job) and procs.alive(agent)
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    assert procs.wait_until(lambda: not procs.alive(job), 5)
    assert procs.wait_until(lambda: not procs.alive(agent), 5)
    record = world.record(host.name, "run")
    assert record["state"] == "failed"
    assert record["reason"] == "the launcher closed the connection"


def test_fold_and_exit_code_are_pure() -> None:
    results = [
        adhoc.Outcome("b", 0, "x\n"),
        adhoc.Outcome("a", 0, "x\n"),
        adhoc.Outcome("c", -9, ""),
        adhoc.Outcome("d", None, "", "unreachable: unreachable", 3),
    ]
    assert [hosts for hosts, _ in adhoc.fold(results)] == [["b", "a"], ["c"], ["d"]]
    assert adhoc.exit_code(results) == 137  # killed by SIGKILL: 128 + 9
    assert adhoc.exit_code(results[:2]) == 0
    assert adhoc.exit_code([*results[:2], results[3]]) == 3
    text = adhoc.format_folded(results)
    assert "c (exit -9)" in text and "d (unreachable: unreachable)" in text


def _agent_side(lis: CallbackListener, step: PendingStep, secret: bytes) -> tuple[Any, Any]:
    """A job's handshake from the agent's side, by hand: (socket, reader, session)."""
    k_l, k_a = handshake.direction_keys(secret)
    sock = socket.create_connection(lis.address, timeout=5)
    hello = handshake.make_hello(
        run=lis.run_id,
        step=step.step_id,
        triple=step.triple,
        key_id=keyfile.key_id(secret),
        na=handshake.new_nonce(),
        pid=os.getpid(),
        pgid=os.getpid(),
        start="1",
    )
    t = handshake.transcript(hello)
    reader = frames.FrameReader()

    def recv(*kinds: str) -> dict[str, Any]:
        while True:
            for msg in reader.feed(sock.recv(reader.wanted())):
                return messages.check_message(msg, *kinds)

    sock.sendall(frames.encode_frame(hello))
    chal = recv("chal")
    ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
    ap = handshake.agent_proof(k_a, t, ns, step.nl, lp)
    sock.sendall(frames.encode_frame(handshake.make_resp(ap)))
    assert recv("ok")["t"] == "ok"
    return (sock, recv), Session.of((k_l, k_a), t, ns, step.nl, ap)


def test_listener_heartbeats_a_job_and_takes_only_its_frames() -> None:
    secret = os.urandom(32)
    with CallbackListener(handshake_timeout=1) as lis:
        good = dataclasses.replace(PendingStep.create("a@h1", "h1.u.a", secret, 10), job=True)
        forged = dataclasses.replace(PendingStep.create("b@h1", "h1.u.b", secret, 10), job=True)
        lis.expect(good)
        lis.expect(forged)
        (sock, recv), session = _agent_side(lis, good, secret)
        with sock:
            # the connection outlives the handshake timeout, with MAC'd beats in sequence
            beats = [recv("hb"), recv("hb")]
            assert [b["seq"] for b in beats] == [1, 2]
            assert all(session.verify(session.k_l, b, b"") for b in beats)
            assert lis.wait_job("a@h1", 0) is None  # still running
            for frame in (
                make_out(session, 1, b"hello "),
                make_out(session, 2, b"world\n"),
                make_exit(session, 3, 7),
            ):
                sock.sendall(frames.encode_frame(frame))
            job = lis.wait_job("a@h1", 5)
        assert job == JobResult(EXITED, 7, b"hello world\n")
        (sock, _), session = _agent_side(lis, forged, secret)
        with sock:
            sock.sendall(frames.encode_frame(make_out(session, 1, b"fine\n")))
            # a replayed sequence number: the job is lost, its exit never taken
            sock.sendall(frames.encode_frame(make_exit(session, 1, 0)))
            job = lis.wait_job("b@h1", 5)
        assert job is not None and job.code == LOST and job.status is None
        assert job.output == b"fine\n" and "sequence" in job.detail


def test_listener_keeps_a_jobs_tail_and_says_how_much_it_cut() -> None:
    secret = os.urandom(32)
    with CallbackListener(handshake_timeout=1) as lis:
        step = dataclasses.replace(PendingStep.create("a@h1", "h1.u.a", secret, 10), job=True)
        lis.expect(step)
        (sock, _), session = _agent_side(lis, step, secret)
        # an agent sending more than its tail (it never should) costs the listener no more
        chunk = b"x" * (OUT_CHUNK - 1) + b"\n"
        count = 4 * OUT_TAIL // OUT_CHUNK
        with sock:
            for seq in range(1, count + 1):
                sock.sendall(frames.encode_frame(make_out(session, seq, chunk)))
            sock.sendall(frames.encode_frame(make_exit(session, count + 1, 0)))
            job = lis.wait_job("a@h1", 10)
    assert job is not None and job.code == EXITED
    cut = count * OUT_CHUNK - OUT_TAIL
    assert job.output == cut_line(cut) + chunk * (OUT_TAIL // len(chunk))


def test_rex_run_shows_the_tail_of_a_long_output_and_what_was_cut(
    world: World, sshd_hosts: Hosts
) -> None:
    (host,) = sshd_hosts(1)
    m = world.manifest([host], jobs(world, [host.name]))
    world.distribute(m)
    script = "head -c 1000000 /dev/zero | tr '\\0' y; echo; echo end"
    code, out, err = world.rex("run", "*", "-m", str(m), "--json", "--", "sh", "-c", script)
    assert code == 0, out + err
    (result,) = json.loads(out)["hosts"]
    written = b"y" * 1_000_000 + b"\nend\n"
    keep = OUT_TAIL - len(cut_line(len(written)))
    assert result["output"].encode() == cut_line(len(written) - keep) + written[-keep:]
    assert len(result["output"]) <= OUT_TAIL
