"""Benchmark: launch `sleep 30` on N loopback sshd hosts with OpenSSH, fabric, and `rex apply`.

Usage (as root, like the test rig): python3 bench/launch.py [--hosts 16,64,128,256] [--reps 3]
    [--settle 0.2] [--forks N] [--variants openssh,fabric,rex,reapply,stop]

One sshd per host on 127.0.0.x (tests/sshrig.py's rig: a throwaway account, pinned host keys),
then per N, each variant in a fresh worker process:

- openssh: ``ssh -o BatchMode=yes -o StrictHostKeyChecking=yes ... HOST 'nohup sleep 30 ... &'``
  for every host at once (Popen all, wait all);
- fabric:  ``ThreadingGroup.run`` of the same command, RejectPolicy and the pinned known_hosts;
- rex:     ``rex apply -y`` of a manifest running ``[sleep, 30]`` on every host, each verified by
  its callback after an ``alive`` probe of --settle seconds; keys are created and distributed
  before the timed run. The first rex run on each size's hosts also uploads the agent: it is
  timed and printed apart ("cold"), not counted in the medians;
- rex-cold: ``rex apply`` as rex, on hosts whose agent files (and compiled caches) were removed
  just before the run: a first apply, where the agent travels with the launch;
- rex-ssh: ``rex apply`` as rex, with ``callback: {via: ssh}``: each agent calls back through
  a remote port forward on its host's SSH connection instead of dialling the listener;
- reapply: ``rex apply`` twice, the second on the unchanged manifest (every step ``unchanged``,
  no process started); its inner time is the second apply's alone;
- stop:    ``rex apply``, then ``rex stop`` of every step; its inner time is the stop's alone;
- persist: ``rex apply --persist 60`` with no daemon running yet: the daemon it starts opens
  every connection (a first apply with connection persistence on);
- reapply-p: the same, then the unchanged manifest again over the kept connections; its inner
  time is the second apply's alone. The daemon's CPU is added to the launcher's, and it is
  stopped (by pid, if need be) after the run.

Sizes run in order, and within each repetition the variants alternate, so a slow spell of the
machine hits every variant alike; medians are over the repetitions. The workers run with
bytecode caching on, as after ``pip install`` (see worker_env).

Reported per run: wall (the worker process, imports included), inner (the launch alone, after
imports), launcher CPU (user+sys of the worker and its children, from RUSAGE_CHILDREN), and
rex's ratios to fabric and OpenSSH, and rex-ssh's to rex (the cost of ssh callbacks).
Every launched process is killed by pid after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import helpers_procs as procs  # noqa: E402 - tests/helpers_procs.py, found via sys.path

COMMAND = "nohup sleep 30 >/dev/null 2>&1 &"
VARIANTS = (
    "openssh",
    "fabric",
    "rex",
    "rex-cold",
    "rex-ssh",
    "reapply",
    "stop",
    "persist",
    "reapply-p",
)


# --- workers: one process per timed run ---------------------------------------------------------


def _ssh_argv(cfg: dict[str, Any], host: dict[str, Any]) -> list[str]:
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        f"UserKnownHostsFile={cfg['known_hosts']}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=10",
        "-i",
        cfg["identity"],
        "-p",
        str(host["port"]),
        "-l",
        cfg["login"],
        host["address"],
        COMMAND,
    ]


def work_openssh(cfg: dict[str, Any]) -> None:
    procs = [
        subprocess.Popen(_ssh_argv(cfg, h), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        for h in cfg["hosts"]
    ]
    bad = [p.args for p in procs if p.wait() != 0]
    if bad:
        raise SystemExit(f"openssh: {len(bad)} host(s) failed")


def work_fabric(cfg: dict[str, Any]) -> None:
    import fabric
    import paramiko

    config = fabric.Config(overrides={"load_ssh_configs": False})
    kwargs = {"key_filename": cfg["identity"], "look_for_keys": False, "allow_agent": False}
    group = fabric.ThreadingGroup(
        *(f"{h['address']}:{h['port']}" for h in cfg["hosts"]),
        user=cfg["login"],
        config=config,
        connect_kwargs=kwargs,
        connect_timeout=10,
    )
    for conn in group:
        # fabric's default AutoAddPolicy would trust any key: pin them like rex does
        conn.client.load_host_keys(cfg["known_hosts"])
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    t0 = time.perf_counter()
    results = group.run(COMMAND, hide=True, in_stream=False, warn=True)
    inner = time.perf_counter() - t0
    group.close()
    bad = [c for c, r in results.items() if not hasattr(r, "exited") or r.exited != 0]
    if bad:
        raise SystemExit(f"fabric: {len(bad)} host(s) failed")
    print(json.dumps({"inner": inner}))


def timed_rex(argv: list[str]) -> float:
    """Seconds ``rex ARGV`` took in this process, its output discarded; exits unless it
    succeeded."""
    from rexplan.cli.rex import main

    stdout = sys.stdout
    t0 = time.perf_counter()
    with open(os.devnull, "w") as sink:
        sys.stdout = sink
        try:
            code = main(argv)
        finally:
            sys.stdout = stdout
    inner = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"rex {' '.join(argv[:2])} exited {code}")
    return inner


def _apply_argv(cfg: dict[str, Any]) -> list[str]:
    argv = ["apply", cfg["manifest"], "-y", "-q", "--keys", cfg["keys"]]
    return [*argv, "--known-hosts", cfg["known_hosts"], "--forks", str(cfg["forks"])]


def work_rex(cfg: dict[str, Any]) -> None:
    from rexplan.engine import executor  # noqa: F401 - imported before the clock starts, like fabric

    print(json.dumps({"inner": timed_rex(_apply_argv(cfg))}))


def work_rex_ssh(cfg: dict[str, Any]) -> None:
    """rex with every callback through the host's SSH connection (``callback: {via: ssh}``)."""
    from rexplan.engine import executor  # noqa: F401 - imported before the clock starts

    argv = _apply_argv(cfg)
    argv[1] = cfg["manifest_ssh"]
    print(json.dumps({"inner": timed_rex(argv)}))


