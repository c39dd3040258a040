"""MQTT CONNECT -> CONNACK storm through HAProxy, four paths in one run: the native stick table,
SPOE + the C floor agent, SPOE + a do-nothing agent on our SPOP server, SPOE + the real agent.

One run per HAProxy version starts its own stack on 127.0.0.1 (free ports, devstack):
redis-server, three mosquitto brokers, the real agent (`mqtt-affinity run`, log level info,
the product's default background intervals), the C floor (bench/floor_spoa.c, built with gcc
-O2 into the work directory), the do-nothing agent (bench/null_agent.py), and four HAProxy of
the same version side by side, sharing the brokers:

  * native: haproxy/native-stick.cfg (`stick on mqtt_field_value(connect,client_identifier)`), no agent;
  * floor:  haproxy/haproxy.cfg, SPOE -> the C floor: `hit` and a node by a hash of the client id, no Redis;
  * null:   haproxy/haproxy.cfg, SPOE -> SpopServer + a dispatcher giving the same answer, no Redis;
  * agent:  haproxy/haproxy.cfg, SPOE -> the real agent -> Redis, `use-server` its answer.
Every agent address HAProxy is given (SPOA_ADDR, SPOA2_ADDR...) points at the path's one agent.
The floor and the do-nothing agent spread the clients over the brokers like the other paths do
(`--spoa-nodes fixed`: node2 for everyone, which makes that one broker cheaper per connect).

floor - native is what any SPOE agent costs at best; null - floor is the price of Python,
asyncio and our codec; agent - null is the decision (CONNECT fields, Redis round trip).

Clients are raw asyncio sockets: CONNECT (MQTT 3.1.1, Clean Session 0: persistent sessions, so
the agent reads and writes the Redis record every time), wait for CONNACK, DISCONNECT, close.
Client ids come from a pool (default 500), split between the concurrent workers so two
connections never carry the same id at once. A warm-up connects every id twice through each
path (first placement at c=20, then a hit at the highest concurrency measured, so connection
pools have grown), so the measured steps are steady state. `--new-share F` makes that fraction
of the measured CONNECTs use a client id never seen before (agent path: `assigned`, a new
Redis record; native path: a new stick-table entry).

Steps run per concurrency level, the four paths back to back in an order that rotates, repeated
`--repeat` times; the report gives medians, and ratios per repeat (to native and to the floor)
then their median. The machine may be shared: each step also measures the CPU used outside the
stack (/proc/stat minus the stack's processes), and repeats where that exceeds `--noisy-pct`
are left out of the medians (the report says how many were used). Latency is CONNECT sent ->
CONNACK received, as the client sees it. CPU per CONNECT is from /proc, per process.

While measuring it checks the HAProxy logs: every SPOE-path connection must show err=-, a `how`
its agent gives (real agent: hit|assigned; floor and null: hit) and the server the agent named;
every client id must stay on one broker (every path); at the end the Redis record of every id
must name the broker its connections went to (agent path).

    .venv/bin/python bench/connect_storm.py                      # HAProxy 3.2, c=1 and c=50
    .venv/bin/python bench/connect_storm.py --haproxy both --repeat 3
    .venv/bin/python bench/connect_storm.py --paths native,agent --concurrency 1,10,50 --ids 1000
    .venv/bin/python bench/connect_storm.py --new-share 0.5      # half of the CONNECTs are new ids

Prints markdown tables (paste-ready): per path connects/s, p50, p99, errors; the ratios to
native and to the floor; the targets of issue 12 (agent throughput at c=50 >= 0.95x native, p50
at c=1 <= 1.5x native, agent CPU per CONNECT at c=50 <= 100 us); CPU per CONNECT per process;
the correctness checks; the machine and the exact command.
"""

from __future__ import annotations

import argparse
import asyncio
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
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from spoas import (  # noqa: E402
    BENCH_AGENT_OVERRIDES,
    FIXED_NODE,
    FloorSpoa,
    NullAgent,
    build_floor,
    gcc_version,
    machine_busy,
    proc_cpu,
    self_cpu,
)

import devstack  # noqa: E402
from devstack import (  # noqa: E402
    DISCONNECT,
    HAPROXY_CFG,
    NATIVE_STICK_CFG,
    NODES,
    AgentProcess,
    HAProxy,
    ManagedProcess,
    connect_packet,
    haproxy_binary,
    parse_log_line,
)

NATIVE, FLOOR, NULL, AGENT = "native", "floor", "null", "agent"
PATHS = (NATIVE, FLOOR, NULL, AGENT)
PATH_LABEL = {
    NATIVE: "native stick table",
    FLOOR: "SPOE + C floor",
    NULL: "SPOE + do-nothing agent",
    AGENT: "SPOE + agent + Redis",
}
#: The `how` each SPOE path's agent answers when all is well.
GOOD_HOW = {FLOOR: {"hit"}, NULL: {"hit"}, AGENT: {"hit", "assigned"}}
#: The process that answers SPOE on each path (a key of Stack.cpu()).
SPOA_OF = {FLOOR: "floor", NULL: "null", AGENT: "agent"}
# Issue 12 targets, through HAProxy 2.6 and 3.2.
TARGET_THROUGHPUT = (50, 0.95)  # at c=50: agent connects/s >= 0.95x native
TARGET_P50 = (1, 1.5)  # at c=1: agent p50 <= 1.5x native
TARGET_AGENT_CPU = (50, 100.0)  # at c=50: the agent's CPU per CONNECT <= 100 us
AGENT_CODE = "?"


