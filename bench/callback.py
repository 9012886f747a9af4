"""Benchmark: verified rex-cb/1 handshakes per second through one callback listener.

Usage: python3 bench/callback.py [--clients 1,16,64] [--reps 3] [--handshakes 3000]
    [--pending 10000] [--procs N] [--profile FILE]

The listener (rexplan.engine.listener, one selector thread) runs in this process with --pending
steps registered; the clients run in --procs worker processes (default: one per core, at
most M), M / procs threads each, so their Python does not share the listener's GIL. A
client builds its hello and resp with rexplan.wire exactly as the agent does, checks
the listener's proof and the ok's MAC, and counts the handshake verified only then. Each
repetition uses a fresh listener and fresh steps (a step verifies once); the steps' keys
reach the workers over a pipe, never argv.

Reported per M (medians of --reps): verified handshakes per second (wall, from "go" to the
last client's ok), the listener thread's CPU in all and per handshake (its own CPU clock),
the kernel's share of it (a send on loopback runs the receiver's TCP stack too), and its
capacity on one core (1 / CPU per handshake). The clients share this machine's cores with
the listener, so the capacity is the number to hold against a target.
--profile FILE writes cProfile stats of the listener thread for the last repetition of the
largest M, timed by the thread's CPU clock: a wall clock charges a send() with the time the
woken client runs instead, and the profiler's own cost inflates small functions.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rexplan.engine.listener import CallbackListener
from rexplan.engine.pending import PendingStep
from rexplan.wire import codes, frames, keyfile, messages
from rexplan.wire.handshake import (
    agent_proof,
    direction_keys,
    make_hello,
    make_resp,
    new_nonce,
    transcript,
    verify_launcher_proof,
    verify_ok_mac,
)

# --- worker: M / procs client threads ------------------------------------------------------------


def _recv(sock: socket.socket, reader: frames.FrameReader, *expected: str) -> dict[str, Any]:
    while True:
        data = sock.recv(reader.wanted())
        if not data:
            raise EOFError("listener closed")
        for msg in reader.feed(data):
            return messages.check_message(msg, *expected)


def handshake(address: tuple[str, int], run: str, step: list[str]) -> bool:
    """One agent handshake, as rexplan/remote/agent/dialback.py's _handshake: True if verified."""
    step_id, triple, key_hex, nl_hex = step
    secret, nl = bytes.fromhex(key_hex), bytes.fromhex(nl_hex)
    k_l, k_a = direction_keys(secret)
    hello = make_hello(
        run=run,
        step=step_id,
        triple=triple,
        key_id=keyfile.key_id(secret),
        na=new_nonce(),
        pid=os.getpid(),
        pgid=os.getpid(),
        start="1",
    )
    t = transcript(hello)
    reader = frames.FrameReader()
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(frames.encode_frame(hello))
        chal = _recv(sock, reader, "chal", "no")
        if chal["t"] == "no":
            return False
        ns, lp = bytes.fromhex(chal["ns"]), bytes.fromhex(chal["lp"])
        if not verify_launcher_proof(k_l, t, ns, nl, lp):
            return False
        ap = agent_proof(k_a, t, ns, nl, lp)
        sock.sendall(frames.encode_frame(make_resp(ap)))
        verdict = _recv(sock, reader, "ok", "no")
        if verdict["t"] == "no":
            return False
        return verify_ok_mac(k_l, t, ns, nl, ap, bytes.fromhex(verdict["mac"]))


def worker() -> int:
    """Read the job from stdin, say ready, wait for go, run the threads, print the counts."""
    job = json.loads(sys.stdin.readline())
    address = (job["address"][0], job["address"][1])
    threads = job["threads"]
    steps: list[list[str]] = job["steps"]
    counts = {"verified": 0, "refused": 0, "errors": 0}
    lock = threading.Lock()

    def client(mine: list[list[str]]) -> None:
        for step in mine:
            try:
                key = "verified" if handshake(address, job["run"], step) else "refused"
            except (OSError, EOFError, codes.FrameError):
                key = "errors"
            with lock:
                counts[key] += 1

    pool = [threading.Thread(target=client, args=(steps[i::threads],)) for i in range(threads)]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps(counts), flush=True)
    return 0


