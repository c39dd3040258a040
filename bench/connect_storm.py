"""MQTT CONNECT -> CONNACK storm: HAProxy + mqtt-affinity agent vs the same HAProxy's native stick table.

One run starts its own stack on 127.0.0.1 (free ports): redis-server, three mosquitto
brokers, the agent (`mqtt-affinity run`, log_level info) and two HAProxy of the same
version side by side:

  * agent path:  haproxy/haproxy.cfg      (SPOE -> agent -> Redis, `use-server` its answer)
  * native path: haproxy/native-stick.cfg (`stick on mqtt_field_value(connect,client_identifier)`)

Clients are raw asyncio sockets: CONNECT (MQTT 3.1.1, clean session 0, so the agent
writes or refreshes the Redis record every time), wait for CONNACK, DISCONNECT, close.
Client ids come from a pool (default 500), split between the concurrent workers so two
connections never carry the same id at once. A warm-up connects every id twice through
each path (first placement at c=20, then a hit at the highest concurrency measured, so
connection pools have grown), so the measured steps are steady state.

Steps run per concurrency level, alternating which path goes first, `--repeat` times;
the report gives medians. The machine may be shared: each step also measures the CPU used
outside the stack (/proc/stat minus the stack's processes), and repeats where that exceeds
`--noisy-pct` are left out of the medians (the report says how many were used).
Latency is CONNECT sent -> CONNACK received, as the client sees it.

While measuring it checks the HAProxy logs: every agent-path connection must show
how=hit|assigned, err=- and the server the agent named; every client id must stay on one
broker (both paths); at the end the Redis record of every id must name the broker its
connections went to. It also samples CPU time of every process (/proc) per step and the
agent's decision histogram, to show where the time goes.

    .venv/bin/python bench/connect_storm.py                      # HAProxy 3.2, c=1 and c=50
    .venv/bin/python bench/connect_storm.py --haproxy both --repeat 3
    .venv/bin/python bench/connect_storm.py --concurrency 1,10,50 --connects 2000 --ids 1000

Prints a markdown table (paste-ready), the ratios agent/native against the targets
(throughput >= 0.8x native, p50 <= 1.3x native), the machine and the exact command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
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
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import devstack  # noqa: E402
from devstack import (  # noqa: E402
    DISCONNECT,
    HAPROXY_CFG,
    NATIVE_STICK_CFG,
    NODES,
    AgentProcess,
    HAProxy,
    connect_packet,
    haproxy_binary,
    parse_log_line,
)

AGENT, NATIVE = "agent", "native"
PATH_LABEL = {AGENT: "agent (SPOE + Redis)", NATIVE: "native stick table"}
TARGET_THROUGHPUT = 0.8  # agent >= 0.8x native connects/s
TARGET_P50 = 1.3  # agent p50 <= 1.3x native p50
CLK_TCK = os.sysconf("SC_CLK_TCK")
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

    @property
    def attempted(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0


async def storm(
    port: int, packets: list[bytes], concurrency: int, count: int | None, duration: float | None, timeout: float,
    *, once: bool = False,
) -> LoadResult:
    """`concurrency` closed-loop workers; worker w cycles over packets[w::concurrency].

    Stops after `count` connects in total (shared: fast workers do more) or after `duration`
    seconds; with `once`, every worker goes through its own packets exactly once (warm-up:
    every id connects exactly once, whatever the workers' speeds)."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: Counter = Counter()
    left = [count if count is not None else 0]
    start = time.perf_counter()
    deadline = start + duration if duration else None

    async def worker(w: int) -> None:
        mine = packets[w::concurrency]
        k = 0
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
            packet = mine[k % len(mine)]
            k += 1
            try:
                latencies.append(await connect_once(loop, port, packet, timeout))
            except (OSError, ConnackError, TimeoutError) as exc:
                errors[type(exc).__name__ + (f": {exc}" if isinstance(exc, ConnackError) else "")] += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return LoadResult(len(latencies), errors, time.perf_counter() - start, latencies)


def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# --------------------------------------------------------------------------- observation


def proc_cpu(pid: int | None) -> float:
    """utime + stime of a process (all threads), seconds; nan if gone."""
    if pid is None:
        return math.nan
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all CPUs, /proc/stat), to spot other tenants."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


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
    good: int = 0  # agent: how in {hit, assigned}, err "-", went to the node named; native: a real server
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
        if path == AGENT:
            if d["node"] != server:
                v.wrong_server += 1
            elif d["how"] in ("hit", "assigned") and d["err"] == "-":
                v.good += 1
        elif server in NODES:
            v.good += 1
        else:
            v.wrong_server += 1
    return v