# --------------------------------------------------------------------------- load


class ConnackError(Exception):
    """The broker path answered, but not with a successful CONNACK."""


async def connect_once(loop: asyncio.AbstractEventLoop, port: int, packet: bytes, timeout: float) -> float:
    """One CONNECT -> CONNACK -> DISCONNECT -> close; returns CONNECT->CONNACK seconds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            t0 = time.perf_counter()
            await loop.sock_sendall(sock, packet)
            head = b""
            while len(head) < 4:  # CONNACK for 3.1.1 is exactly 20 02 <flags> <rc>
                chunk = await loop.sock_recv(sock, 4 - len(head))
                if not chunk:
                    raise ConnackError("closed before CONNACK")
                head += chunk
            t1 = time.perf_counter()
        if head[0] != 0x20 or head[1] != 0x02:
            raise ConnackError(f"not a CONNACK: {head.hex()}")
        if head[3] != 0:
            raise ConnackError(f"CONNACK return code {head[3]}")
        try:
            sock.send(DISCONNECT)  # 2 bytes into an empty send buffer: never blocks
        except OSError:
            pass
        return t1 - t0
    finally:
        sock.close()


@dataclass
class LoadResult:
    ok: int
    errors: Counter
    elapsed: float
    latencies: list[float]
    new_ids: int = 0

    @property
    def attempted(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0


class NewIds:
    """Client ids never seen before, unique over the whole run (a per-run nonce and a counter)."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(3)
        self.n = 0

    def packet(self) -> bytes:
        self.n += 1
        # Same length as the pool's "storm-%05d" would not fit a counter; length matters little.
        return connect_packet(b"new-%s-%07d" % (self.nonce.encode(), self.n), version=4, clean=False, keepalive=30)


async def storm(
    port: int, packets: list[bytes], concurrency: int, count: int | None, duration: float | None, timeout: float,
    *, once: bool = False, new_share: float = 0.0, new_ids: NewIds | None = None,
) -> LoadResult:
    """`concurrency` closed-loop workers; worker w cycles over packets[w::concurrency].

    Stops after `count` connects in total (shared: fast workers do more) or after `duration`
    seconds; with `once`, every worker goes through its own packets exactly once (warm-up:
    every id connects exactly once, whatever the workers' speeds). With `new_share`, that
    fraction of each worker's connects (exactly, by an accumulator) use a never-seen id."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: Counter = Counter()
    left = [count if count is not None else 0]
    fresh = [0]
    start = time.perf_counter()
    deadline = start + duration if duration else None

    async def worker(w: int) -> None:
        mine = packets[w::concurrency]
        k = 0
        acc = 0.0
        while True:
            if once:
                if k >= len(mine):
                    return
            elif deadline is not None:
                if time.perf_counter() >= deadline:
                    return
            else:
                if left[0] <= 0:
                    return
                left[0] -= 1
            acc += new_share
            if acc >= 1.0 and new_ids is not None:
                acc -= 1.0
                packet = new_ids.packet()
                fresh[0] += 1
            else:
                packet = mine[k % len(mine)]
                k += 1
            try:
                latencies.append(await connect_once(loop, port, packet, timeout))
            except (OSError, ConnackError, TimeoutError) as exc:
                errors[type(exc).__name__ + (f": {exc}" if isinstance(exc, ConnackError) else "")] += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return LoadResult(len(latencies), errors, time.perf_counter() - start, latencies, fresh[0])


def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# --------------------------------------------------------------------------- observation


class LogTail:
    """New HAProxy traffic lines since the last call (reads the log file from an offset)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        return [d for d in (parse_log_line(ln.decode(errors="replace")) for ln in lines) if d]


