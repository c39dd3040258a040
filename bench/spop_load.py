"""SPOP load generator that behaves like HAProxy, against the agent's SPOP server.

It opens N connections, says HELLO the way HAProxy 2.6 does ("pipelining,async",
max-frame-size 16380), and keeps up to `--window` NOTIFY frames in flight per
connection (HAProxy 3.1+ caps a connection at 20 streams). Each NOTIFY carries
one HAProxy-shaped `mqtt-connect` message (BINARY client id, IPV4 src, BINARY
ASCII-decimal fields, STRING balancer).

Two measurements:
  * closed loop: every connection keeps its window full for `--seconds`:
    the agent's maximum NOTIFY->ACK rate;
  * open loop at `--rate` per second: frames are sent on a schedule whatever
    the answers do, so latency percentiles include queueing (no coordinated
    omission).

By default it starts the agent's SPOP server itself, with a trivial handler
(two set-var actions, no Redis), in a child process pinned to CPU 0 while the
generator runs on CPU 1. `--target host:port` measures an agent already
running instead (e.g. `mqtt-affinity run` with Redis behind it).

    .venv/bin/python bench/spop_load.py --connections 8 --window 20 --seconds 5 --rate 10000
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import multiprocessing
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from agent.spop import Message, Scope, SetVar
from agent.spop.frames import FrameType, encode_haproxy_hello, encode_notify
from agent.spop.types import decode_varint


def haproxy_message(i: int) -> Message:
    return Message(
        "mqtt-connect",
        (
            ("client_id", b"sensor-%08d-site-42-floor-3" % i),
            ("username", b"tenant-a"),
            ("src", ipaddress.IPv4Address(f"10.1.{(i >> 8) & 255}.{i & 255}")),
            ("proto_ver", b"4"),
            ("flags", b"194"),
            ("sess_expiry", None),
            ("balancer", "ha1"),
        ),
    )


# --- the agent under test (child process) -------------------------------------------


class TrivialDispatcher:
    """What an agent costs without Redis: two set-vars per message."""

    _actions: ClassVar[list[SetVar]] = [
        SetVar(Scope.TRANSACTION, "node", "node2"),
        SetVar(Scope.TRANSACTION, "how", "hit"),
    ]

    async def handle(self, message: Message) -> list:
        return self._actions

    def on_error(self, message: Message, exc: BaseException) -> list:
        return self._actions


def serve(port: int, ready: multiprocessing.synchronize.Event, cpu: int | None) -> None:  # type: ignore[name-defined]
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    from agent.server import SpopServer

    async def main() -> None:
        server = SpopServer(TrivialDispatcher(), "127.0.0.1", port, max_in_flight=64)
        await server.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the generator ---------------------------------------------------------------


@dataclass
class Stats:
    sent: int = 0
    acked: int = 0
    latencies: list[float] | None = None


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frames: list[bytes]) -> None:
        self.reader, self.writer, self.frames = reader, writer, frames
        self.sent_at: dict[int, float] = {}
        self.next_sid = 1
        self.in_flight = 0
        self.space = asyncio.Event()
        self.space.set()

    @classmethod
    async def open(cls, host: str, port: int, frames: list[bytes]) -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(encode_haproxy_hello(capabilities="pipelining,async", engine_id="bench"))
        head = await reader.readexactly(4)
        body = await reader.readexactly(int.from_bytes(head, "big"))
        if body[0] != FrameType.AGENT_HELLO:
            raise SystemExit(f"agent answered HELLO with frame type {body[0]}")
        return cls(reader, writer, frames)

    def send_one(self) -> None:
        sid = self.next_sid
        self.next_sid += 1
        # Frame ids and stream ids as HAProxy uses them: a new stream per CONNECT, frame 1.
        self.writer.write(encode_notify(sid, 1, [self.frames[sid % len(self.frames)]]))
        self.sent_at[sid] = time.perf_counter()
        self.in_flight += 1

    async def read_acks(self, stats: Stats, stop_after: float) -> None:
        reader = self.reader
        lat = stats.latencies
        while True:
            try:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big"))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            now = time.perf_counter()
            if body[0] != FrameType.ACK:
                raise SystemExit(f"unexpected frame type {body[0]}")
            sid, _ = decode_varint(body, 5)
            t0 = self.sent_at.pop(sid)
            self.in_flight -= 1
            stats.acked += 1
            if lat is not None and t0 >= stop_after:
                lat.append(now - t0)
            self.space.set()


async def closed_loop(host: str, port: int, conns: int, window: int, seconds: float) -> tuple[float, Stats]:
    frames = [haproxy_message(i) for i in range(1000)]
    pool = [await Conn.open(host, port, frames) for _ in range(conns)]
    stats = Stats(latencies=[])
    warm_until = time.perf_counter() + 0.5
    readers = [asyncio.create_task(c.read_acks(stats, warm_until)) for c in pool]

    async def drive(c: Conn, deadline: float) -> None:
        while time.perf_counter() < deadline:
            while c.in_flight < window:
                c.send_one()
                stats.sent += 1
            c.space.clear()
            await c.space.wait()

    deadline = time.perf_counter() + 0.5 + seconds
    await asyncio.sleep(0)
    await asyncio.gather(*(drive(c, warm_until) for c in pool))
    start_acked, start = stats.acked, time.perf_counter()
    assert stats.latencies is not None
    stats.latencies.clear()  # the readers hold this list: clear it, do not replace it
    await asyncio.gather(*(drive(c, deadline) for c in pool))
    elapsed = time.perf_counter() - start
    rate = (stats.acked - start_acked) / elapsed
    for c in pool:
        while c.in_flight:
            c.space.clear()
            await asyncio.wait_for(c.space.wait(), 5)
        c.writer.close()
    for r in readers:
        r.cancel()
    return rate, stats


async def open_loop(host: str, port: int, conns: int, window: int, rate: float, seconds: float) -> tuple[Stats, int]:
    frames = [haproxy_message(i) for i in range(1000)]
    pool = [await Conn.open(host, port, frames) for _ in range(conns)]
    stats = Stats(latencies=[])
    start = time.perf_counter()
    warm_until = start + 0.5
    readers = [asyncio.create_task(c.read_acks(stats, warm_until)) for c in pool]
    total = int(rate * (seconds + 0.5))
    over_window = 0
    tick = 0.001  # schedule in 1 ms slots; latency is measured from the real send time
    i = 0
    while i < total:
        due = int((time.perf_counter() - start) * rate) + 1
        while i < min(due, total):
            c = pool[i % conns]
            if c.in_flight >= window:
                over_window += 1  # HAProxy would queue this stream; we send anyway and count it
            c.send_one()
            stats.sent += 1
            i += 1
        await asyncio.sleep(tick)
    deadline = time.perf_counter() + 5
    while stats.acked < stats.sent and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for c in pool:
        c.writer.close()
    for r in readers:
        r.cancel()
    return stats, over_window


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="host:port of a running agent (default: start a trivial one)")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--window", type=int, default=20, help="frames in flight per connection (HAProxy 3.x: 20)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=10000.0, help="open-loop rate for the latency run")
    args = ap.parse_args()

    child = None
    if args.target:
        host, _, port_s = args.target.rpartition(":")
        port = int(port_s)
    else:
        host = "127.0.0.1"
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        ready = multiprocessing.Event()
        cpus = sorted(os.sched_getaffinity(0))
        agent_cpu = cpus[0] if len(cpus) > 1 else None
        child = multiprocessing.Process(target=serve, args=(port, ready, agent_cpu), daemon=True)
        child.start()
        if not ready.wait(10):
            raise SystemExit("agent did not start")
        if len(cpus) > 1:
            os.sched_setaffinity(0, set(cpus[1:]))
    try:
        rate, st = asyncio.run(closed_loop(host, port, args.connections, args.window, args.seconds))
        lat = st.latencies or []
        print(f"closed loop: {args.connections} connections x {args.window} in flight, {args.seconds:.0f} s")
        print(f"  NOTIFY->ACK per second: {rate:,.0f}")
        print(f"  latency p50 {pct(lat, 50) * 1e3:.2f} ms  p99 {pct(lat, 99) * 1e3:.2f} ms  (at saturation)")
        st2, over = asyncio.run(open_loop(host, port, args.connections, args.window, args.rate, args.seconds))
        lat2 = st2.latencies or []
        lost = st2.sent - st2.acked
        print(f"open loop: {args.rate:,.0f} NOTIFY/s for {args.seconds:.0f} s over {args.connections} connections")
        print(f"  sent {st2.sent:,}  acked {st2.acked:,}  unanswered {lost}  sends beyond window {over}")
        print(f"  latency p50 {pct(lat2, 50) * 1e3:.2f} ms  p90 {pct(lat2, 90) * 1e3:.2f} ms  "
              f"p99 {pct(lat2, 99) * 1e3:.2f} ms  max {max(lat2) * 1e3 if lat2 else float('nan'):.2f} ms  "
              f"mean {statistics.fmean(lat2) * 1e3 if lat2 else float('nan'):.2f} ms")
    finally:
        if child is not None:
            child.terminate()
            child.join(5)


if __name__ == "__main__":
    main()
