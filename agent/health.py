"""Active health checks of the MQTT brokers.

Why the agent probes brokers itself instead of asking HAProxy: it must decide
a placement *before* HAProxy picks a server, and the SPOE message does not
carry server states. Every balancer's agent probes the same brokers, so they
see the same state; the shared Redis record makes them converge anyway.

Semantics follow HAProxy's ``rise``/``fall``: a node starts up, ``fall``
consecutive failed probes mark it down, ``rise`` consecutive successes mark it
up again. One exception: the very first probe of a node (at :meth:`start`, or
when a reload adds it) is decisive, because "starts up" is only an optimistic
prior, and :meth:`HealthMonitor.start` exists precisely so the first decisions
use real knowledge instead of sending clients to a broker that is not there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from agent.config import HealthConfig, NodeConfig
from agent.logs import warn_limited
from agent.streams import close_writer

__all__ = [
    "HealthMonitor",
    "NodeHealth",
    "ProbeError",
    "default_probe_client_id",
    "probe_mqtt",
    "probe_tcp",
]

log = logging.getLogger("mqtt_affinity.health")

Probe = Callable[[NodeConfig], Awaitable[None]]
"""A probe for one node: returns on success, raises on failure."""


class ProbeError(Exception):
    """A probe reached something, but not a healthy broker (or ran out of time)."""


def default_probe_client_id() -> bytes:
    """``mqtt-affinity-probe-<hostname>-<pid>``: recognisable in broker logs and unique per agent process."""
    return f"mqtt-affinity-probe-{socket.gethostname()}-{os.getpid()}".encode()



async def probe_tcp(host: str, port: int, timeout: float) -> None:
    """Succeed if a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    Raises ``OSError`` (e.g. ``ConnectionRefusedError``) or :class:`ProbeError`
    on timeout. Name resolution counts against the timeout too.
    """
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
            await close_writer(writer)
    except TimeoutError:
        raise ProbeError(f"timeout after {timeout:g}s") from None


def _encode_remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect_packet(client_id: bytes) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, keepalive 0, no will/credentials."""
    if len(client_id) > 65535:
        raise ValueError("client id longer than 65535 bytes")
    variable = b"\x00\x04MQTT" + bytes([4, 0x02]) + struct.pack("!H", 0)
    payload = struct.pack("!H", len(client_id)) + client_id
    body = variable + payload
    return b"\x10" + _encode_remaining_length(len(body)) + body


_DISCONNECT = b"\xe0\x00"