def work_reapply(cfg: dict[str, Any]) -> None:
    """Apply (untimed), then apply the unchanged manifest again: "inner" is the second."""
    timed_rex(_apply_argv(cfg))
    print(json.dumps({"inner": timed_rex(_apply_argv(cfg))}))


@contextlib.contextmanager
def fresh_daemon() -> Iterator[dict[str, float]]:
    """A REX_MUX_DIR of its own for a persist run; afterwards the daemon's CPU time (in
    ``extra["cpu"]``: it is nobody's child) and the daemon stopped, by pid if need be."""
    from rexplan.transport import persist as mux
    from rexplan.transport import persist_wire

    base = tempfile.mkdtemp(prefix="rexmux-", dir="/tmp")
    directory = os.path.join(base, "mux")
    os.environ[persist_wire.MUX_ENV] = directory
    extra = {"cpu": 0.0}
    try:
        yield extra
    finally:
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(directory, persist_wire.PID_FILE).read_text())
        if pid is not None:
            extra["cpu"] = procs.cpu_seconds(pid)
            with contextlib.suppress(Exception):
                mux.MuxClient(60, directory).stop()
            procs.kill([pid])
        shutil.rmtree(base, ignore_errors=True)


def work_persist(cfg: dict[str, Any]) -> None:
    with fresh_daemon() as extra:
        inner = timed_rex([*_apply_argv(cfg), "--persist", "60"])
    print(json.dumps({"inner": inner, "cpu": extra["cpu"]}))


def work_reapply_p(cfg: dict[str, Any]) -> None:
    with fresh_daemon() as extra:
        timed_rex([*_apply_argv(cfg), "--persist", "60"])
        inner = timed_rex([*_apply_argv(cfg), "--persist", "60"])
    print(json.dumps({"inner": inner, "cpu": extra["cpu"]}))


def work_stop(cfg: dict[str, Any]) -> None:
    """Apply (untimed), then ``rex stop`` every step: "inner" is the stop alone."""
    timed_rex(_apply_argv(cfg))
    argv = ["-q", "stop", cfg["manifest"], "--keys", cfg["keys"]]
    argv += ["--known-hosts", cfg["known_hosts"], "--forks", str(cfg["forks"])]
    print(json.dumps({"inner": timed_rex(argv)}))


def worker(variant: str, cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    t0 = time.perf_counter()
    works = {"openssh": work_openssh, "fabric": work_fabric, "rex": work_rex}
    works["rex-cold"] = work_rex  # on hosts whose agent files were removed before the run
    works["rex-ssh"] = work_rex_ssh
    works["reapply"] = work_reapply
    works["stop"] = work_stop
    works["persist"] = work_persist
    works["reapply-p"] = work_reapply_p
    works[variant](cfg)
    if variant == "openssh":
        print(json.dumps({"inner": time.perf_counter() - t0}))


# --- the driver ---------------------------------------------------------------------------------


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def worker_env() -> dict[str, str]:
    """The workers' environment: bytecode caching on, as after ``pip install`` (an editable
    install under PYTHONDONTWRITEBYTECODE would compile rex's modules on every run)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def warm_imports() -> None:
    """Import every worker's modules once, so that each has its bytecode cached."""
    code = "import fabric, paramiko, rexplan.cli.rex, rexplan.engine.executor, rexplan.cli.rex_key"
    subprocess.run([sys.executable, "-c", code], env=worker_env(), check=True)


def timed(variant: str, cfg_path: Path) -> dict[str, float]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, str(cfg_path)]
    cpu0, t0 = cpu_children(), time.perf_counter()
    out = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, check=False, env=worker_env()
    )
    wall, cpu = time.perf_counter() - t0, cpu_children() - cpu0
    if out.returncode != 0:
        raise SystemExit(f"{variant} worker failed: {out.stderr.decode(errors='replace')}")
    last = json.loads(out.stdout.decode().strip().splitlines()[-1])
    # a persistence daemon is nobody's child: its CPU comes in the worker's report
    return {"wall": wall, "inner": last["inner"], "cpu": cpu + last.get("cpu", 0.0)}