# --- the listener side -------------------------------------------------------------------------


def listener_thread() -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == "rex-callback")


def thread_cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def thread_sys(thread: threading.Thread) -> float:
    """The thread's system CPU seconds (clock ticks, so 10 ms steps): the kernel's share."""
    stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[12]) / os.sysconf("SC_CLK_TCK")


def one_run(
    clients: int, procs: int, handshakes: int, pending: int, profile: cProfile.Profile | None
) -> dict[str, float]:
    # every client connects from 127.0.0.1: no per-address limit below the total
    lis = CallbackListener(handshake_timeout=30.0, max_unauthenticated=4096, max_per_source=4096)
    if profile is not None:
        loop: Callable[[], None] = lis._loop  # bench only: profile the listener thread itself

        def profiled() -> None:
            profile.runcall(loop)

        lis._loop = profiled  # type: ignore[method-assign]
    steps = []
    with lis:
        for i in range(max(pending, handshakes)):
            step = PendingStep.create(f"p@h{i}", f"h{i}.u.p", os.urandom(32), 600.0)
            lis.expect(step)
            if i < handshakes:
                steps.append([step.step_id, step.triple, step.key.hex(), step.nl.hex()])
        workers = []
        for w in range(procs):
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None and proc.stdout is not None
            threads = len(range(w, clients, procs))
            job = {
                "address": list(lis.address),
                "run": lis.run_id,
                "threads": threads,
                "steps": steps[w::procs],
            }
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            workers.append(proc)
        try:
            for proc in workers:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    raise SystemExit("a worker did not start")
            thread = listener_thread()
            cpu0, sys0, t0 = thread_cpu(thread), thread_sys(thread), time.perf_counter()
            for proc in workers:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            totals = {"verified": 0, "refused": 0, "errors": 0}
            for proc in workers:
                assert proc.stdout is not None
                for key, n in json.loads(proc.stdout.readline()).items():
                    totals[key] += n
            wall, cpu = time.perf_counter() - t0, thread_cpu(thread) - cpu0
            kernel = thread_sys(thread) - sys0
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    verified = totals["verified"]
    if verified != handshakes or lis.attempts[codes.OK] != handshakes:
        raise SystemExit(f"only {verified} of {handshakes} verified: {totals}")
    return {
        "rate": verified / wall,
        "cpu": cpu,
        "cpu_per": cpu / verified,
        "sys_share": kernel / cpu if cpu > 0 else 0.0,
        "capacity": verified / cpu if cpu > 0 else float("inf"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--handshakes", type=int, default=3000)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    sizes = [int(m) for m in args.clients.split(",")]
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.handshakes} "
        f"handshakes per run, {max(args.pending, args.handshakes)} pending steps, "
        f"median of {args.reps}"
    )
    header = (
        f"{'M':>4} {'procs':>5} {'verified/s':>10} {'listener CPU s':>14} "
        f"{'CPU us/handshake':>16} {'kernel':>6} {'capacity/s (1 core)':>19}"
    )
    print(header)
    print("-" * len(header))
    for m in sizes:
        procs = max(1, min(m, args.procs))
        runs = []
        for rep in range(args.reps):
            profile = None
            if args.profile and m == sizes[-1] and rep == args.reps - 1:
                profile = cProfile.Profile(time.thread_time)
            runs.append(one_run(m, procs, args.handshakes, args.pending, profile))
            if profile is not None:
                profile.dump_stats(args.profile)
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{m:>4} {procs:>5} {med['rate']:>10.0f} {med['cpu']:>14.3f} "
            f"{med['cpu_per'] * 1e6:>16.0f} {med['sys_share']:>6.0%} {med['capacity']:>19.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