# --------------------------------------------------------------------------- the stack


class Stack:
    """Redis, three brokers, the agent, HAProxy+agent and HAProxy+stick table, one version.

    A devstack Stack with one agent and two balancers of the same version: "storm-agent"
    (haproxy.cfg, asking the agent) and "storm-native" (native-stick.cfg, no agent)."""

    def __init__(self, version: str, workdir: Path, agent_set: list[tuple[str, str]] = ()) -> None:
        self.version = version
        self.workdir = workdir
        # Production log level unless --agent-set says otherwise; --agent-set replaces a
        # top-level key of the generated YAML or adds it.
        self.stack = devstack.Stack(version, workdir=workdir, die_with_parent=True,
                                    agent_overrides={"log_level": "info", **dict(agent_set)})
        self.agent: AgentProcess | None = None
        self.haproxy: dict[str, HAProxy] = {}
        self.ports: dict[str, int] = {}
        self.metrics_port = 0

    def start(self) -> None:
        s = self.stack
        s.start_redis()
        s.start_brokers()
        self.agent = s.start_agent("storm")
        self.metrics_port = self.agent.metrics_port or 0
        for path, cfg_path in ((AGENT, HAPROXY_CFG), (NATIVE, NATIVE_STICK_CFG)):
            bal = s.start_balancer(f"storm-{path}", agents=[self.agent] if path == AGENT else [], cfg_path=cfg_path)
            self.haproxy[path] = bal.haproxy
            self.ports[path] = bal.port
        s.wait_ready(timeout=15)
        for node in NODES:  # the agent's own probes: until then it would place nobody
            s.wait_agents_see(node, up=True, timeout=15)

    def cpu(self) -> dict[str, float]:
        """Cumulative CPU seconds per component."""
        redis = self.stack.redis
        return {
            "client": self_cpu(),
            "haproxy-agent": proc_cpu(self.haproxy[AGENT].pid),
            "haproxy-native": proc_cpu(self.haproxy[NATIVE].pid),
            "agent": proc_cpu(self.agent.pid if self.agent else None),
            "redis": proc_cpu(redis.pid if redis else None),
            "brokers": sum(proc_cpu(b.pid) for b in self.stack.brokers),
            "machine": machine_busy(),
        }

    def dropped_logs(self, path: str) -> int:
        """HAProxy's own count of log lines it could not write (it drops rather than block)."""
        return int(self.haproxy[path].info().get("DroppedLogs", 0))

    def redis_owners(self, cids: list[bytes]) -> dict[str, str | None]:
        return self.stack.owners(cids)

    def dead(self) -> list[str]:
        """Names of the stack's processes that have exited."""
        return self.stack.exited()

    def stop(self) -> None:
        self.stack.close()


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
    def p50_ms(self) -> float:
        return pct(self.load.latencies, 50) * 1e3

    @property
    def p99_ms(self) -> float:
        return pct(self.load.latencies, 99) * 1e3


@dataclass
class VersionRun:
    version: str
    banner: str
    steps: list[Step] = field(default_factory=list)
    warmup: dict[str, Verdict] = field(default_factory=dict)
    warmup_errors: dict[str, Counter] = field(default_factory=dict)
    owners: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    redis_mismatch: int = 0
    redis_missing: int = 0
    unplaced_after_warmup: int = 0
    agent_warnings: Counter = field(default_factory=Counter)


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