def launched(uid: int, agent_marker: str) -> list[int]:
    """The rig account's sleeps and rex agents (not its sshd session processes)."""
    found = []
    for pid in procs.pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        argv = procs.cmdline(pid)
        if argv[:2] == ["sleep", "30"] or any(agent_marker in w for w in argv):
            found.append(pid)
    return [p for p in found if procs.alive(p)]


def clean(uid: int, agent_marker: str, expect: int) -> int:
    """Kill every launched process by pid; returns how many sleeps there were."""
    pids = launched(uid, agent_marker)
    sleeps = sum(1 for p in pids if procs.cmdline(p)[:2] == ["sleep", "30"])
    procs.kill(pids)
    if sleeps != expect:
        print(f"  warning: found {sleeps} sleeps, expected {expect}", file=sys.stderr)
    return sleeps


def write_manifest(
    path: Path,
    hosts: Sequence[Any],
    login: str,
    identity: str,
    settle: float,
    via: str = "direct",
) -> None:
    doc = {
        "rex": 1,
        "defaults": {"user": "bench", "timeouts": {"connect": 20, "start": 20, "callback": 20}},
        "hosts": {h.name: {"address": h.address, "port": h.port} for h in hosts},
        "users": {"bench": {"login": login, "identity": identity}},
        "programs": {
            "sleeper": {
                "on": [h.name for h in hosts],
                "run": ["sleep", "30"],
                "ready": {"alive": settle},
            }
        },
        "authorize": ["*.bench.sleeper"],
        "callback": {"via": via},
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def bench(
    sizes: list[int], reps: int, settle: float, forks: int | None, variants: list[str]
) -> None:
    from sshrig import SshdRig

    from rexplan.cli.rex_key import main as rex_key
    from rexplan.transport.pinning import host_key_name
    from rexplan.transport.shipping import bundle_sha

    marker = f"agent-{bundle_sha()[:16]}.py"
    rig = SshdRig()
    tmp = Path(tempfile.mkdtemp(prefix="rexbench-"))
    try:
        warm_imports()
        t0 = time.perf_counter()
        all_hosts = rig.hosts(max(sizes))
        print(
            f"rig: {len(all_hosts)} sshds in {time.perf_counter() - t0:.1f}s; "
            f"{os.cpu_count()} CPUs; settle {settle}s",
            flush=True,
        )
        uid = rig.accounts[0].uid
        keys = tmp / "keys"
        rows: list[tuple[int, str, int, dict[str, float]]] = []
        for n in sizes:
            hosts = all_hosts[:n]
            manifest = tmp / f"m{n}.yaml"
            write_manifest(manifest, hosts, rig.login, rig.identity, settle)
            manifest_ssh = tmp / f"m{n}-ssh.yaml"
            write_manifest(manifest_ssh, hosts, rig.login, rig.identity, settle, via="ssh")
            common = ["-m", str(manifest), "--keys", str(keys)]
            with open(os.devnull, "w") as sink:
                stdout, sys.stdout = sys.stdout, sink
                try:
                    codes = [
                        rex_key(["create", *common]),
                        rex_key(["distribute", *common, "--known-hosts", rig.known_hosts]),
                    ]
                finally:
                    sys.stdout = stdout
            if codes != [0, 0]:
                raise SystemExit(f"key set-up failed: {codes}")
            # every tool gets a known_hosts of exactly these hosts: fabric's clients each
            # parse the whole file, so the rig's (all sizes) would slow fabric alone
            known = tmp / f"known{n}"
            pins = {host_key_name(h.address, h.port) for h in hosts}
            lines = Path(rig.known_hosts).read_text().splitlines()
            known.write_text("".join(f"{x}\n" for x in lines if x.split(" ", 1)[0] in pins))
            cfg = {
                "hosts": [{"name": h.name, "address": h.address, "port": h.port} for h in hosts],
                "login": rig.login,
                "identity": rig.identity,
                "known_hosts": str(known),
                "manifest": str(manifest),
                "manifest_ssh": str(manifest_ssh),
                "keys": str(keys),
                "forks": forks or n,
            }
            cfg_path = tmp / f"cfg{n}.json"
            cfg_path.write_text(json.dumps(cfg))
            if "rex" in variants:
                # the first launch on a host uploads the agent and compiles it there once:
                # shown apart, so that the medians are of hosts rex has run on before
                m = timed("rex", cfg_path)
                clean(uid, marker, n)
                print(f"N={n:<4} rex cold  (agent upload): wall {m['wall']:6.2f}s  "
                      f"inner {m['inner']:6.2f}s  cpu {m['cpu']:6.2f}s", flush=True)  # fmt: skip
            homes = [Path(h.state_dir_for(rig.login)) for h in hosts]
            for rep in range(reps):
                for variant in variants:
                    if variant == "rex-cold":
                        forget_agents(homes)
                    m = timed(variant, cfg_path)
                    clean(uid, marker, 0 if variant == "stop" else n)
                    rows.append((n, variant, rep, m))
                    print(
                        f"N={n:<4} {variant:<9} rep {rep}: wall {m['wall']:6.2f}s  "
                        f"inner {m['inner']:6.2f}s  cpu {m['cpu']:6.2f}s",
                        flush=True,
                    )
        report(rows, sizes, variants)
    finally:
        if rig.accounts:
            procs.kill(launched(rig.accounts[0].uid, marker))
        rig.close()
        shutil.rmtree(tmp, ignore_errors=True)


def forget_agents(homes: Sequence[Path]) -> None:
    """Remove every agent file and compiled cache from these rex homes: the next launch there
    is a first one."""
    for home in homes:
        for path in home.glob("agent-*"):
            path.unlink(missing_ok=True)


def report(
    rows: list[tuple[int, str, int, dict[str, float]]], sizes: list[int], variants: list[str]
) -> None:
    def med(n: int, variant: str, key: str) -> float:
        return statistics.median(m[key] for nn, v, _, m in rows if nn == n and v == variant)

    print()
    print(f"{'N':>4}  {'variant':<9} {'wall s':>7} {'inner s':>8} {'cpu s':>7}   (median of reps)")
    for n in sizes:
        for v in variants:
            print(
                f"{n:>4}  {v:<9} {med(n, v, 'wall'):7.2f} {med(n, v, 'inner'):8.2f} "
                f"{med(n, v, 'cpu'):7.2f}"
            )
        if "rex" in variants:
            for other in ("fabric", "openssh"):
                if other not in variants:
                    continue
                ratios = "  ".join(
                    f"{key} {med(n, 'rex', key) / med(n, other, key):.2f}x"
                    for key in ("wall", "inner", "cpu")
                )
                print(f"{n:>4}  rex/{other:<8} {ratios}")
        if "rex-cold" in variants:
            for other in ("fabric", "openssh", "rex"):
                if other in variants:
                    ratios = "  ".join(
                        f"{key} {med(n, 'rex-cold', key) / med(n, other, key):.2f}x"
                        for key in ("wall", "inner", "cpu")
                    )
                    print(f"{n:>4}  rex-cold/{other:<7} {ratios}")
        if "rex" in variants and "rex-ssh" in variants:
            ratios = "  ".join(
                f"{key} {med(n, 'rex-ssh', key) / med(n, 'rex', key):.2f}x"
                for key in ("wall", "inner", "cpu")
            )
            print(f"{n:>4}  rex-ssh/rex   {ratios}")
        for again, label in (("reapply", ""), ("reapply-p", " with persist")):
            if "rex" in variants and again in variants:
                ratio = med(n, again, "inner") / med(n, "rex", "inner")
                print(f"{n:>4}  re-apply unchanged{label} / first apply (inner): {ratio:.2f}x")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"]:
        worker(args[1], args[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="16,64,128,256", help="comma-separated host counts")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per variant and size")
    parser.add_argument("--settle", type=float, default=0.2, help="rex's alive probe, seconds")
    parser.add_argument("--forks", type=int, help="rex --forks (default: N, all at once)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    a = parser.parse_args(args)
    if os.geteuid() != 0:
        raise SystemExit("bench/launch.py needs root (it runs the sshd test rig)")
    variants = [v for v in a.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"variants are {', '.join(VARIANTS)}")
    bench([int(x) for x in a.hosts.split(",")], a.reps, a.settle, a.forks, variants)


if __name__ == "__main__":
    main()
