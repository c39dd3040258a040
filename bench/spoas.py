"""The reference agents of the benchmarks, as managed processes, and /proc helpers.

* ``FloorSpoa``: ``bench/floor_spoa.c``, built with the machine's gcc (``build_floor``) into a
  folder of the caller's (never committed as a binary): the cheapest correct SPOP agent, a
  fixed answer to every NOTIFY. The floor every other path is compared with.
* ``NullAgent``: ``bench/null_agent.py``, the product's own SPOP server with a do-nothing
  dispatcher (same fixed answer, no Redis): the cost of Python + asyncio + our codec.

Both answer ``node`` = a fixed node (default node2; or, given "node1,node2,node3", the node a
hash of the client id picks) and ``how`` = "hit", answer HAProxy's
health-check HELLO (``option spop-check``) and print "listening on ..." when ready. They are
``devstack.ManagedProcess`` es, so a ``devstack.Stack`` can point a balancer at them
(``start_balancer(agents=[floor])``: only ``addr`` is used) and stops them with the rest when
they are added to ``stack.processes``.

/proc helpers: ``proc_cpu`` (CPU time of a process, all its threads, ns resolution), ``machine_busy``,
``pin`` (``taskset -a -cp``: every thread of a running process).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devstack import ManagedProcess, ToolMissing, free_port  # noqa: E402

FLOOR_SRC = BENCH_DIR / "floor_spoa.c"
NULL_AGENT = BENCH_DIR / "null_agent.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FIXED_NODE = "node2"
#: The real agent's config in the benchmarks: devstack's generated YAML, but with the product's
#: default background intervals (config/agent.yaml: broker probes every 1 s, state refresh 0.5 s,
#: sweep every 300 s) instead of devstack's test-speed ones (0.3 s, 0.2 s, 2 s), and log level
#: info: the agent runs as shipped. `--agent-set` in either benchmark overrides any key.
BENCH_AGENT_OVERRIDES: dict[str, object] = {
    "log_level": "info",
    "state_refresh": 0.5,
    "health": {"check": "tcp", "interval": 1.0, "timeout": 0.5, "rise": 2, "fall": 2},
    "sweep_interval": 300,
}


def build_floor(outdir: Path) -> Path:
    """``gcc -O2`` bench/floor_spoa.c into ``outdir``; returns the binary. ToolMissing without gcc."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise ToolMissing("gcc not found: the C floor agent is built by the benchmark "
                          "(Debian: apt-get install -y --no-install-recommends gcc libc6-dev)")
    outdir.mkdir(parents=True, exist_ok=True)
    binary = outdir / "floor_spoa"
    res = subprocess.run([gcc, "-O2", "-Wall", "-o", str(binary), str(FLOOR_SRC)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"building {FLOOR_SRC} failed:\n{res.stdout}{res.stderr}")
    return binary


def gcc_version() -> str:
    gcc = shutil.which("gcc") or shutil.which("cc") or "gcc"
    try:
        return subprocess.run([gcc, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


class _ListeningProcess(ManagedProcess):
    """Ready once its log says "listening on" (no probe connection: it would show in its counters)."""

    startup_timeout = 15.0

    def __init__(self, workdir: Path | None = None, *, port: int | None = None, node: str = FIXED_NODE,
                 label: str = "") -> None:
        if label:
            self.name = f"{self.name}-{label}"
        super().__init__(workdir)
        self.port = port or free_port()
        self.node = node

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return "listening on" in self.log_text()


class FloorSpoa(_ListeningProcess):
    """The C floor agent (``build_floor`` first). On stop it logs its counters (``counters()``)."""

    name = "floor-spoa"

    def __init__(self, binary: Path, workdir: Path | None = None, **kw: object) -> None:
        super().__init__(workdir, **kw)  # type: ignore[arg-type]
        self.binary = binary

    def argv(self) -> list[str]:
        return [str(self.binary), "-a", "127.0.0.1", "-p", str(self.port), "-n", self.node, "-h", "hit"]

    def counters(self) -> dict[str, int]:
        """What it printed when stopped: connections, healthchecks, notify, ack, haproxy-disconnect, errors."""
        for line in reversed(self.log_lines()):
            if line.startswith("connections "):
                words = line.split()
                return {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}
        return {}


class NullAgent(_ListeningProcess):
    """``bench/null_agent.py``: SpopServer + a do-nothing dispatcher, in the project's Python."""

    name = "null-agent"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def argv(self) -> list[str]:
        return [sys.executable, str(NULL_AGENT), "--port", str(self.port), "--node", self.node]


# --------------------------------------------------------------------------- /proc


def proc_cpu(pid: int | None) -> float:
    """CPU seconds a process has used, all its threads; nan if gone.

    The sum of its threads' on-CPU time in /proc/PID/task/*/schedstat (nanoseconds: a step of
    a thousand connects is a few CPU-ms, which the 10 ms ticks of /proc/PID/stat cannot
    resolve). Threads that exited are no longer counted there: the processes measured keep
    theirs (HAProxy's, Redis's, the agents' event loop). Without schedstat: utime + stime
    from /proc/PID/stat, in ticks."""
    if pid is None:
        return math.nan
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    ticks = (int(rest[11]) + int(rest[12])) / CLK_TCK
    ns, seen = 0, False
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
                    seen = True
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return ticks
    return ns / 1e9 if seen else ticks


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all CPUs, /proc/stat), to spot other tenants."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def cpu_busy(cpu: int) -> float:
    """Busy CPU seconds of one CPU (/proc/stat cpuN line)."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{cpu} "):
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in line.split()[1:9])
                    return (user + nice + system + irq + softirq + steal) / CLK_TCK
    except OSError:
        pass
    return math.nan


def self_cpu() -> float:
    """CPU seconds of this process, all threads (nanosecond clock)."""
    return time.process_time()


def pin(pid: int, cpus: set[int] | list[int]) -> str:
    """Pin every thread of ``pid`` to ``cpus`` (``taskset -a -cp``); returns the command used."""
    spec = ",".join(str(c) for c in sorted(cpus))
    taskset = shutil.which("taskset")
    if taskset:
        subprocess.run([taskset, "-a", "-cp", spec, str(pid)], check=True, capture_output=True, timeout=10)
        return f"taskset -a -cp {spec} {pid}"
    for tid in os.listdir(f"/proc/{pid}/task"):  # util-linux missing: the same, thread by thread
        os.sched_setaffinity(int(tid), set(cpus))
    return f"sched_setaffinity({spec}) on every thread of {pid}"