def run_version(version: str, args: argparse.Namespace, workdir: Path) -> VersionRun:
    banner = subprocess.run([haproxy_binary(version), "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    run = VersionRun(version, banner)
    cids = [b"storm-%05d" % i for i in range(args.ids)]
    packets = [connect_packet(c, version=4, clean=False, keepalive=30) for c in cids]
    stack = Stack(version, workdir / f"haproxy-{version}", args.agent_set)
    try:
        log(f"[{version}] starting redis, 3 mosquitto, agent, 2 HAProxy in {stack.workdir}")
        stack.start()
        tails = {p: LogTail(stack.haproxy[p].log_path) for p in (AGENT, NATIVE)}
        for p in (AGENT, NATIVE):
            tails[p].read()  # skip start-up lines
            run.owners[p] = {}
            run.warmup[p] = Verdict()
            run.warmup_errors[p] = Counter()

        # Warm-up: pass 1 places every id, pass 2 is all hits; then the steps see steady state.
        for p in (AGENT, NATIVE):
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
            log(f"[{version}] WARNING: {run.unplaced_after_warmup} ids still have no Redis record after the warm-up")
        w = run.warmup[AGENT]
        log(f"[{version}] warm-up: agent path how={dict(w.how)} err={dict(w.err)}; "
            f"native path {run.warmup[NATIVE].good}/{run.warmup[NATIVE].logged} routed")

        for rep in range(args.repeat):
            for ci, (conc, count) in enumerate(zip(args.concurrency, args.connects)):
                order = (AGENT, NATIVE) if (rep + ci) % 2 == 0 else (NATIVE, AGENT)
                for p in order:
                    time.sleep(args.pause)
                    dropped0 = stack.dropped_logs(p)
                    before_cpu, before_m = stack.cpu(), scrape_agent(stack.metrics_port)
                    res = asyncio.run(storm(stack.ports[p], packets, conc, None if args.duration else count,
                                            args.duration, args.timeout))
                    after_cpu, after_m = stack.cpu(), scrape_agent(stack.metrics_port)
                    lines, dropped = collect(stack, p, tails[p], res.attempted, dropped0)
                    verdict = judge(p, lines, run.owners[p], dropped)
                    step = Step(version, rep, conc, p, res, verdict,
                                {k: after_cpu[k] - before_cpu[k] for k in after_cpu},
                                {k: after_m.get(k, 0.0) - before_m.get(k, 0.0) for k in after_m})
                    run.steps.append(step)
                    errs = sum(res.errors.values())
                    other = step.other_cpu / res.elapsed / (os.cpu_count() or 1) * 100
                    log(f"[{version}] rep {rep + 1}/{args.repeat} c={conc:<3} {p:<6} {res.rate:8.0f}/s  "
                        f"p50 {step.p50_ms:6.2f} ms  p99 {step.p99_ms:6.2f} ms  errors {errs}  "
                        f"log ok {verdict.good}/{verdict.logged} (+{dropped} dropped)  "
                        f"load {os.getloadavg()[0]:.2f}  not-stack CPU {other:.0f}%")
            dead = stack.dead()
            if dead:
                raise RuntimeError(f"process(es) exited during the run: {', '.join(dead)}")

        owners = stack.redis_owners(cids)
        for cid, servers in run.owners[AGENT].items():
            rec = owners.get(cid)
            if rec is None:
                run.redis_missing += 1
            elif servers != {rec}:
                run.redis_mismatch += 1
    finally:
        stack.stop()
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
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


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
            "python": platform.python_version(), **versions}


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
    return f"git {head}" + (f"; uncommitted: {', '.join(files)}" if files else "; clean")


def report(runs: list[VersionRun], args: argparse.Namespace, load_before: str, load_after: str) -> str:
    out: list[str] = []
    m = machine()
    out.append("## connect storm: HAProxy + mqtt-affinity agent vs native stick table\n")
    out.append(f"- command: `{shlex.join(sys.orig_argv)}` (cwd {os.getcwd()})")
    out.append(f"- machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}; "
               f"{m['redis']}; {m['mosquitto']}")
    out.append(f"- agent code: {AGENT_CODE}")
    for r in runs:
        out.append(f"- HAProxy {r.version}: {r.banner}")
    out.append(f"- load average before: {load_before}; after: {load_after} (the run itself keeps both CPUs busy)")
    steps = [s for r in runs for s in r.steps]
    if steps:
        share = [s.other_cpu / s.load.elapsed / (os.cpu_count() or 1) * 100 for s in steps]
        out.append(f"- CPU not attributed to the stack during the steps (other processes + unattributed kernel "
                   f"work), share of all CPUs: median {med(share):.0f}%, max {max(share):.0f}%")
    per = f"{args.duration:g} s" if args.duration else "/".join(map(str, args.connects)) + " connects"
    out.append(f"- {args.ids} client ids (MQTT 3.1.1, clean session 0), concurrency "
               f"{'/'.join(map(str, args.concurrency))}, {per} per step, {args.repeat} repeat(s), median shown; "
               "latency = CONNECT sent -> CONNACK received; everything (clients included) on this machine")
    if args.agent_set:
        out.append(f"- agent config overrides: {', '.join(f'{k}: {v}' for k, v in args.agent_set)}")
    out.append("")

    # A repeat is kept for the medians only if neither of its two steps (agent, native) saw more
    # than --noisy-pct of the machine's CPU go elsewhere; if no repeat is that quiet, all are used.
    def share(s: Step) -> float:
        return s.other_cpu / s.load.elapsed / (os.cpu_count() or 1) * 100 if s.load.elapsed else 0.0

    def kept(r: VersionRun, conc: int) -> tuple[set[int], bool]:
        reps = {s.repeat for s in r.steps if s.concurrency == conc}
        quiet = {x for x in reps if all(share(s) <= args.noisy_pct for s in r.steps
                                         if s.concurrency == conc and s.repeat == x)}
        return (quiet, True) if quiet else (reps, False)

    out.append("| HAProxy | clients | path | connects/s | p50 ms | p99 ms | errors | repeats used |")
    out.append("|---|---:|---|---:|---:|---:|---:|---:|")
    ratios: list[tuple[str, int, float, float, float]] = []
    for r in runs:
        for conc in args.concurrency:
            use, quiet = kept(r, conc)
            total_reps = len({s.repeat for s in r.steps if s.concurrency == conc})
            used = f"{len(use)}/{total_reps}" + ("" if quiet else " (none quiet)")
            for p in (NATIVE, AGENT):
                steps = [s for s in r.steps if s.concurrency == conc and s.path == p and s.repeat in use]
                errs = sum(sum(s.load.errors.values()) for s in r.steps if s.concurrency == conc and s.path == p)
                out.append(f"| {r.version} | {conc} | {PATH_LABEL[p]} | {med([s.load.rate for s in steps]):,.0f} | "
                           f"{fmt(med([s.p50_ms for s in steps]))} | {fmt(med([s.p99_ms for s in steps]))} | {errs} | "
                           f"{used} |")
            pairs = [(a, n) for a in r.steps for n in r.steps
                     if a.concurrency == n.concurrency == conc and a.repeat == n.repeat
                     and a.path == AGENT and n.path == NATIVE and a.repeat in use]
            ratios.append((r.version, conc,
                           med([a.load.rate / n.load.rate for a, n in pairs if n.load.rate]),
                           med([a.p50_ms / n.p50_ms for a, n in pairs]),
                           med([a.p99_ms / n.p99_ms for a, n in pairs])))

    out.append(f"\nErrors count every repeat; the other columns are medians over the repeats in which neither step "
               f"saw more than {args.noisy_pct:g}% of the machine's CPU used outside the stack.")
    out.append("\nRatios agent/native (median of the per-repeat ratios over the same repeats; each repeat runs both "
               "paths back to back):\n")
    out.append(f"| HAProxy | clients | throughput | p50 | p99 | throughput >= {TARGET_THROUGHPUT}x "
               f"| p50 <= {TARGET_P50}x |")
    out.append("|---|---:|---:|---:|---:|:-:|:-:|")
    for version, conc, thr, p50, p99 in ratios:
        out.append(f"| {version} | {conc} | {fmt(thr)}x | {fmt(p50)}x | {fmt(p99)}x | "
                   f"{'yes' if thr >= TARGET_THROUGHPUT else 'NO'} | {'yes' if p50 <= TARGET_P50 else 'NO'} |")

    out.append("\n### Correctness (HAProxy logs, Redis)\n")
    for r in runs:
        a = Verdict()
        n = Verdict()
        for s in r.steps:
            (a if s.path == AGENT else n).add(s.verdict)
        a_sent = sum(s.load.attempted for s in r.steps if s.path == AGENT)
        n_sent = sum(s.load.attempted for s in r.steps if s.path == NATIVE)
        wa = r.warmup[AGENT]
        bad_how = {k: v for k, v in a.how.items() if k not in ("hit", "assigned")}
        bad_err = {k: v for k, v in a.err.items() if k != "-"}
        split = {p: sum(1 for s in r.owners[p].values() if len(s) > 1) for p in (AGENT, NATIVE)}
        out.append(f"- HAProxy {r.version}, agent path: {a.good}/{a_sent} measured connects logged with how in "
                   f"{{hit, assigned}}, err `-` and the server the agent named ({a.logged} logged; HAProxy DroppedLogs "
                   f"{a.dropped}, traffic and SPOE lines; how {dict(a.how)}); "
                   f"other how: {bad_how or 'none'}; SPOE errors: {bad_err or 'none'}; "
                   f"server != agent's node: {a.wrong_server}; termination states {dict(a.termination)}")
        out.append(f"  - warm-up: how {dict(wa.how)}, err {dict(wa.err)}, client errors "
                   f"{dict(r.warmup_errors[AGENT]) or 'none'}; ids without a Redis record after it: "
                   f"{r.unplaced_after_warmup}")
        out.append(f"  - agent warnings/errors during the run: {dict(r.agent_warnings) or 'none'}")
        out.append(f"  - client ids seen on more than one broker: {split[AGENT]}; Redis record disagrees with the "
                   f"log: {r.redis_mismatch}, missing: {r.redis_missing} (of {len(r.owners[AGENT])} ids)")
        out.append(f"- HAProxy {r.version}, native path: {n.good}/{n_sent} measured connects routed to a broker "
                   f"({n.logged} logged, DroppedLogs {n.dropped}; <NOSRV>/other: {n.wrong_server}); "
                   f"client ids on more than one broker: "
                   f"{split[NATIVE]}; termination states {dict(n.termination)}")
        errs = Counter()
        for s in r.steps:
            errs.update(s.load.errors)
        if errs:
            out.append(f"- HAProxy {r.version} client-side errors: {dict(errs)}")

    out.append("\n### Where the time goes (medians over repeats; CPU = process CPU time / successful connects)\n")
    comps = ("client", "haproxy", "agent", "redis", "brokers")
    out.append("| HAProxy | clients | path | " + " | ".join(f"{c} CPU us" for c in comps)
               + " | total CPU us | agent decision mean ms | agent Redis round trip mean ms | SPOE ptime p50/p99 ms |")
    out.append("|---|---:|---|" + "---:|" * (len(comps) + 4))
    for r in runs:
        for conc in args.concurrency:
            for p in (NATIVE, AGENT):
                use, _ = kept(r, conc)
                steps = [s for s in r.steps if s.concurrency == conc and s.path == p and s.repeat in use]
                row = []
                total = []
                for s in steps:
                    ok = max(1, s.load.ok)
                    cpu = {c: s.cpu["haproxy-" + p] if c == "haproxy" else s.cpu[c] for c in comps}
                    row.append({c: v / ok * 1e6 for c, v in cpu.items()})
                    total.append(sum(cpu.values()) / ok * 1e6)
                cells = [fmt(med([x[c] for x in row]), 0) for c in comps]
                dec = rtt = pt = "-"
                if p == AGENT:
                    def mean_ms(metric: str, steps: list[Step] = steps) -> str:
                        means = []
                        for s in steps:
                            cnt = s.decisions.get(metric + "_count", 0.0)
                            if cnt:
                                means.append(s.decisions[metric + "_sum"] / cnt * 1e3)
                        return fmt(med(means), 3) if means else "n/a"
                    dec = mean_ms("mqtt_affinity_decision_seconds")
                    rtt = mean_ms("mqtt_affinity_redis_seconds")
                    pts = [x for s in steps for x in s.verdict.ptime_ms]
                    pt = f"{fmt(pct(pts, 50), 0)}/{fmt(pct(pts, 99), 0)}" if pts else "-"
                out.append(f"| {r.version} | {conc} | {PATH_LABEL[p]} | " + " | ".join(cells)
                           + f" | {fmt(med(total), 0)} | {dec} | {rtt} | {pt} |")
    out.append("\n(`agent decision mean` is the agent's own mqtt_affinity_decision_seconds: parse + Redis EVALSHA + "
               "event-loop wait; `Redis round trip` its mqtt_affinity_redis_seconds (n/a if the agent does not "
               "record it); SPOE ptime is HAProxy's view of the agent, whole milliseconds. Background CPU "
               "(health checks, the agent's state refresh) is included in every row.)")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--haproxy", default="3.2", choices=("2.6", "3.2", "both"))
    ap.add_argument("--concurrency", default="1,50", help="comma-separated concurrency levels (default 1,50)")
    ap.add_argument("--connects", default="2000,5000",
                    help="connects per step: one number, or one per concurrency level (default 2000,5000)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per step instead of --connects")
    ap.add_argument("--ids", type=int, default=500, help="client id pool size (default 500)")
    ap.add_argument("--repeat", type=int, default=3, help="repeat every step N times, report medians (default 3)")
    ap.add_argument("--noisy-pct", type=float, default=15.0,
                    help="leave a repeat out of the medians if more than this %% of the machine's CPU went to "
                         "processes outside the stack during it (default 15)")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-connect timeout, s (default 5)")
    ap.add_argument("--pause", type=float, default=0.3, help="idle time before each step, s (default 0.3)")
    ap.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a top-level key of the generated agent YAML, e.g. redis_pool_size=128 (repeatable)")
    ap.add_argument("--json", type=Path, help="also write raw per-step results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) even on success")
    args = ap.parse_args(argv)
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
             "how": dict(s.verdict.how), "err": dict(s.verdict.err), "cpu_s": s.cpu,
             "not_stack_cpu_pct": (s.other_cpu / s.load.elapsed / (os.cpu_count() or 1) * 100
                                   if s.load.elapsed else None),
             "agent_metrics": s.decisions}
            for r in runs for s in r.steps
        ], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