def scrape_agent(port: int) -> dict[str, float]:
    """Decision counters and the decision-time histogram sum/count from the agent's /metrics."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith(("mqtt_affinity_decision_seconds_sum", "mqtt_affinity_decision_seconds_count",
                            "mqtt_affinity_redis_seconds_sum", "mqtt_affinity_redis_seconds_count",
                            "mqtt_affinity_decisions_total")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@dataclass
class Verdict:
    """What the HAProxy log says about one batch of connections."""

    logged: int = 0
    good: int = 0  # SPOE paths: how as its agent answers, err "-", went to the node named; native: a real server
    how: Counter = field(default_factory=Counter)
    err: Counter = field(default_factory=Counter)
    termination: Counter = field(default_factory=Counter)
    wrong_server: int = 0  # agent named node X, connection went to Y (redispatch) or <NOSRV>
    dropped: int = 0  # lines HAProxy itself counted as not written (show info: DroppedLogs)
    ptime_ms: list[int] = field(default_factory=list)

    def add(self, other: Verdict) -> None:
        self.logged += other.logged
        self.good += other.good
        self.how.update(other.how)
        self.err.update(other.err)
        self.termination.update(other.termination)
        self.wrong_server += other.wrong_server
        self.dropped += other.dropped
        self.ptime_ms.extend(other.ptime_ms)


def judge(path: str, lines: list[dict[str, str]], owners: dict[str, set[str]], dropped: int = 0) -> Verdict:
    v = Verdict(dropped=dropped)
    for d in lines:
        v.logged += 1
        v.how[d["how"]] += 1
        v.err[d["err"]] += 1
        v.termination[d["termination"]] += 1
        server = d["server"]
        owners.setdefault(d["cid"], set()).add(server)
        if d["ptime"].lstrip("-").isdigit():
            v.ptime_ms.append(int(d["ptime"]))
        if path == NATIVE:
            if server in NODES:
                v.good += 1
            else:
                v.wrong_server += 1
        elif d["node"] != server:
            v.wrong_server += 1
        elif d["how"] in GOOD_HOW[path] and d["err"] == "-":
            v.good += 1
    return v


# --------------------------------------------------------------------------- the stack


class Stack:
    """Redis, three brokers, the three agents and four HAProxy (one per path), one version.

    A devstack Stack with the real agent and four balancers "storm-<path>"; the C floor and
    the do-nothing agent are started here and stopped after the stack."""

    def __init__(self, version: str, workdir: Path, paths: list[str], agent_set: list[tuple[str, str]] = (),
                 spoa_nodes: str = "spread") -> None:
        self.version = version
        # What the floor and the do-nothing agent answer: one node, or a hash of the client id.
        self.spoa_node = FIXED_NODE if spoa_nodes == "fixed" else ",".join(NODES)
        self.workdir = workdir
        self.paths = paths
        self.stack = devstack.Stack(version, workdir=workdir, die_with_parent=True,
                                    agent_overrides={**BENCH_AGENT_OVERRIDES, **dict(agent_set)})
        self.agent: AgentProcess | None = None
        self.spoas: dict[str, ManagedProcess] = {}  # FLOOR/NULL -> process
        self.haproxy: dict[str, HAProxy] = {}
        self.ports: dict[str, int] = {}
        self.metrics_port = 0

    def start(self) -> None:
        s = self.stack
        s.start_redis()
        s.start_brokers()
        self.agent = s.start_agent("storm")  # always: the Redis check and its warnings need it
        self.metrics_port = self.agent.metrics_port or 0
        if FLOOR in self.paths:
            self.spoas[FLOOR] = FloorSpoa(build_floor(self.workdir / "floor-bin"), self.workdir / "floor",
                                          node=self.spoa_node)
        if NULL in self.paths:
            self.spoas[NULL] = NullAgent(self.workdir / "null", node=self.spoa_node)
        for proc in self.spoas.values():
            proc.die_with_parent = True
            proc.start()
        for path in self.paths:
            if path == NATIVE:
                bal = s.start_balancer(f"storm-{path}", agents=[], cfg_path=NATIVE_STICK_CFG)
            else:
                spoa = self.agent if path == AGENT else self.spoas[path]
                # Every agent slot of haproxy.cfg (SPOA_ADDR, SPOA2_ADDR: a peer agent as backup) -> this one.
                bal = s.start_balancer(f"storm-{path}", agents=[spoa, spoa], cfg_path=HAPROXY_CFG)  # type: ignore[list-item]
            self.haproxy[path] = bal.haproxy
            self.ports[path] = bal.port
        s.wait_ready(timeout=15)
        for node in NODES:  # the agent's own probes: until then it would place nobody
            s.wait_agents_see(node, up=True, timeout=20)

    def cpu(self) -> dict[str, float]:
        """Cumulative CPU seconds per component."""
        redis = self.stack.redis
        out = {
            "client": self_cpu(),
            "agent": proc_cpu(self.agent.pid if self.agent else None),
            "floor": proc_cpu(self.spoas[FLOOR].pid) if FLOOR in self.spoas else 0.0,
            "null": proc_cpu(self.spoas[NULL].pid) if NULL in self.spoas else 0.0,
            "redis": proc_cpu(redis.pid if redis else None),
            "brokers": sum(proc_cpu(b.pid) for b in self.stack.brokers),
            "machine": machine_busy(),
        }
        for path, ha in self.haproxy.items():
            out[f"haproxy-{path}"] = proc_cpu(ha.pid)
        return out

    def dropped_logs(self, path: str) -> int:
        """HAProxy's own count of log lines it could not write (it drops rather than block)."""
        return int(self.haproxy[path].info().get("DroppedLogs", 0))

    def redis_owners(self, cids: list[bytes]) -> dict[str, str | None]:
        return self.stack.owners(cids)

    def dead(self) -> list[str]:
        """Names of the stack's processes that have exited."""
        return self.stack.exited() + [p.name for p in self.spoas.values()
                                      if p.proc is not None and p.proc.poll() is not None]

    def stop(self) -> None:
        self.stack.close()  # HAProxy first, then the agent, brokers, Redis
        for proc in self.spoas.values():
            proc.stop(5)

    def floor_counters(self) -> dict[str, int]:
        floor = self.spoas.get(FLOOR)
        return floor.counters() if isinstance(floor, FloorSpoa) else {}


# --------------------------------------------------------------------------- one version


@dataclass
class Step:
    version: str
    repeat: int
    concurrency: int
    path: str
    load: LoadResult
    verdict: Verdict
    cpu: dict[str, float]  # CPU seconds spent during the step, per component
    decisions: dict[str, float]  # delta of the agent's counters during the step

    @property
    def other_cpu(self) -> float:
        """Busy CPU seconds not spent by the stack's processes: other tenants, plus kernel work
        (softirq) not charged to any process."""
        own = sum(v for k, v in self.cpu.items() if k != "machine")
        return max(0.0, self.cpu["machine"] - own)

    @property
    def other_share_pct(self) -> float:
        return self.other_cpu / self.load.elapsed / (os.cpu_count() or 1) * 100 if self.load.elapsed else 0.0

    @property
    def p50_ms(self) -> float:
        return pct(self.load.latencies, 50) * 1e3

    @property
    def p99_ms(self) -> float:
        return pct(self.load.latencies, 99) * 1e3

    def cpu_us(self, component: str) -> float:
        """CPU of one component per successful connect, us ("haproxy" = this path's HAProxy,
        "spoa" = this path's agent, 0 on the native path)."""
        if component == "haproxy":
            cpu = self.cpu[f"haproxy-{self.path}"]
        elif component == "spoa":
            cpu = self.cpu[SPOA_OF[self.path]] if self.path in SPOA_OF else 0.0
        else:
            cpu = self.cpu[component]
        return cpu / max(1, self.load.ok) * 1e6


