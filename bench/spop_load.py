"""The agent alone: an HAProxy-shaped SPOP load generator against the real agent, a do-nothing
agent on our SPOP server and the C floor, in one run.

What it sends. N connections say HELLO the way HAProxy 2.6 does ("pipelining,async",
max-frame-size 16380) and keep up to `--window` NOTIFY frames in flight each (HAProxy 3.1+
caps a connection at 20 streams); every NOTIFY is a new stream (frame id 1) carrying one
`mqtt-connect` message exactly as haproxy/spoe-mqtt.conf makes HAProxy send it (checked on
2.6 and 3.2): client_id BINARY, username NULL (BINARY with `--username`), src IPV4,
proto_ver/flags/sess_expiry BINARY ASCII decimals or NULL, balancer STRING.

  * Persistent sessions by default: MQTT 3.1.1 with flags "0" (Clean Session 0), the sessions
    this product exists for: every decision reads and writes Redis. `--mqtt5 --expiry N` sends
    protocol 5 with a Session Expiry Interval of N s (persistent if N > 0); `--clean` sends
    Clean Session 1 (3.1.1; with --mqtt5: no expiry property), which never writes to Redis.
  * `--new-share F` (default 0.5): that fraction of the NOTIFYs carries a client id never seen
    before (a new placement: `assigned`); the others cycle over `--ids` ids placed during a
    warm-up (`hit`). Ids carry a per-run nonce, so a Redis used before does not know them.
  * Every ACK is decoded (its `node` and `how`) and the mix is printed: check it says what you
    meant to measure (hit/assigned for persistent sessions; none for clean ones).

The agents (`--agents`, default all three, each measured in turn; `--repeat` rotates the order):
  * real:  `mqtt-affinity run` (devstack: its own redis-server, three idle mosquitto for the
           agent's health probes, the product's default background intervals, log level info);
  * null:  bench/null_agent.py, SpopServer + a dispatcher that returns the two set-vars;
  * floor: bench/floor_spoa.c built with gcc -O2 into a temporary folder.
`--target HOST:PORT` measures an agent already running instead (`--target-pid` for its CPU).

Where things run (2+ CPUs): the agent under test is pinned alone to the first CPU of this
process's affinity (`taskset -a -cp`); the generator, Redis and the idle brokers share the
others. Redis is on the generator's side on purpose: the agent must not share its core.

Two measurements per agent:
  * closed loop, `--seconds`: every connection keeps its window full; decisions per second,
    latency at saturation, and CPU per decision from /proc for the agent, Redis and the
    generator, plus how busy each CPU was (if the generator's CPU was the saturated one, the
    agent's figure is a lower bound and the report says so);
  * open loop at `--rate`/s for `--seconds`: frames leave on a 1 ms schedule whatever the
    answers do, so latency percentiles include queueing (no coordinated omission).

    .venv/bin/python bench/spop_load.py                                  # all three, 5 s each
    .venv/bin/python bench/spop_load.py --agents real --seconds 2 --repeat 1
    .venv/bin/python bench/spop_load.py --mqtt5 --expiry 3600 --new-share 0.1
    .venv/bin/python bench/spop_load.py --clean                          # the old clean-session load
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoas import (
    BENCH_AGENT_OVERRIDES,
    FloorSpoa,
    NullAgent,
    build_floor,
    cpu_busy,
    gcc_version,
    pin,
    proc_cpu,
    self_cpu,
)

import devstack
from agent.spop import Message
from agent.spop.frames import (
    FrameType,
    decode_actions,
    decode_frame,
    encode_haproxy_hello,
    encode_messages,
)
from agent.spop.types import decode_varint, encode_varint

KINDS = ("floor", "null", "real")
LABEL = {"floor": "C floor (floor_spoa.c)", "null": "do-nothing agent (our SpopServer)",
         "real": "real agent (mqtt-affinity run + Redis)", "target": "--target agent"}
TARGET_RATE = 40_000  # issue 12: the real agent alone, one core, persistent, 50% new ids
_LEN = struct.Struct(">I")
_NOTIFY_HEAD = bytes((FrameType.NOTIFY, 0, 0, 0, 1))  # type, flags = FIN
_ACK = int(FrameType.ACK)


# --------------------------------------------------------------------------- the messages


class Mix:
    """The `mqtt-connect` payloads: a pool of ids placed in a warm-up, and never-seen ids.

    Ids are all 34 bytes: b"w<nonce>-<10 digits>-site-42-floor-3" (pool) and b"n<nonce>-..."
    (new). `next_payload()` interleaves exactly `new_share` new ids (an accumulator, not a coin)."""

    def __init__(self, *, ids: int, new_share: float, mqtt5: bool, expiry: int | None, clean: bool,
                 username: bytes | None, balancer: str = "ha1") -> None:
        self.nonce = secrets.token_hex(3).encode()
        self.new_share = new_share
        flags = (0x02 if clean else 0) | (0x80 if username is not None else 0)
        self.fields = {
            "proto_ver": b"5" if mqtt5 else b"4",
            "flags": str(flags).encode(),
            "sess_expiry": (str(expiry).encode() if mqtt5 and expiry is not None and not clean else None),
        }
        self.username = username
        self.balancer = balancer
        self.persistent = (mqtt5 and not clean and (expiry or 0) > 0) or (not mqtt5 and not clean)
        self.pool = [self._payload(self.pool_id(i), i) for i in range(ids)]
        # Never-seen ids: prefix + 10 digits + suffix around a fixed template, cheap to make.
        probe = self._payload(b"n" + self.nonce + b"-0000000000-site-42-floor-3", 0)
        cut = probe.index(b"n" + self.nonce + b"-") + len(self.nonce) + 2
        self._new_head, self._new_tail = probe[:cut], probe[cut + 10:]
        self._new_n = 0
        self._pool_i = 0
        self._acc = 0.0
        self.sent_new = 0
        self.sent_pool = 0

    def pool_id(self, i: int) -> bytes:
        return b"w%s-%010d-site-42-floor-3" % (self.nonce, i)

    def _payload(self, cid: bytes, i: int) -> bytes:
        return encode_messages([Message("mqtt-connect", (
            ("client_id", cid),
            ("username", self.username),
            ("src", ipaddress.IPv4Address(f"10.1.{(i >> 8) & 255}.{i & 255}")),
            ("proto_ver", self.fields["proto_ver"]),
            ("flags", self.fields["flags"]),
            ("sess_expiry", self.fields["sess_expiry"]),
            ("balancer", self.balancer),
        ))])

    def next_payload(self) -> bytes:
        self._acc += self.new_share
        if self._acc >= 1.0:
            self._acc -= 1.0
            self._new_n += 1
            self.sent_new += 1
            return b"%s%010d%s" % (self._new_head, self._new_n, self._new_tail)
        self.sent_pool += 1
        p = self.pool[self._pool_i]
        self._pool_i = (self._pool_i + 1) % len(self.pool)
        return p

    def describe(self) -> str:
        if self.fields["proto_ver"] == b"5":
            kind = (f"MQTT 5, sess_expiry {self.fields['sess_expiry'].decode()}" if self.fields["sess_expiry"]
                    else "MQTT 5, no sess_expiry")
        else:
            kind = f"MQTT 3.1.1, flags {self.fields['flags'].decode()}"
        return (f"{'persistent' if self.persistent else 'clean (never written to Redis)'} sessions ({kind}), "
                f"{self.new_share:.0%} never-seen client ids, the rest cycling over {len(self.pool):,} ids "
                "placed in a warm-up")


# --------------------------------------------------------------------------- the generator

_SMALL = tuple(bytes((i,)) for i in range(240))


def _varint(v: int) -> bytes:
    """encode_varint, with the 1-3 byte cases (stream ids up to ~264,000) inline: it runs per NOTIFY."""
    if v < 240:
        return _SMALL[v]
    v1 = (v - 240) >> 4
    if v1 < 128:
        return bytes((240 | (v & 15), v1))
    v2 = (v1 - 128) >> 7
    if v2 < 128:
        return bytes((240 | (v & 15), (v1 | 128) & 255, v2))
    return encode_varint(v)


@dataclass
class Stats:
    acked: int = 0
    counting_after: float = math.inf  # latencies and the ACK mix count from here
    latencies: list[float] = field(default_factory=list)
    payloads: Counter = field(default_factory=Counter)  # ACK payload bytes -> count (a handful of variants)

    def mix(self) -> Counter:
        """(node, how) -> count, decoding each distinct ACK payload once."""
        out: Counter = Counter()
        for payload, n in self.payloads.items():
            vals = {a.name: a.value for a in decode_actions(payload) if hasattr(a, "value")}
            out[(vals.get("node"), vals.get("how"))] += n
        return out


class Conn(asyncio.Protocol):
    """One SPOP connection of the generator. Frames due together go out in one write."""

    def __init__(self, mix: Mix, hello_done: asyncio.Future[None]) -> None:
        self.source = mix.next_payload  # -> the next NOTIFY payload
        self.hello_done = hello_done
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sent_at: dict[int, float] = {}
        self.next_sid = 1
        self.heads: dict[int, bytes] = {}
        self.stats: Stats | None = None
        self.window = 0  # closed loop: refill up to this many in flight on every read; 0 = open loop
        self.stop_refill = math.inf
        self.idle: asyncio.Event = asyncio.Event()
        self.lost: BaseException | None = None

    @property
    def in_flight(self) -> int:
        return len(self.sent_at)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(encode_haproxy_hello(capabilities="pipelining,async", engine_id="bench"))  # type: ignore[attr-defined]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionError("agent closed the connection")
        if not self.hello_done.done():
            self.hello_done.set_exception(self.lost)
        self.idle.set()

    def frames(self, n: int, now: float) -> bytes:
        out: list[bytes] = []
        next_payload = self.source
        heads = self.heads
        sent_at = self.sent_at
        first = self.next_sid
        for sid in range(first, first + n):
            payload = next_payload()
            sidb = _varint(sid)
            size = len(sidb) + len(payload)
            head = heads.get(size)
            if head is None:  # length prefix + type + flags: a handful of sizes (ids have one length)
                head = heads[size] = _LEN.pack(size + 6) + _NOTIFY_HEAD
            out += (head, sidb, b"\x01", payload)
            sent_at[sid] = now
        self.next_sid = first + n
        return b"".join(out)

    def send(self, n: int) -> None:
        if n > 0 and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.frames(n, time.perf_counter()))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        stats = self.stats
        sent_at = self.sent_at
        while end - pos >= 4:
            n = _LEN.unpack_from(buf, pos)[0]
            stop = pos + 4 + n
            if stop > end:
                break
            b = pos + 4
            ftype = buf[b]
            if ftype == _ACK:
                sid = buf[b + 5]
                if sid < 240:
                    off = b + 6
                else:
                    sid, off = decode_varint(buf, b + 5)
                off = off + 1 if buf[off] < 240 else decode_varint(buf, off)[1]  # frame id
                t0 = sent_at.pop(sid, None)
                if t0 is None:
                    raise SystemExit(f"ACK for unknown stream {sid}")
                if stats is not None:
                    stats.acked += 1
                    if t0 >= stats.counting_after:
                        stats.latencies.append(now - t0)
                        stats.payloads[bytes(buf[off:stop])] += 1
            elif ftype == FrameType.AGENT_HELLO:
                if not self.hello_done.done():
                    self.hello_done.set_result(None)
            else:
                frame = decode_frame(bytes(buf[pos:stop]))[0]
                raise SystemExit(f"agent sent frame type {frame.type}: {frame.payload[:200]!r}")
            pos = stop
        del buf[:pos]
        if self.window and now < self.stop_refill:
            self.send(self.window - len(sent_at))
        if not sent_at:
            self.idle.set()


async def open_conns(host: str, port: int, mix: Mix, n: int) -> list[Conn]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(n):
        done: asyncio.Future[None] = loop.create_future()
        _, proto = await loop.create_connection(lambda d=done: Conn(mix, d), host, port)
        await asyncio.wait_for(done, 5)
        conns.append(proto)
    return conns


async def drain(conns: list[Conn], timeout: float = 10.0) -> int:
    """Wait until nothing is in flight (or `timeout`); returns how many are still unanswered."""
    deadline = time.perf_counter() + timeout
    for c in conns:
        while c.in_flight and c.lost is None and time.perf_counter() < deadline:
            c.idle.clear()
            try:
                await asyncio.wait_for(c.idle.wait(), max(0.01, deadline - time.perf_counter()))
            except TimeoutError:
                break
    return sum(c.in_flight for c in conns)


def close(conns: list[Conn]) -> None:
    for c in conns:
        if c.transport is not None:
            c.transport.close()


@dataclass
class Sample:
    """Cumulative CPU seconds of the processes and CPUs that matter, at one instant."""

    t: float
    agent: float
    redis: float
    gen: float
    cpus: dict[int, float]


class Probe:
    def __init__(self, agent_pid: int | None, redis_pid: int | None, cpus: list[int]) -> None:
        self.agent_pid, self.redis_pid, self.cpus = agent_pid, redis_pid, cpus

    def sample(self) -> Sample:
        return Sample(time.perf_counter(), proc_cpu(self.agent_pid), proc_cpu(self.redis_pid), self_cpu(),
                      {c: cpu_busy(c) for c in self.cpus})


@dataclass
class Phase:
    """One measurement (closed or open loop) of one agent."""

    kind: str
    loop: str  # "closed" | "open"
    repeat: int
    decisions: int  # ACKs received in the timed window
    seconds: float
    latencies: list[float]
    mix: Counter
    agent_cpu: float
    redis_cpu: float
    gen_cpu: float
    cpu_busy_pct: dict[int, float]
    sent: int = 0
    unanswered: int = 0
    over_window: int = 0
    cpu_seconds: float = math.nan  # wall time the CPU figures cover (open loop: until drained)

    @property
    def rate(self) -> float:
        return self.decisions / self.seconds if self.seconds else 0.0

    @property
    def agent_pct(self) -> float:
        """The agent process's own CPU, % of one CPU: below its CPU's busy %, others ran there."""
        window = self.seconds if math.isnan(self.cpu_seconds) else self.cpu_seconds
        return self.agent_cpu / window * 100 if window else math.nan

    def per_decision_us(self, cpu: float) -> float:
        return cpu / self.decisions * 1e6 if self.decisions else math.nan


def delta(a: Sample, b: Sample) -> tuple[float, float, float, float, dict[int, float]]:
    dt = b.t - a.t
    busy = {c: (b.cpus[c] - a.cpus[c]) / dt * 100 if dt else math.nan for c in a.cpus}
    return dt, b.agent - a.agent, b.redis - a.redis, b.gen - a.gen, busy


async def place(host: str, port: int, mix: Mix, conns_n: int, window: int) -> Counter:
    """Warm-up: every pool id once (closed loop), so the measured pool ids are all known."""
    conns = await open_conns(host, port, mix, conns_n)
    stats = Stats(counting_after=0.0)
    todo = iter(mix.pool)
    for c in conns:
        c.stats = stats
        c.source = todo.__next__  # the pool in order, not the mix's schedule
    try:
        sent = 0
        while sent < len(mix.pool):
            for c in conns:
                room = min(window - c.in_flight, len(mix.pool) - sent)
                if room > 0:
                    c.send(room)
                    sent += room
            await asyncio.sleep(0.001)
        left = await drain(conns)
    finally:
        close(conns)
    if left:
        raise SystemExit(f"warm-up: {left} NOTIFYs unanswered")
    return stats.mix()


async def closed_loop(host: str, port: int, mix: Mix, conns_n: int, window: int, seconds: float, probe: Probe,
                      kind: str, rep: int, warm: float = 0.5) -> Phase:
    conns = await open_conns(host, port, mix, conns_n)
    stats = Stats()
    start = time.perf_counter()
    for c in conns:
        c.stats = stats
        c.window = window
        c.stop_refill = start + warm + seconds
    for c in conns:
        c.send(window)
    await asyncio.sleep(warm)
    stats.counting_after = time.perf_counter()
    a, acked0 = probe.sample(), stats.acked
    await asyncio.sleep(max(0.0, start + warm + seconds - time.perf_counter()))
    b, acked1 = probe.sample(), stats.acked
    left = await drain(conns)
    close(conns)
    dt, agent, redis, gen, busy = delta(a, b)
    # Latencies/mix of NOTIFYs sent in the window; drop those answered after it (drain).
    return Phase(kind, "closed", rep, acked1 - acked0, dt, stats.latencies, stats.mix(), agent, redis, gen, busy,
                 unanswered=left)


async def open_loop(host: str, port: int, mix: Mix, conns_n: int, window: int, rate: float, seconds: float,
                    probe: Probe, kind: str, rep: int, warm: float = 0.5) -> Phase:
    conns = await open_conns(host, port, mix, conns_n)
    stats = Stats()
    for c in conns:
        c.stats = stats
    start = time.perf_counter()
    total = int(rate * (seconds + warm))
    over_window = 0
    i = 0
    a = None
    per_conn = [0] * conns_n
    while i < total:
        now = time.perf_counter()
        if a is None and now >= start + warm:
            stats.counting_after = now
            a = probe.sample()
        due = min(total, int((now - start) * rate) + 1)
        while i < due:
            k = i % conns_n
            per_conn[k] += 1
            i += 1
        for k, c in enumerate(conns):
            n = per_conn[k]
            if n:
                # Frames sent while the connection already had `window` in flight: HAProxy would have
                # queued them on its side; we send them anyway (the latency includes that wait either way).
                over_window += max(0, min(n, c.in_flight + n - window))
                c.send(n)
                per_conn[k] = 0
        await asyncio.sleep(0.001)
    b_time = time.perf_counter()
    left = await drain(conns, timeout=5.0)
    b = probe.sample()  # CPU until everything sent was answered
    close(conns)
    assert a is not None
    dt, agent, redis, gen, busy = delta(a, b)
    counted = len(stats.latencies)
    return Phase(kind, "open", rep, counted, b_time - a.t, stats.latencies, stats.mix(), agent, redis, gen, busy,
                 sent=total, unanswered=left, over_window=over_window, cpu_seconds=dt)


# --------------------------------------------------------------------------- the agents


class Agents:
    """Starts the agents under test, pinned; `address(kind)`, `pid(kind)`, `close()`."""

    def __init__(self, kinds: list[str], workdir: Path, agent_cpu: int | None, other_cpus: list[int],
                 agent_set: list[tuple[str, str]]) -> None:
        self.kinds = kinds
        self.workdir = workdir
        self.agent_cpu = agent_cpu
        self.other_cpus = other_cpus
        self.stack: devstack.Stack | None = None
        self.procs: dict[str, devstack.ManagedProcess] = {}
        self.pinning: list[str] = []
        self.agent_set = agent_set

    def _pin(self, what: str, pid: int | None, cpus: list[int] | None) -> None:
        if pid is not None and cpus:
            self.pinning.append(f"{what}: {pin(pid, cpus)}")

    def start(self) -> None:
        agent_cpus = [self.agent_cpu] if self.agent_cpu is not None else None
        if "real" in self.kinds:
            st = self.stack = devstack.Stack("3.2", workdir=self.workdir / "real", die_with_parent=True,
                                             agent_overrides={**BENCH_AGENT_OVERRIDES, **dict(self.agent_set)})
            redis = st.start_redis()
            self._pin("redis", redis.pid, self.other_cpus)
            for b in st.start_brokers():
                self._pin(b.name, b.pid, self.other_cpus)
            agent = st.start_agent("bench")
            self._pin("real agent", agent.pid, agent_cpus)
            for node in devstack.NODES:  # until its probes see the brokers it would place nobody
                st.wait_agents_see(node, up=True, timeout=20)
            self.procs["real"] = agent
        if "null" in self.kinds:
            p = NullAgent(self.workdir / "null")
            p.die_with_parent = True
            p.start()
            self.procs["null"] = p
            self._pin("do-nothing agent", p.pid, agent_cpus)
        if "floor" in self.kinds:
            p = FloorSpoa(build_floor(self.workdir / "floor-bin"), self.workdir / "floor")
            p.die_with_parent = True
            p.start()
            self.procs["floor"] = p
            self._pin("C floor", p.pid, agent_cpus)

    def address(self, kind: str) -> tuple[str, int]:
        p = self.procs[kind]
        port = p.spop_port if isinstance(p, devstack.AgentProcess) else p.port  # type: ignore[attr-defined]
        return "127.0.0.1", int(port)

    def pid(self, kind: str) -> int | None:
        return self.procs[kind].pid

    @property
    def redis_pid(self) -> int | None:
        return self.stack.redis.pid if self.stack and self.stack.redis else None

    def warnings(self) -> list[str]:
        agent = self.procs.get("real")
        if agent is None:
            return []
        return [ln for ln in agent.log_text().splitlines() if " WARNING " in ln or " ERROR " in ln]

    def dead(self) -> list[str]:
        return [k for k, p in self.procs.items() if p.proc is not None and p.proc.poll() is not None]

    def close(self) -> None:
        for k in ("floor", "null"):
            if k in self.procs:
                self.procs[k].stop(5)
        if self.stack is not None:
            self.stack.close()


# --------------------------------------------------------------------------- report


def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def med(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.{digits}f}"


def mix_text(mix: Counter) -> str:
    total = sum(mix.values()) or 1
    hows: Counter = Counter()
    nodes: Counter = Counter()
    for (node, how), n in mix.items():
        hows[how] += n
        nodes[node] += n
    h = ", ".join(f"{k} {v / total:.1%}" for k, v in hows.most_common())
    nd = ", ".join(f"{k or '-'} {v / total:.0%}" for k, v in sorted(nodes.items(), key=lambda kv: str(kv[0])))
    return f"how: {h}; node: {nd}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def phase_line(p: Phase, agent_cpu: int | None, other: list[int]) -> str:
    busy = f"agent process {fmt(p.agent_pct, 0)}%, " + " ".join(
        f"cpu{c} {v:.0f}%" for c, v in sorted(p.cpu_busy_pct.items()))
    lat = f"p50 {pct(p.latencies, 50) * 1e3:.2f} ms p99 {pct(p.latencies, 99) * 1e3:.2f} ms"
    extra = f" unanswered {p.unanswered}" if p.unanswered else ""
    if p.loop == "open":
        extra += f" sends beyond window {p.over_window}"
    return (f"[{p.kind} rep {p.repeat + 1}] {p.loop:<6} {p.rate:9,.0f}/s  {lat}  agent "
            f"{fmt(p.per_decision_us(p.agent_cpu), 1)} us/dec  redis {fmt(p.per_decision_us(p.redis_cpu), 1)}  "
            f"generator {fmt(p.per_decision_us(p.gen_cpu), 1)}  {busy}{extra}")


def report(phases: list[Phase], args: argparse.Namespace, mix: Mix, placed: Counter | None, agents: Agents,
           load_before: str, load_after: str, kinds: list[str]) -> str:
    out: list[str] = []
    out.append("## spop_load: the agent alone (HAProxy-shaped SPOP load)\n")
    out.append(f"- command: `{shlex.join(sys.orig_argv)}` (cwd {os.getcwd()})")
    out.append(f"- machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}; "
               f"{gcc_version()}; {redis_version()}")
    out.append(f"- agent code: {agent_code()}")
    out.append(f"- load average before: {load_before}; after: {load_after}")
    out.append(f"- load: {mix.describe()}; {args.connections} connections x {args.window} NOTIFYs in flight "
               f"(closed loop, {args.seconds:g} s after 0.5 s of warm-up), open loop {args.rate:,.0f}/s for "
               f"{args.seconds:g} s; {args.repeat} repeat(s), medians shown")
    if agents.agent_cpu is not None:
        out.append(f"- CPUs: agent under test alone on cpu{agents.agent_cpu}; generator, Redis and brokers on "
                   f"cpu{','.join(map(str, agents.other_cpus))}. " + "; ".join(agents.pinning))
    else:
        out.append("- CPUs: one CPU only: nothing pinned, the generator shares the agent's CPU")
    if "real" in kinds:
        cfg = {**BENCH_AGENT_OVERRIDES, **dict(args.agent_set)}
        out.append(f"- real agent config (devstack's, with): {json.dumps(cfg)}")
    if placed is not None:
        out.append(f"- warm-up placement of the {len(mix.pool):,} pool ids: {mix_text(placed)}")
    out.append("")
    out.append("| agent | decisions/s (closed loop) | x floor | p50 / p99 ms at saturation | agent CPU us/decision "
               "| Redis CPU us/dec | generator CPU us/dec | agent process / its CPU busy | generator's CPU busy "
               f"| at {args.rate:,.0f}/s: p50 / p90 / p99 / max ms | agent CPU us/dec at that rate |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    floor_rate = med([p.rate for p in phases if p.kind == "floor" and p.loop == "closed"])
    summary: dict[str, dict[str, float]] = {}
    for kind in kinds:
        cl = [p for p in phases if p.kind == kind and p.loop == "closed"]
        op = [p for p in phases if p.kind == kind and p.loop == "open"]
        rate = med([p.rate for p in cl])
        ac = agents.agent_cpu
        agent_busy = med([p.cpu_busy_pct.get(ac, math.nan) for p in cl]) if ac is not None else math.nan
        other_busy = med([med([p.cpu_busy_pct[c] for c in agents.other_cpus]) for p in cl]) if ac is not None \
            else math.nan
        agent_pct = med([p.agent_pct for p in cl])
        summary[kind] = {"rate": rate, "agent_busy": agent_busy, "other_busy": other_busy,
                         "agent_us": med([p.per_decision_us(p.agent_cpu) for p in cl])}
        def lat(phs: list[Phase], p: float) -> str:
            return fmt(med([pct(x.latencies, p) * 1e3 for x in phs]))

        def us(phs: list[Phase], what: str) -> str:
            return fmt(med([x.per_decision_us(getattr(x, what)) for x in phs]), 1)

        worst = fmt(med([max(x.latencies) * 1e3 if x.latencies else math.nan for x in op]))
        out.append(
            f"| {LABEL[kind]} | {rate:,.0f} | {fmt(rate / floor_rate) + 'x' if floor_rate > 0 else '-'} | "
            f"{lat(cl, 50)} / {lat(cl, 99)} | {us(cl, 'agent_cpu')} | {us(cl, 'redis_cpu')} | {us(cl, 'gen_cpu')} | "
            f"{fmt(agent_pct, 0)}% / {fmt(agent_busy, 0)}% | {fmt(other_busy, 0)}% | "
            f"{lat(op, 50)} / {lat(op, 90)} / {lat(op, 99)} / {worst} | "
            f"{us(op, 'agent_cpu')} |")
    out.append("\n(CPU per decision = CPU time of the process from /proc over the timed window / ACKs received in "
               "it; `agent process` = the agent's own CPU time over the window, % of one CPU; `busy` = share of a "
               "CPU in use during the closed loop, all processes (the agent's CPU busier than the agent process: "
               "something else ran there). Latency = NOTIFY "
               "written -> ACK read, in the generator. The open-loop row counts its CPU until every NOTIFY was "
               "answered. The C floor costs about a microsecond per decision: its closed-loop rate is the generator's "
               "ceiling on this machine, and an agent close to it was limited by the generator, not by itself.)\n")
    out.append("ACK mix (node, how) per agent, closed and open loop together, all repeats:\n")
    for kind in kinds:
        total: Counter = Counter()
        for p in phases:
            if p.kind == kind:
                total.update(p.mix)
        unanswered = sum(p.unanswered for p in phases if p.kind == kind)
        beyond = sum(p.over_window for p in phases if p.kind == kind)
        out.append(f"- {LABEL[kind]}: {mix_text(total)}; NOTIFYs never answered: {unanswered}; open-loop sends "
                   f"beyond the window: {beyond}")
    out.append(f"- ids sent: {mix.sent_new:,} never-seen, {mix.sent_pool:,} from the pool "
               f"({mix.sent_new / max(1, mix.sent_new + mix.sent_pool):.1%} new)")
    for kind in kinds:
        s = summary[kind]
        if s["rate"] < args.rate * 1.1:
            out.append(f"- NOTE {kind}: the open-loop rate ({args.rate:,.0f}/s) is not well below its closed-loop "
                       f"capacity ({s['rate']:,.0f}/s): its open-loop latencies are those of an overloaded agent "
                       "(queueing), not of the agent at that load")
        if not math.isnan(s["other_busy"]) and s["other_busy"] >= 90 and s["agent_busy"] < 90:
            out.append(f"- WARNING {kind}: the generator's CPU was {s['other_busy']:.0f}% busy and the agent's only "
                       f"{s['agent_busy']:.0f}%: the generator side limited this run; the agent's rate is a lower "
                       "bound")
    if "real" in kinds:
        s = summary["real"]
        cond = mix.persistent and abs(args.new_share - 0.5) < 1e-9 and agents.agent_cpu is not None
        verdict = "yes" if s["rate"] >= TARGET_RATE else "NO"
        out.append(f"- target (issue 12): real agent >= {TARGET_RATE:,} decisions/s alone on one core, persistent "
                   f"sessions, 50% never-seen ids: {s['rate']:,.0f}/s -> {verdict}"
                   + ("" if cond else " (NOT the target's conditions: see the load line)"))
        warns = agents.warnings()
        out.append(f"- real agent warnings/errors: {len(warns)}" + (f", e.g. {warns[0][-200:]}" if warns else ""))
    return "\n".join(out)


def redis_version() -> str:
    try:
        return subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                              timeout=5).stdout.split(" sha=")[0].strip()
    except (OSError, subprocess.SubprocessError):
        return "redis ?"


def agent_code() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--short", "--", "agent"], capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    files = [ln[3:] for ln in dirty if ln.strip()]
    return f"git {head[:90]}" + (f"; uncommitted: {', '.join(files)}" if files else "; clean")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="floor,null,real",
                    help="which agents to measure, in order: floor,null,real (default all three)")
    ap.add_argument("--target", help="HOST:PORT of a running agent instead (nothing started, nothing pinned)")
    ap.add_argument("--target-pid", type=int, help="with --target: its pid, for its CPU per decision")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--window", type=int, default=20, help="NOTIFYs in flight per connection (HAProxy 3.x: 20)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per loop (default 5)")
    ap.add_argument("--rate", type=float, default=10000.0, help="open-loop NOTIFYs per second (default 10000)")
    ap.add_argument("--repeat", type=int, default=3, help="repeat each agent's two loops, medians (default 3)")
    ap.add_argument("--ids", type=int, default=10000, help="client ids placed in the warm-up (default 10000)")
    ap.add_argument("--new-share", type=float, default=0.5,
                    help="fraction of NOTIFYs with a never-seen client id (default 0.5)")
    ap.add_argument("--mqtt5", action="store_true", help="MQTT 5 CONNECTs (proto_ver 5)")
    ap.add_argument("--expiry", type=int, default=None,
                    help="with --mqtt5: Session Expiry Interval, s (default 3600; 0 = ends with the connection)")
    ap.add_argument("--clean", action="store_true",
                    help="Clean Session 1 (3.1.1) / no expiry (5): sessions that never write to Redis")
    ap.add_argument("--username", default=None, help="send this username (sets the username flag)")
    ap.add_argument("--agent-cpu", type=int, default=None,
                    help="the CPU for the agent under test (default: the first this process may use)")
    ap.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                    help="real agent: override a top-level key of its YAML (repeatable)")
    ap.add_argument("--json", type=Path, help="also write raw per-phase results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    args.kinds = [k.strip() for k in args.agents.split(",") if k.strip()]
    if args.target:
        args.kinds = ["target"]
    elif not args.kinds or any(k not in KINDS for k in args.kinds):
        ap.error(f"--agents takes a comma-separated subset of {','.join(KINDS)}")
    if not 0.0 <= args.new_share <= 1.0:
        ap.error("--new-share is a fraction in [0, 1]")
    if args.expiry is not None and not args.mqtt5:
        ap.error("--expiry goes with --mqtt5")
    if args.mqtt5 and args.expiry is None and not args.clean:
        args.expiry = 3600
    if args.ids < 1 or args.connections < 1 or args.window < 1 or args.repeat < 1:
        ap.error("--ids, --connections, --window and --repeat must be >= 1")
    try:
        args.agent_set = [tuple(kv.split("=", 1)) for kv in args.agent_set]
    except ValueError:
        ap.error("--agent-set takes KEY=VALUE")
    if any(len(kv) != 2 or not kv[0] for kv in args.agent_set):
        ap.error("--agent-set takes KEY=VALUE")
    return args


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    mix = Mix(ids=args.ids, new_share=args.new_share, mqtt5=args.mqtt5, expiry=args.expiry, clean=args.clean,
              username=args.username.encode() if args.username else None)
    cpus = sorted(os.sched_getaffinity(0))
    agent_cpu: int | None = None
    other: list[int] = []
    if len(cpus) > 1 and not args.target:
        agent_cpu = args.agent_cpu if args.agent_cpu is not None else cpus[0]
        other = [c for c in cpus if c != agent_cpu]
        os.sched_setaffinity(0, set(other))  # the generator
    workdir = Path(tempfile.mkdtemp(prefix="spop-load-"))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.monotonic()
    agents = Agents([k for k in args.kinds if k != "target"], workdir, agent_cpu, other, args.agent_set)
    phases: list[Phase] = []
    placed: Counter | None = None
    ok = False
    try:
        log(f"starting {', '.join(args.kinds)} in {workdir}")
        agents.start()
        addr = {k: agents.address(k) for k in args.kinds if k != "target"}
        if args.target:
            host, _, port_s = args.target.rpartition(":")
            addr["target"] = (host, int(port_s))
        pids = {k: (args.target_pid if k == "target" else agents.pid(k)) for k in args.kinds}
        # Only the agents that keep state need the pool placed; the others answer "hit" anyway.
        for k in args.kinds:
            if k in ("real", "target"):
                placed = asyncio.run(place(*addr[k], mix, args.connections, args.window))
                log(f"warm-up: placed {len(mix.pool):,} ids through {k}: {mix_text(placed)}")
        for rep in range(args.repeat):
            order = args.kinds[rep % len(args.kinds):] + args.kinds[:rep % len(args.kinds)]
            for k in order:
                probe = Probe(pids[k], agents.redis_pid, ([agent_cpu] if agent_cpu is not None else []) + other)
                time.sleep(0.3)
                cl = asyncio.run(closed_loop(*addr[k], mix, args.connections, args.window, args.seconds, probe,
                                             k, rep))
                log(phase_line(cl, agent_cpu, other))
                time.sleep(0.3)
                op = asyncio.run(open_loop(*addr[k], mix, args.connections, args.window, args.rate, args.seconds,
                                           probe, k, rep))
                log(phase_line(op, agent_cpu, other))
                phases += [cl, op]
                dead = agents.dead()
                if dead:
                    raise RuntimeError(f"exited during the run: {', '.join(dead)}")
        ok = True
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        agents.close()
        floor_counters = agents.procs["floor"].counters() if "floor" in agents.procs else None  # type: ignore[attr-defined]
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if floor_counters is not None:
        log(f"C floor's own counters at exit: {floor_counters}")
    print(report(phases, args, mix, placed, agents, load_before, load_after, args.kinds))
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps([
            {"agent": p.kind, "loop": p.loop, "repeat": p.repeat, "decisions": p.decisions, "seconds": p.seconds,
             "rate": p.rate, "p50_ms": pct(p.latencies, 50) * 1e3, "p99_ms": pct(p.latencies, 99) * 1e3,
             "agent_cpu_s": p.agent_cpu, "redis_cpu_s": p.redis_cpu, "generator_cpu_s": p.gen_cpu,
             "cpu_busy_pct": p.cpu_busy_pct, "unanswered": p.unanswered, "sent": p.sent,
             "mix": {f"{n}/{h}": c for (n, h), c in p.mix.items()}}
            for p in phases
        ], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
