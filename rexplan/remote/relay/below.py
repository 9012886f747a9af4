"""A relay below this one, started on one of its children over ssh and fed requests as they
come. Its lines are passed up as they are, but only those for the steps and kills sent there
and still awaited: a line for any other step is dropped and reported upward as ``{"warn":
text}`` (WARNINGS of them per relay below, then one saying that more came)."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time

from rexplan.remote.relay.client import (
    _LINE,
    BOOTSTRAP,
    WARNINGS,
    Client,
    _error,
    _framed,
    _Late,
    _Refused,
    _tail,
)

# every relay run pays for its imports: typing never
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import IO, Any

    from rexplan.remote.relay.node import Relay


def _lines(first: bytes, stream: IO[bytes]) -> Iterator[bytes]:
    """``first`` (output read already) and then ``stream``, line by line; a line longer than
    _LINE comes in pieces (no JSON, so dropped): a relay below cannot make this one buffer
    without bound."""
    if first:
        lines = first.splitlines(keepends=True)
        if not lines[-1].endswith(b"\n"):
            lines[-1] += stream.readline(_LINE)
        yield from lines
    yield from iter(lambda: stream.readline(_LINE), b"")


class Below:
    """The relay this relay started on one of its children, fed requests as they come."""

    def __init__(self, relay: Relay, child: dict[str, Any]) -> None:
        self.relay = relay
        self.child = child
        self.lock = threading.Lock()
        self.pending: dict[str, bool] = {}  # step id -> launched
        self.kills: list[str] = []  # step ids of kills it owes an answer
        self.asked: set[str] = set()  # step ids of every step and kill sent to it
        self.strays = 0  # its lines for steps it was never sent
        self.lost: str | None = None
        self.up = False
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.threads = [threading.Thread(target=self._run)]
        self.threads[0].start()

    def send(self, msg: dict[str, Any]) -> None:
        kill = msg.get("kill")
        with self.lock:
            lost = self.lost
            if lost is None and kill is not None:
                self.kills.append(kill)
                self.asked.add(kill)
            elif lost is None:
                self.pending[msg["step"]] = False
                self.asked.add(msg["step"])
        if lost is not None:
            if kill is not None:
                self.relay.emit({"killed": kill, "ok": False, "error": lost})
            else:
                self.relay.emit(_error(msg["step"], lost, "relay_lost", "relay", launched=False))
            return
        self.lines.put((json.dumps(msg) + "\n").encode())

    def _run(self) -> None:
        relay, child, name = self.relay, self.child, self.child["name"]
        header = dict(relay.header, name=name, children=child["relay"]["children"])
        sha = hashlib.sha256(relay.source).hexdigest()
        argv = [child["python"], "-I", "-S", "-c", BOOTSTRAP, sha, name]
        connect = float(relay.header["connect"])
        ssh = relay.ssh(child, child["relay"]["login"], argv, connect)
        try:
            client = relay.connect(child, ssh, connect, time.monotonic() + connect)
        except _Refused as exc:
            self._lose(f"relay {name} did not start: {exc}")
            return
        except _Late:
            self._lose(f"relay {name} did not start within {connect:g}s")
            return
        except OSError as exc:
            self._lose(f"relay {name} did not start: relay {relay.name}: {exc}")
            return
        status = client.status
        if status is None:
            first = _framed(relay.source) + (json.dumps(header) + "\n").encode()
            writer = threading.Thread(
                target=self._write, args=(client, first + _framed(relay.bundle))
            )
            drain = threading.Thread(target=client.drain)
            self.threads += [writer, drain]
            writer.start()
            drain.start()
            assert client.proc.stdout is not None
            self._read(_lines(client.out, client.proc.stdout))
            status = client.proc.wait()
            drain.join()
        what = "lost" if self.up else "did not start"
        self._lose(f"relay {name} {what} (exit {status}: {_tail(client.said())})")

    def _write(self, client: Client, first: bytes) -> None:
        stdin = client.proc.stdin
        assert stdin is not None
        data: bytes | None = first
        try:
            while data is not None:
                stdin.write(data)
                stdin.flush()
                data = self.lines.get()
        except OSError:
            pass  # it died; _run reports that
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def _read(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: a value nested deep
                continue
            if not isinstance(msg, dict):
                continue
            if "up" in msg:
                self.up = True
                continue
            if "warn" in msg:  # from further down: passed up, bounded there
                self.relay.emit_line(line if line.endswith(b"\n") else line + b"\n")
                continue
            step, killed = msg.get("step"), msg.get("killed")
            with self.lock:
                if killed is not None and killed in self.kills:
                    self.kills.remove(killed)
                elif killed is None and step in self.pending:
                    if msg.get("launched") and len(msg) == 2:
                        self.pending[step] = True
                    else:
                        del self.pending[step]
                else:
                    # not owed: late (sent, answered already) or a step it was never sent,
                    # which a relay speaking for steps outside its subtree would claim
                    stray = killed if killed is not None else step
                    if stray not in self.asked:
                        self._stray(stray)
                    continue
            self.relay.emit_line(line if line.endswith(b"\n") else line + b"\n")

    def _stray(self, step: Any) -> None:
        """Report a line of the relay below for a step it was not sent (under the lock)."""
        self.strays += 1
        name = self.child["name"]
        if self.strays <= WARNINGS:
            what = "".join(c if " " <= c <= "~" else "?" for c in str(step)[:100])
            text = f"relay {name} sent a line for {what!r}, a step outside its subtree: dropped"
            self.relay.emit({"warn": text})
        elif self.strays == WARNINGS + 1:
            self.relay.emit({"warn": f"relay {name} sent more lines for steps outside its subtree"})

    def _lose(self, detail: str) -> None:
        """It ended or never started: fail what it still owes."""
        with self.lock:
            self.lost = detail
            pending, self.pending = self.pending, {}
            kills, self.kills = self.kills, []
        for step, launched in pending.items():
            self.relay.emit(_error(step, detail, "relay_lost", "relay", launched))
        for kill in kills:
            self.relay.emit({"killed": kill, "ok": False, "error": detail})

    def close(self) -> None:
        self.lines.put(None)

    def join(self) -> None:
        self.threads[0].join()  # then the writer and drain it started, if any, are listed
        for thread in self.threads[1:]:
            thread.join()