@dataclass
class VersionRun:
    version: str
    banner: str
    paths: list[str]
    steps: list[Step] = field(default_factory=list)
    warmup: dict[str, Verdict] = field(default_factory=dict)
    warmup_errors: dict[str, Counter] = field(default_factory=dict)
    owners: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    redis_mismatch: int = 0
    redis_missing: int = 0
    unplaced_after_warmup: int = 0
    agent_warnings: Counter = field(default_factory=Counter)
    floor_counters: dict[str, int] = field(default_factory=dict)
    idle_ms_per_s: dict[str, float] = field(default_factory=dict)  # background CPU with no load, per process


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def collect(stack: Stack, path: str, tail: LogTail, expected: int, dropped_before: int,
            timeout: float = 5.0) -> tuple[list[dict[str, str]], int]:
    """HAProxy logs a connection when it ends: wait until every one of the `expected`
    connections is either logged or counted in DroppedLogs (HAProxy drops a line rather
    than block on its log fd), but not forever. Returns (lines, dropped during the batch)."""
    lines: list[dict[str, str]] = []
    now = time.monotonic()
    deadline, quiet_since = now + timeout, now
    while True:
        new = tail.read()
        now = time.monotonic()
        if new:
            lines.extend(new)
            quiet_since = now
        if len(lines) >= expected or now >= deadline:
            break
        # DroppedLogs also counts SPOE lines: only trust it once the log has been quiet a while.
        if len(lines) + stack.dropped_logs(path) - dropped_before >= expected and now - quiet_since >= 0.3:
            break
        time.sleep(0.05)
    return lines, stack.dropped_logs(path) - dropped_before


def rotated(paths: list[str], k: int) -> list[str]:
    k %= len(paths)
    return paths[k:] + paths[:k]


