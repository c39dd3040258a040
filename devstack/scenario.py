"""Failure scenarios under load: an open-loop CONNECT generator and the accounting afterwards.

Shared by the scenario tests (``tests/test_agent_failover.py``) and the benchmark that compares
HAProxy configurations (``bench/agent_failover.py``).

``OpenLoopLoad`` sends persistent MQTT 3.1.1 CONNECTs (clean session 0) at a fixed rate, on a
schedule that does not slow down when answers do (open loop: a stalled path shows up as
latency and failures, not as a lower rate). Client ids come from a pool; visit ``k`` of id
number ``j`` goes to balancer ``(j + k) % n``, so every id alternates between balancers and
at any moment every balancer gets its share. Each CONNECT waits for its CONNACK, sends
DISCONNECT and closes. It runs in a thread of its own (its own event loop) while the caller
does things to the stack at given times (``run_scenario``).

``analyse`` joins each CONNECT with its HAProxy traffic log line (by balancer and client port)
and with the Redis record of its id, and counts what the issue's targets are about:

- ``no_connack``: CONNECTs that got no successful CONNACK;
- ``spoe_errors``: log lines with an SPOE error in the final answer (``err`` != ``-``), and
  ``first_errors``: lines whose first agent call failed and was asked again (``err1``; the
  shipped config asks again, up to twice, when the agent's connection went away);
- ``waited``: lines where an agent call waited out ``timeout processing`` (error code 1);
- ``no_decision``: lines routed without an agent answer (``how`` = ``-``);
- ``off_record``: lines whose server is not the node the id's Redis record names;
- ``split_ids``: ids that reached more than one server (through either balancer).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from devstack.haproxy import HAProxy
from devstack.mqtt import DISCONNECT, connect_packet
from devstack.procs import wait_until


@dataclass
class Attempt:
    """One CONNECT of the load: where it went, when, and what came back."""

    index: int
    cid: str
    balancer: int  # index into the ports the load was given
    scheduled: float  # seconds since the start of the load
    latency: float | None = None  # CONNECT written -> CONNACK read
    local_port: int | None = None
    error: str | None = None  # None = CONNACK with return code 0

    @property
    def ok(self) -> bool:
        return self.error is None


class OpenLoopLoad:
    """CONNECTs at ``rate`` per second for ``duration`` seconds, over ``ids``, to ``ports``."""

    def __init__(
        self,
        ports: Sequence[int],
        ids: Sequence[str],
        *,
        rate: float = 300.0,
        duration: float = 12.0,
        connack_timeout: float = 5.0,
        host: str = "127.0.0.1",
    ) -> None:
        if not ports or not ids:
            raise ValueError("need at least one port and one client id")
        self.ports = list(ports)
        self.ids = list(ids)
        self.rate = rate
        self.duration = duration
        self.connack_timeout = connack_timeout
        self.host = host
        self.attempts: list[Attempt] = []
        #: time.monotonic() when the first CONNECT was due.
        self.started_at: float | None = None
        #: How late, at worst, the generator started a CONNECT (its own lag, not the stack's).
        self.max_lag = 0.0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def schedule(self) -> list[Attempt]:
        n_ids, n_ports = len(self.ids), len(self.ports)
        total = int(self.rate * self.duration)
        out = []
        for i in range(total):
            j, visit = i % n_ids, i // n_ids
            out.append(Attempt(i, self.ids[j], (j + visit) % n_ports, i / self.rate))
        return out

    async def _one(self, a: Attempt) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.ports[a.balancer]), self.connack_timeout
            )
            a.local_port = writer.get_extra_info("sockname")[1]
            sent = time.monotonic()
            writer.write(connect_packet(a.cid.encode(), version=4, clean=False))
            head = await asyncio.wait_for(reader.readexactly(4), self.connack_timeout)
            a.latency = time.monotonic() - sent
            if head[0] >> 4 != 2:
                a.error = f"packet type {head[0] >> 4} instead of CONNACK"
            elif head[3] != 0:
                a.error = f"CONNACK return code {head[3]}"
            writer.write(DISCONNECT)
        except asyncio.IncompleteReadError:
            a.error = "closed before CONNACK"
        except TimeoutError:
            a.error = "no CONNACK in time"
        except OSError as exc:
            a.error = f"{type(exc).__name__}: {exc}"
        finally:
            if writer is not None:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        plan = self.schedule()
        t0 = time.monotonic() + 0.05
        self.started_at = t0
        tasks = []
        for a in plan:
            due = t0 + a.scheduled
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_lag = max(self.max_lag, -delay)
            self.attempts.append(a)
            tasks.append(loop.create_task(self._one(a)))
        await asyncio.gather(*tasks)

    def start(self) -> OpenLoopLoad:
        def main() -> None:
            try:
                asyncio.run(self._run())
            except BaseException as exc:  # re-raised by join()
                self._error = exc

        self._thread = threading.Thread(target=main, name="open-loop-load", daemon=True)
        self._thread.start()
        wait_until(lambda: self.started_at is not None, timeout=5)
        return self

    def elapsed(self) -> float:
        """Seconds since the load started."""
        assert self.started_at is not None
        return time.monotonic() - self.started_at

    def join(self, timeout: float | None = None) -> list[Attempt]:
        assert self._thread is not None
        self._thread.join(timeout if timeout is not None else self.duration + self.connack_timeout + 30)
        if self._thread.is_alive():
            raise TimeoutError("the load generator did not finish")
        if self._error is not None:
            raise self._error
        return self.attempts


Action = tuple[float, str, Callable[[], object]]


@dataclass
class Timeline:
    """What was done during the load, at which second (relative to its start)."""

    events: list[tuple[float, str]] = field(default_factory=list)

    def mark(self, load: OpenLoopLoad, what: str) -> None:
        self.events.append((round(load.elapsed(), 3), what))


def run_scenario(load: OpenLoopLoad, actions: Sequence[Action] = ()) -> Timeline:
    """Start ``load``; at each (second, label, callable) call it (in this thread, in order,
    never before its second); wait for the load to end. Returns when each action ran and ended."""
    timeline = Timeline()
    load.start()
    for at, label, action in sorted(actions, key=lambda x: x[0]):
        wait = at - load.elapsed()
        if wait > 0:
            time.sleep(wait)
        timeline.mark(load, f"{label} begins")
        action()
        timeline.mark(load, f"{label} done")
    load.join()
    return timeline


# --------------------------------------------------------------------------- accounting


@dataclass
class Report:
    connects: int
    no_connack: int
    logged: int
    spoe_errors: int
    first_errors: int
    waited: int
    no_decision: int
    off_record: int
    split_ids: int
    fallbacks: int
    error_codes: dict[str, int]
    hows: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    generator_lag_ms: float
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: Attempt index -> its HAProxy log line (for analyses of a time window).
    joined: dict[int, dict[str, str]] = field(default_factory=dict)

    COUNTS = ("connects", "no_connack", "spoe_errors", "first_errors", "waited", "no_decision", "off_record",
              "split_ids", "fallbacks")

    def row(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.COUNTS} | {"p99_ms": self.p99_ms, "max_ms": self.max_ms}

    def summary(self) -> str:
        counts = " ".join(f"{k}={getattr(self, k)}" for k in self.COUNTS)
        return (f"{counts} p50={self.p50_ms:.1f}ms p99={self.p99_ms:.1f}ms max={self.max_ms:.1f}ms "
                f"err_codes={self.error_codes} hows={self.hows}")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def analyse(
    attempts: Sequence[Attempt],
    balancers: Sequence[HAProxy],
    owners: Callable[[Sequence[str]], dict[str, str | None]],
    *,
    log_timeout: float = 30.0,
) -> Report:
    """Join ``attempts`` (the load's, whose ``balancer`` indexes ``balancers``) with the traffic
    logs and with ``owners`` (client ids -> the node of their Redis record, e.g. ``Stack.owners``)."""
    ports_by_balancer = [
        {a.local_port for a in attempts if a.balancer == b and a.local_port is not None} for b in range(len(balancers))
    ]

    # The same client port can come back within a run (the broker closes first, so the
    # TIME_WAIT is not on the client's side): a line is found by balancer, port and client
    # id, and attempts sharing all three take their lines in order.
    def lines() -> dict[tuple[int, int, str], list[dict[str, str]]]:
        out: dict[tuple[int, int, str], list[dict[str, str]]] = {}
        for b, ha in enumerate(balancers):
            wanted = ports_by_balancer[b]
            for d in ha.traffic_log():
                if int(d["client_port"]) in wanted:
                    out.setdefault((b, int(d["client_port"]), d["cid"]), []).append(d)
        return out

    expected = sum(a.local_port is not None for a in attempts)
    # HAProxy logs a connection when it closes: wait for every line (or give up and count).
    try:
        wait_until(lambda: sum(len(x) for x in lines().values()) >= expected, timeout=log_timeout, interval=0.2)
    except TimeoutError:
        pass
    found = lines()
    by_attempt: dict[int, dict[str, str]] = {}
    for a in attempts:
        if a.local_port is not None:
            queue = found.get((a.balancer, a.local_port, a.cid))
            if queue:
                by_attempt[a.index] = queue.pop(0)
    record = owners(sorted({a.cid for a in attempts}))

    report = Report(
        connects=len(attempts), no_connack=sum(not a.ok for a in attempts), logged=len(by_attempt), spoe_errors=0,
        first_errors=0, waited=0, no_decision=0, off_record=0, split_ids=0, fallbacks=0, error_codes={}, hows={},
        p50_ms=0.0, p99_ms=0.0, max_ms=0.0, generator_lag_ms=0.0,
    )
    examples: dict[str, list[dict[str, str]]] = {}
    codes: Counter[str] = Counter()
    hows: Counter[str] = Counter()
    servers_of: dict[str, set[str]] = {}

    def example(kind: str, d: dict[str, str]) -> None:
        bucket = examples.setdefault(kind, [])
        if len(bucket) < 5:
            bucket.append(d)

    for a in attempts:
        if a.local_port is None:
            continue
        d = by_attempt.get(a.index)
        if d is None:
            example("unlogged", {"cid": a.cid, "balancer": str(a.balancer), "error": str(a.error)})
            continue
        hows[d["how"]] += 1
        err, err1, err2 = d["err"], d.get("err1") or "-", d.get("err2") or "-"
        if err != "-":
            report.spoe_errors += 1
            codes[f"err={err}"] += 1
            example("spoe_error", d)
        if err1 != "-":
            report.first_errors += 1
            codes[f"err1={err1}"] += 1
        if err2 != "-":
            codes[f"err2={err2}"] += 1
        if "1" in (err, err1, err2):
            report.waited += 1
        if d["how"] == "-":
            report.no_decision += 1
            example("no_decision", d)
        if d["how"] == "fallback":
            report.fallbacks += 1
        if d["server"] not in ("<NOSRV>", "-"):
            servers_of.setdefault(a.cid, set()).add(d["server"])
            if d["server"] != record.get(a.cid):
                report.off_record += 1
                example("off_record", d | {"record": str(record.get(a.cid))})
    report.split_ids = sum(len(s) > 1 for s in servers_of.values())
    for a in attempts:
        if not a.ok:
            example("no_connack", {"cid": a.cid, "balancer": str(a.balancer), "error": str(a.error),
                                   "at": f"{a.scheduled:.3f}"})
    latencies = [a.latency for a in attempts if a.latency is not None]
    report.p50_ms = statistics.median(latencies) * 1000 if latencies else 0.0
    report.p99_ms = _quantile(latencies, 0.99) * 1000
    report.max_ms = max(latencies, default=0.0) * 1000
    report.error_codes = dict(codes)
    report.hows = dict(hows)
    report.examples = examples
    report.joined = by_attempt
    if report.logged != expected:
        report.failures.append(f"{expected - report.logged} of {expected} connections were never logged")
    for ha in balancers:
        dropped = ha.info().get("DroppedLogs", "0")
        if dropped not in ("0", ""):
            report.failures.append(f"{ha.name} dropped {dropped} log lines")
    return report