async def probe_mqtt(host: str, port: int, timeout: float, client_id: bytes) -> None:
    """Succeed if ``host:port`` answers an MQTT CONNECT with a well-formed CONNACK.

    Any CONNACK return code counts as alive: a broker that refuses the probe
    (e.g. "not authorised") is still running and serving clients. A reply
    that is not a CONNACK, or no reply within ``timeout``, is a failure: a TCP
    listener alone (a hung broker, another service on the port) is not enough.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(_connect_packet(client_id))
                await writer.drain()
                try:
                    reply = await reader.readexactly(4)
                except asyncio.IncompleteReadError as exc:
                    raise ProbeError(
                        f"connection closed after {len(exc.partial)} bytes, before a CONNACK"
                    ) from None
                # CONNACK: type 2, flags 0, remaining length 2, ack flags with
                # only bit 0 (session present) allowed, then the return code.
                if reply[0] != 0x20 or reply[1] != 0x02 or reply[2] & 0xFE:
                    raise ProbeError(f"not an MQTT CONNACK: {reply.hex()}")
                try:
                    writer.write(_DISCONNECT)
                    await writer.drain()
                except OSError:
                    pass  # brokers close at once after a refusing CONNACK
            finally:
                await close_writer(writer)
    except TimeoutError:
        raise ProbeError(f"timeout after {timeout:g}s") from None


@dataclass
class NodeHealth:
    """A snapshot of one node's health as seen by this agent.

    ``since`` is ``time.monotonic()`` of the last transition (or of when the
    node was first configured); ``checks`` counts completed probes.
    """

    name: str
    up: bool
    since: float
    last_error: str | None
    checks: int


class _State:
    """Mutable per-node bookkeeping; identity tells a stale probe result apart."""

    __slots__ = ("node", "health", "successes", "failures")

    def __init__(self, node: NodeConfig, now: float) -> None:
        self.node = node
        self.health = NodeHealth(node.name, True, now, None, 0)
        self.successes = 0
        self.failures = 0


class HealthMonitor:
    """Probes every configured node each ``interval`` and tracks up/down.

    ``healthy`` is read on every placement decision, so it is a frozenset
    rebuilt only when some node changes state. ``on_change(name, up)`` is
    called on every transition (including a node found down by its first
    probe); exceptions it raises are logged and otherwise ignored.
    ``probe`` replaces the configured check (used by tests and embedders);
    ``client_id`` overrides the MQTT probe's client id.
    """

    def __init__(
        self,
        nodes: Sequence[NodeConfig],
        cfg: HealthConfig,
        on_change: Callable[[str, bool], None] | None = None,
        *,
        probe: Probe | None = None,
        client_id: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self._client_id = client_id if client_id is not None else default_probe_client_id()
        self._probe: Probe = probe if probe is not None else self._configured_probe
        now = time.monotonic()
        self._states: dict[str, _State] = {n.name: _State(n, now) for n in nodes}
        # Empty until the first probe: a node never probed is not offered.
        self._healthy: frozenset[str] = frozenset()
        self._down_since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- queries

    @property
    def healthy(self) -> frozenset[str]:
        """Names of the nodes currently up (cached; O(1))."""
        return self._healthy

    @property
    def down_since(self) -> Mapping[str, float]:
        """Nodes found down (by a probe) -> wall-clock time they went down. Replaced, not
        mutated, on every transition, so a caller may cache on its identity."""
        return self._down_since

    def is_up(self, name: str) -> bool:
        """Whether ``name`` is configured and up; unknown names are down."""
        return name in self._healthy

    def status(self) -> dict[str, NodeHealth]:
        """Copies of every node's health, safe to hand to a metrics or HTTP endpoint."""
        return {name: replace(st.health) for name, st in self._states.items()}

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Probe every node once, then keep probing in the background."""
        if self._task is not None:
            raise RuntimeError("HealthMonitor already started")
        await self.run_round()
        self._task = asyncio.create_task(self._loop(), name="health-monitor")

    async def stop(self) -> None:
        """Cancel the loop and any in-flight probes; idempotent."""
        tasks = [t for t in (self._task, *self._side_tasks) if t is not None]
        self._task = None
        self._side_tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:  # pragma: no cover - tasks swallow their errors
                log.exception("health task failed while stopping")

    def update_nodes(self, nodes: Sequence[NodeConfig]) -> None:
        """Apply a reloaded node list.

        Nodes whose name and address are unchanged keep their state (a weight
        change is not a reason to forget that a broker is down). New nodes,
        or nodes moved to another address, are not healthy until their first
        probe, which runs at once when the monitor is running.
        """
        now = time.monotonic()
        old = self._states
        new: dict[str, _State] = {}
        fresh: list[_State] = []
        for node in nodes:
            st = old.get(node.name)
            if st is not None and (st.node.host, st.node.port) == (node.host, node.port):
                st.node = node
                new[node.name] = st
            else:
                st = _State(node, now)
                new[node.name] = st
                fresh.append(st)
        self._states = new
        # A removed node, or one moved to another address, is no longer "down since".
        self._down_since = {n: t for n, t in self._down_since.items() if n in new and new[n] is old.get(n)}
        self._rebuild_healthy()
        if fresh and self._task is not None:
            task = asyncio.get_running_loop().create_task(
                self._probe_states(fresh), name="health-probe-new-nodes"
            )
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    # ------------------------------------------------------------- probing

    async def run_round(self) -> None:
        """Probe every node once, concurrently, and apply the results.

        Public so callers (and tests) can force a round; the background loop
        uses it too.
        """
        await self._probe_states(list(self._states.values()))

    async def _configured_probe(self, node: NodeConfig) -> None:
        if self.cfg.check == "mqtt":
            await probe_mqtt(node.host, node.port, self.cfg.timeout, self._client_id)
        else:
            await probe_tcp(node.host, node.port, self.cfg.timeout)

    async def _check(self, node: NodeConfig) -> str | None:
        """Run one probe; the error text, or None on success. Never raises Exception."""
        try:
            # The probes bound themselves, but an injected probe may not:
            # no probe may hold a round longer than the timeout.
            async with asyncio.timeout(self.cfg.timeout):
                await self._probe(node)
        except TimeoutError:
            return f"timeout after {self.cfg.timeout:g}s"
        except Exception as exc:
            text = str(exc) or type(exc).__name__
            return f"{type(exc).__name__}: {text}" if not isinstance(exc, ProbeError) else text
        return None

    async def _probe_states(self, states: list[_State]) -> None:
        results = await asyncio.gather(*(self._check(st.node) for st in states))
        for st, error in zip(states, results):
            # A reload may have removed or replaced the node while it was probed.
            if self._states.get(st.node.name) is st:
                self._apply(st, error)

    def _apply(self, st: _State, error: str | None) -> None:
        h = st.health
        first = h.checks == 0
        h.checks += 1
        if error is None:
            st.successes += 1
            st.failures = 0
            flip = not h.up and st.successes >= self.cfg.rise
        else:
            h.last_error = error
            st.failures += 1
            st.successes = 0
            flip = h.up and (first or st.failures >= self.cfg.fall)
        if flip:
            self._transition(st, up=not h.up)
        elif first:
            self._rebuild_healthy()  # probed at last: now eligible

    def _transition(self, st: _State, *, up: bool) -> None:
        h = st.health
        h.up = up
        h.since = time.monotonic()
        down = dict(self._down_since)
        if up:
            down.pop(st.node.name, None)
        else:
            down[st.node.name] = time.time()
        self._down_since = down
        self._rebuild_healthy()
        n = st.node
        fields = {"node": n.name, "address": f"{n.host}:{n.port}", "up": up}
        if up:
            log.info("node %s is up", n.name, extra={"fields": fields})
        else:
            fields["error"] = h.last_error
            log.warning("node %s is down: %s", n.name, h.last_error, extra={"fields": fields})
        if self.on_change is not None:
            try:
                self.on_change(n.name, up)
            except Exception:
                warn_limited(log, "on_change", "health on_change callback failed", exc_info=True)

    def _rebuild_healthy(self) -> None:
        # A node not probed yet is not offered: a reload that adds a dead broker must not
        # get clients placed (and recorded) on it during the first probe's timeout.
        self._healthy = frozenset(
            name for name, st in self._states.items() if st.health.up and st.health.checks > 0
        )

    async def _loop(self) -> None:
        interval = self.cfg.interval
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            # Fixed cadence; after a stall (suspended VM) skip missed rounds
            # instead of running a burst of them back to back.
            next_at += interval
            now = time.monotonic()
            if next_at < now:
                next_at = now + interval
            try:
                await self.run_round()
            except Exception:
                warn_limited(log, "round", "health check round failed", exc_info=True)