def run_version(version: str, args: argparse.Namespace, workdir: Path) -> VersionRun:
    banner = subprocess.run([haproxy_binary(version), "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    paths: list[str] = args.paths
    run = VersionRun(version, banner, paths)
    cids = [b"storm-%05d" % i for i in range(args.ids)]
    packets = [connect_packet(c, version=4, clean=False, keepalive=30) for c in cids]
    new_ids = NewIds()
    stack = Stack(version, workdir / f"haproxy-{version}", paths, args.agent_set, args.spoa_nodes)
    try:
        log(f"[{version}] starting redis, 3 mosquitto, the agents, {len(paths)} HAProxy in {stack.workdir}")
        stack.start()
        tails = {p: LogTail(stack.haproxy[p].log_path) for p in paths}
        for p in paths:
            tails[p].read()  # skip start-up lines
            run.owners[p] = {}
            run.warmup[p] = Verdict()
            run.warmup_errors[p] = Counter()

        # Warm-up: pass 1 places every id, pass 2 is all hits; then the steps see steady state.
        for p in paths:
            # Pass 2 at the highest concurrency measured: connection pools (HAProxy's SPOE connections,
            # the agent's Redis connections) grow to their steady-state size before anything is timed.
            for conc in (min(20, args.ids), max(args.concurrency)):
                dropped0 = stack.dropped_logs(p)
                res = asyncio.run(storm(stack.ports[p], packets, conc, None, None, args.timeout, once=True))
                run.warmup_errors[p].update(res.errors)
                lines, dropped = collect(stack, p, tails[p], res.attempted, dropped0)
                run.warmup[p].add(judge(p, lines, run.owners[p], dropped))
        # Steady state means every id has its record. A Redis hiccup during the warm-up (breaker
        # open -> `fallback`, no record written) would leave some unplaced: connect those again.
        if AGENT in paths:
            for _ in range(5):
                unplaced = [c for c, node in stack.redis_owners(cids).items() if node is None]
                run.unplaced_after_warmup = len(unplaced)
                if not unplaced:
                    break
                time.sleep(1.0)  # let the breaker's probe close it
                idx = {c.decode(): i for i, c in enumerate(cids)}
                extra = [packets[idx[c]] for c in unplaced]
                dropped0 = stack.dropped_logs(AGENT)
                res = asyncio.run(storm(stack.ports[AGENT], extra, 1, None, None, args.timeout, once=True))
                run.warmup_errors[AGENT].update(res.errors)
                lines, dropped = collect(stack, AGENT, tails[AGENT], res.attempted, dropped0)
                run.warmup[AGENT].add(judge(AGENT, lines, run.owners[AGENT], dropped))
            if run.unplaced_after_warmup:
                log(f"[{version}] WARNING: {run.unplaced_after_warmup} ids still have no Redis record after the "
                    "warm-up")
        log(f"[{version}] warm-up: " + "; ".join(
            f"{p} how={dict(run.warmup[p].how)} err={dict(run.warmup[p].err)} "
            f"{run.warmup[p].good}/{run.warmup[p].logged} good" for p in paths))

        # Background CPU with no load (health checks, the agent's state refresh, Redis's cron):
        # part of every step's figures, shown apart so a per-CONNECT number can be read.
        time.sleep(0.5)
        c0, t0 = stack.cpu(), time.perf_counter()
        time.sleep(2.0)
        c1, t1 = stack.cpu(), time.perf_counter()
        run.idle_ms_per_s = {k: (c1[k] - c0[k]) / (t1 - t0) * 1e3 for k in c0 if k not in ("client", "machine")}

        for rep in range(args.repeat):
            for ci, (conc, count) in enumerate(zip(args.concurrency, args.connects)):
                for p in rotated(paths, rep + ci):
                    time.sleep(args.pause)
                    dropped0 = stack.dropped_logs(p)
                    before_cpu, before_m = stack.cpu(), scrape_agent(stack.metrics_port)
                    res = asyncio.run(storm(stack.ports[p], packets, conc, None if args.duration else count,
                                            args.duration, args.timeout, new_share=args.new_share, new_ids=new_ids))
                    after_cpu, after_m = stack.cpu(), scrape_agent(stack.metrics_port)
                    lines, dropped = collect(stack, p, tails[p], res.attempted, dropped0)
                    verdict = judge(p, lines, run.owners[p], dropped)
                    step = Step(version, rep, conc, p, res, verdict,
                                {k: after_cpu[k] - before_cpu[k] for k in after_cpu},
                                {k: after_m.get(k, 0.0) - before_m.get(k, 0.0) for k in after_m})
                    run.steps.append(step)
                    errs = sum(res.errors.values())
                    spoa = f"  {SPOA_OF[p]} {step.cpu_us('spoa'):.0f} us/conn" if p in SPOA_OF else ""
                    log(f"[{version}] rep {rep + 1}/{args.repeat} c={conc:<3} {p:<6} {res.rate:8.0f}/s  "
                        f"p50 {step.p50_ms:6.2f} ms  p99 {step.p99_ms:6.2f} ms  errors {errs}  "
                        f"log ok {verdict.good}/{verdict.logged} (+{dropped} dropped){spoa}  "
                        f"load {os.getloadavg()[0]:.2f}  not-stack CPU {step.other_share_pct:.0f}%")
            dead = stack.dead()
            if dead:
                raise RuntimeError(f"process(es) exited during the run: {', '.join(dead)}")

        if AGENT in paths:
            owners = stack.redis_owners([c.encode() for c in run.owners[AGENT]])
            for cid, servers in run.owners[AGENT].items():
                rec = owners.get(cid)
                if rec is None:
                    run.redis_missing += 1
                elif servers != {rec}:
                    run.redis_mismatch += 1
    finally:
        stack.stop()
        run.floor_counters = stack.floor_counters()
        if stack.agent is not None:  # its warnings (Redis breaker, protocol errors) belong in the report
            for line in stack.agent.log_text().splitlines():
                if " WARNING " in line or " ERROR " in line:
                    # "<ts> WARNING <logger>: <message>": keep the message, the cause included
                    run.agent_warnings[line.split(": ", 1)[-1][:140]] += 1
    return run


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.{digits}f}"


def machine() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name, argv in (("redis", ["redis-server", "--version"]), ("mosquitto", ["mosquitto", "-h"])):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            versions[name] = (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            versions[name] = "?"
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "gcc": gcc_version(), **versions}


def agent_code() -> str:
    """Which agent code was measured: git HEAD, plus uncommitted changes under agent/."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--short", "--", "agent"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    files = [ln[3:] for ln in dirty if ln.strip()]
    return f"git {head[:100]}" + (f"; uncommitted: {', '.join(files)}" if files else "; clean")


def report(runs: list[VersionRun], args: argparse.Namespace, load_before: str, load_after: str) -> str:
    out: list[str] = []
    m = machine()
    paths: list[str] = args.paths
    out.append("## connect storm: native stick table, SPOE + C floor, SPOE + do-nothing agent, SPOE + agent\n")
    out.append(f"- command: `{shlex.join(sys.orig_argv)}` (cwd {os.getcwd()})")
    out.append(f"- machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}; "
               f"{m['redis']}; {m['mosquitto']}; {m['gcc']}")
    out.append(f"- agent code: {AGENT_CODE}")
    for r in runs:
        out.append(f"- HAProxy {r.version}: {r.banner}")
    out.append(f"- load average before: {load_before}; after: {load_after} (the run itself keeps both CPUs busy)")
    steps = [s for r in runs for s in r.steps]
    if steps:
        share = [s.other_share_pct for s in steps]
        out.append(f"- CPU not attributed to the stack during the steps (other processes + unattributed kernel "
                   f"work), share of all CPUs: median {med(share):.0f}%, max {max(share):.0f}%")
    per = f"{args.duration:g} s" if args.duration else "/".join(map(str, args.connects)) + " connects"
    new = (f"; {args.new_share:.0%} of the measured CONNECTs use a never-seen client id" if args.new_share
           else "; every measured CONNECT reuses a placed id (steady state)")
    out.append(f"- {args.ids} client ids placed in the warm-up (MQTT 3.1.1, Clean Session 0: persistent){new}; "
               f"concurrency {'/'.join(map(str, args.concurrency))}, {per} per step, {args.repeat} repeat(s), "
               "median shown; latency = CONNECT sent -> CONNACK received; everything (clients included) on this "
               "machine, nothing pinned")
    answer = (f"node={FIXED_NODE} how=hit to every CONNECT (one broker gets all their connections)"
              if args.spoa_nodes == "fixed" else
              "how=hit and a node picked by a hash of the client id (the clients spread over the three brokers)")
    out.append(f"- SPOE paths: haproxy/haproxy.cfg + spoe-mqtt.conf; every agent address points at the path's "
               f"agent. C floor and do-nothing agent answer {answer}. Real agent config (devstack's, with): "
               f"{json.dumps({**BENCH_AGENT_OVERRIDES, **dict(args.agent_set)})}")
    out.append("")

    # A repeat is kept for the medians only if none of its steps (one per path) saw more than
    # --noisy-pct of the machine's CPU go elsewhere; if no repeat is that quiet, all are used.
    def kept(r: VersionRun, conc: int) -> tuple[set[int], bool]:
        reps = {s.repeat for s in r.steps if s.concurrency == conc}
        quiet = {x for x in reps if all(s.other_share_pct <= args.noisy_pct for s in r.steps
                                         if s.concurrency == conc and s.repeat == x)}
        return (quiet, True) if quiet else (reps, False)

    def used(r: VersionRun, conc: int, p: str) -> list[Step]:
        use, _ = kept(r, conc)
        return [s for s in r.steps if s.concurrency == conc and s.path == p and s.repeat in use]

    def ratio(r: VersionRun, conc: int, p: str, base: str, metric: Callable[[Step], float]) -> float:
        """Median over the kept repeats of metric(path)/metric(base), both from the same repeat."""
        by_rep = {s.repeat: s for s in used(r, conc, base)}
        vals = [metric(s) / metric(by_rep[s.repeat]) for s in used(r, conc, p)
                if s.repeat in by_rep and metric(by_rep[s.repeat])]
        return med(vals)

    def rate(s: Step) -> float:
        return s.load.rate

    def p50(s: Step) -> float:
        return s.p50_ms

    def p99(s: Step) -> float:
        return s.p99_ms

    out.append("| HAProxy | clients | path | connects/s | p50 ms | p99 ms | errors | repeats used |")
    out.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in runs:
        for conc in args.concurrency:
            use, quiet = kept(r, conc)
            total_reps = len({s.repeat for s in r.steps if s.concurrency == conc})
            note = f"{len(use)}/{total_reps}" + ("" if quiet else " (none quiet)")
            for p in paths:
                st = used(r, conc, p)
                errs = sum(sum(s.load.errors.values()) for s in r.steps if s.concurrency == conc and s.path == p)
                out.append(f"| {r.version} | {conc} | {PATH_LABEL[p]} | {med([s.load.rate for s in st]):,.0f} | "
                           f"{fmt(med([s.p50_ms for s in st]))} | {fmt(med([s.p99_ms for s in st]))} | {errs} | "
                           f"{note} |")
    out.append(f"\nErrors count every repeat; the other columns are medians over the repeats in which no step "
               f"saw more than {args.noisy_pct:g}% of the machine's CPU used outside the stack.")

    bases = [b for b in (NATIVE, FLOOR) if b in paths]
    if bases:
        out.append("\nRatios (median of the per-repeat ratios over the same repeats; each repeat runs every path back "
                   "to back). Throughput: higher is better; latency: lower is better.\n")
        cols = [f"{what} / {b}" for b in bases for what in ("connects/s", "p50", "p99")]
        out.append("| HAProxy | clients | path | " + " | ".join(cols) + " |")
        out.append("|---|---:|---|" + "---:|" * len(cols))
        for r in runs:
            for conc in args.concurrency:
                for p in paths:
                    if p == NATIVE:
                        continue
                    cells = []
                    for b in bases:
                        for metric in (rate, p50, p99):
                            cells.append("-" if p == b else fmt(ratio(r, conc, p, b, metric)) + "x")
                    out.append(f"| {r.version} | {conc} | {PATH_LABEL[p]} | " + " | ".join(cells) + " |")

    if AGENT in paths and NATIVE in paths:
        out.append("\nTargets of issue 12 (the real agent through this HAProxy):\n")
        (tc, tt), (pc, pt), (cc, ct) = TARGET_THROUGHPUT, TARGET_P50, TARGET_AGENT_CPU
        out.append(f"| HAProxy | connects/s at c={tc} >= {tt}x native | p50 at c={pc} <= {pt}x native "
                   f"(C floor: x native, for scale) | agent CPU per CONNECT at c={cc} <= {ct:.0f} us |")
        out.append("|---|---|---|---|")
        for r in runs:
            def verdict(ok: bool, value: str) -> str:
                return f"{value} {'yes' if ok else 'NO'}"

            if tc in args.concurrency:
                x = ratio(r, tc, AGENT, NATIVE, rate)
                thr = verdict(x >= tt, f"{fmt(x)}x")
            else:
                thr = f"not measured (no c={tc})"
            if pc in args.concurrency:
                x = ratio(r, pc, AGENT, NATIVE, p50)
                fl = f"; floor {fmt(ratio(r, pc, FLOOR, NATIVE, p50))}x" if FLOOR in paths else ""
                lat = verdict(x <= pt, f"{fmt(x)}x") + fl
            else:
                lat = f"not measured (no c={pc})"
            if cc in args.concurrency:
                us = med([s.cpu_us("spoa") for s in used(r, cc, AGENT)])
                cpu = verdict(us <= ct, f"{fmt(us, 0)} us")
            else:
                cpu = f"not measured (no c={cc})"
            out.append(f"| {r.version} | {thr} | {lat} | {cpu} |")

    out.append("\n### Correctness (HAProxy logs, Redis)\n")
    for r in runs:
        for p in paths:
            v = Verdict()
            for s in r.steps:
                if s.path == p:
                    v.add(s.verdict)
            sent = sum(s.load.attempted for s in r.steps if s.path == p)
            split = sum(1 for x in r.owners[p].values() if len(x) > 1)
            w = r.warmup[p]
            werr = dict(r.warmup_errors[p]) or "none"
            if p == NATIVE:
                out.append(f"- HAProxy {r.version}, {PATH_LABEL[p]}: {v.good}/{sent} measured connects routed to a "
                           f"broker ({v.logged} logged, DroppedLogs {v.dropped}; <NOSRV>/other: {v.wrong_server}); "
                           f"client ids on more than one broker: {split}; termination states {dict(v.termination)}; "
                           f"warm-up client errors {werr}")
                continue
            bad_how = {k: n for k, n in v.how.items() if k not in GOOD_HOW[p]}
            bad_err = {k: n for k, n in v.err.items() if k != "-"}
            out.append(f"- HAProxy {r.version}, {PATH_LABEL[p]}: {v.good}/{sent} measured connects logged with how "
                       f"in {{{', '.join(sorted(GOOD_HOW[p]))}}}, err `-` and the server the agent named "
                       f"({v.logged} logged, DroppedLogs {v.dropped}; how {dict(v.how)}); other how: "
                       f"{bad_how or 'none'}; SPOE errors: {bad_err or 'none'}; server != agent's node: "
                       f"{v.wrong_server}; client ids on more than one broker: {split}; termination states "
                       f"{dict(v.termination)}")
            out.append(f"  - warm-up: how {dict(w.how)}, err {dict(w.err)}, client errors {werr}")
            if p == AGENT:
                out.append(f"  - ids without a Redis record after the warm-up: {r.unplaced_after_warmup}; Redis "
                           f"record disagrees with the log: {r.redis_mismatch}, missing: {r.redis_missing} (of "
                           f"{len(r.owners[AGENT])} ids)")
                out.append(f"  - agent warnings/errors during the run: {dict(r.agent_warnings) or 'none'}")
            if p == FLOOR:
                out.append(f"  - the C floor's own counters at exit: {r.floor_counters or 'none printed'}")
        errs: Counter = Counter()
        for s in r.steps:
            errs.update(s.load.errors)
        if errs:
            out.append(f"- HAProxy {r.version} client-side errors: {dict(errs)}")
        if args.new_share:
            fresh = sum(s.load.new_ids for s in r.steps)
            out.append(f"- HAProxy {r.version}: {fresh:,} never-seen ids sent in the measured steps")

    out.append("\n### Where the time goes (medians over the kept repeats; CPU = process CPU time / successful "
               "connects, from /proc)\n")
    comps = ("client", "haproxy", "spoa", "redis", "brokers")
    names = {"client": "clients", "haproxy": "HAProxy", "spoa": "its agent", "redis": "Redis", "brokers": "brokers"}
    out.append("| HAProxy | clients | path | " + " | ".join(f"{names[c]} CPU us" for c in comps)
               + " | total CPU us | agent decision mean ms | agent Redis round trip mean ms | SPOE ptime p50/p99 ms |")
    out.append("|---|---:|---|" + "---:|" * (len(comps) + 4))
    for r in runs:
        for conc in args.concurrency:
            for p in paths:
                st = used(r, conc, p)
                cells = ["-" if c == "spoa" and p == NATIVE else fmt(med([s.cpu_us(c) for s in st]), 0)
                         for c in comps]
                total = fmt(med([sum(s.cpu_us(c) for c in comps) for s in st]), 0)
                dec = rtt = pt = "-"
                if p == AGENT:
                    def mean_ms(metric: str, steps: list[Step] = st) -> str:
                        means = []
                        for s in steps:
                            cnt = s.decisions.get(metric + "_count", 0.0)
                            if cnt:
                                means.append(s.decisions[metric + "_sum"] / cnt * 1e3)
                        return fmt(med(means), 3) if means else "n/a"
                    dec = mean_ms("mqtt_affinity_decision_seconds")
                    rtt = mean_ms("mqtt_affinity_redis_seconds")
                if p != NATIVE:
                    pts = [x for s in st for x in s.verdict.ptime_ms]
                    pt = f"{fmt(pct(pts, 50), 0)}/{fmt(pct(pts, 99), 0)}" if pts else "-"
                out.append(f"| {r.version} | {conc} | {PATH_LABEL[p]} | " + " | ".join(cells)
                           + f" | {total} | {dec} | {rtt} | {pt} |")
    for r in runs:
        idle = ", ".join(f"{k} {v:.1f}" for k, v in r.idle_ms_per_s.items())
        out.append(f"\nHAProxy {r.version}, background CPU with no load (2 s after the warm-up), ms per second: {idle}")
    out.append("\n(`its agent` is the process answering SPOE on that path: the C floor, the do-nothing agent or the "
               "real agent. The real agent and Redis run during every step, so their background work (health "
               "probes, state refresh) shows in every row; so do the other HAProxy's health checks, in no row. "
               "`agent decision mean` is the agent's own mqtt_affinity_decision_seconds: parse + Redis EVALSHA + "
               "event-loop wait; `Redis round trip` its mqtt_affinity_redis_seconds (n/a if the agent does not "
               "record it); SPOE ptime is HAProxy's view of the agent, whole milliseconds.)")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--haproxy", default="3.2", choices=("2.6", "3.2", "both"))
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated subset of {','.join(PATHS)} (default all four)")
    ap.add_argument("--concurrency", default="1,50", help="comma-separated concurrency levels (default 1,50)")
    ap.add_argument("--connects", default="2000,5000",
                    help="connects per step: one number, or one per concurrency level (default 2000,5000)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per step instead of --connects")
    ap.add_argument("--ids", type=int, default=500, help="client id pool size, all placed in the warm-up (default 500)")
    ap.add_argument("--new-share", type=float, default=0.0,
                    help="fraction of the measured CONNECTs that use a never-seen client id (default 0)")
    ap.add_argument("--spoa-nodes", choices=("spread", "fixed"), default="spread",
                    help="what the C floor and the do-nothing agent answer: a node picked by a hash of the client "
                         f"id (spread, default: the brokers share the load as on the other paths) or {FIXED_NODE} "
                         "for every CONNECT (fixed)")
    ap.add_argument("--repeat", type=int, default=3, help="repeat every step N times, report medians (default 3)")
    ap.add_argument("--noisy-pct", type=float, default=15.0,
                    help="leave a repeat out of the medians if more than this %% of the machine's CPU went to "
                         "processes outside the stack during it (default 15)")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-connect timeout, s (default 5)")
    ap.add_argument("--pause", type=float, default=0.3, help="idle time before each step, s (default 0.3)")
    ap.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a top-level key of the real agent's YAML, e.g. redis_pool_size=128 (repeatable)")
    ap.add_argument("--json", type=Path, help="also write raw per-step results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) even on success")
    args = ap.parse_args(argv)
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not args.paths or any(p not in PATHS for p in args.paths) or len(set(args.paths)) != len(args.paths):
        ap.error(f"--paths takes a comma-separated subset of {','.join(PATHS)}")
    args.paths = [p for p in PATHS if p in args.paths]  # report order
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    conns = [int(x) for x in args.connects.split(",") if x.strip()]
    if len(conns) == 1:
        conns *= len(args.concurrency)
    if len(conns) != len(args.concurrency):
        ap.error("--connects needs one number or one per --concurrency level")
    args.connects = conns
    try:
        args.agent_set = [tuple(kv.split("=", 1)) for kv in args.agent_set]
    except ValueError:
        ap.error("--agent-set takes KEY=VALUE")
    if any(len(kv) != 2 or not kv[0] for kv in args.agent_set):
        ap.error("--agent-set takes KEY=VALUE")
    if not args.concurrency or min(args.concurrency) < 1 or min(conns) < 1 or args.repeat < 1:
        ap.error("concurrency, connects and repeat must be >= 1")
    if max(args.concurrency) > args.ids:
        ap.error("--ids must be >= the highest concurrency (two workers must never share a client id)")
    if not 0.0 <= args.new_share <= 1.0:
        ap.error("--new-share is a fraction in [0, 1]")
    if args.duration is not None and not 0 < args.duration <= 60:
        ap.error("--duration must be in (0, 60] seconds")
    # The client closes first, so each connect leaves a TIME_WAIT socket towards one HAProxy port.
    # With net.ipv4.tcp_tw_reuse 1 (or 2, loopback only: the Linux default) connect() reuses them.
    try:
        tw_reuse = int(Path("/proc/sys/net/ipv4/tcp_tw_reuse").read_text())
    except (OSError, ValueError):
        tw_reuse = 0
    per_port = args.repeat * (sum(conns) if not args.duration else 0) + 2 * args.ids
    if tw_reuse == 0 and per_port > 25000:
        ap.error(f"{per_port} connects towards one HAProxy port would exhaust local ports (TIME_WAIT); lower "
                 "--repeat/--connects")
    return args


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    versions = ["2.6", "3.2"] if args.haproxy == "both" else [args.haproxy]
    for v in versions:
        haproxy_binary(v)  # fail early, with the command that fixes it
    # SIGTERM behaves like Ctrl-C: unwind through the finally blocks that stop the processes.
    signal.signal(signal.SIGTERM, _sigterm)
    global AGENT_CODE
    AGENT_CODE = agent_code()  # at start: the agent processes import the code as it is now
    workdir = Path(tempfile.mkdtemp(prefix="connect-storm-"))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs: list[VersionRun] = []
    ok = False
    started = time.monotonic()
    try:
        for v in versions:
            runs.append(run_version(v, args, workdir))
        ok = True
    except KeyboardInterrupt:
        log("interrupted: processes stopped")
        return 130
    finally:
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(report(runs, args, load_before, load_after))
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps([
            {"haproxy": s.version, "repeat": s.repeat, "concurrency": s.concurrency, "path": s.path,
             "ok": s.load.ok, "errors": dict(s.load.errors), "elapsed_s": s.load.elapsed, "rate": s.load.rate,
             "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "log_good": s.verdict.good, "log_lines": s.verdict.logged,
             "how": dict(s.verdict.how), "err": dict(s.verdict.err), "cpu_s": s.cpu, "new_ids": s.load.new_ids,
             "not_stack_cpu_pct": s.other_share_pct, "agent_metrics": s.decisions}
            for r in runs for s in r.steps
        ], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
