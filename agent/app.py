"""Process wiring: builds the pieces from a Config, runs them, stops them in order.

Order matters on both ends. Health probes run one round before the SPOP port
opens, so the first decision already knows which brokers are down. On SIGTERM
(or SIGINT) the agent first drains for ``drain_period`` seconds: it fails
HAProxy's health checks while still answering every NOTIFY, so each HAProxy
marks it DOWN and moves its new work to another agent; a second SIGTERM/SIGINT
ends the drain at once. Then the SPOP server stops accepting, finishes
in-flight NOTIFYs and says AGENT-DISCONNECT, before Redis is closed under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
from pathlib import Path

from agent.agent_check import AgentCheckServer
from agent.config import Config, ConfigError, load_config
from agent.core import Core
from agent.dispatch import AffinityDispatcher
from agent.evacuate import Evacuator
from agent.health import HealthMonitor
from agent.http import HttpEndpoint
from agent.logs import set_process_fields, setup_logging, warn_limited
from agent.metrics import ConnectionsCollector, Metrics, SpopMetricsObserver, StateCollector, StoreCollector
from agent.model import ExitCode, Keys
from agent.node_down import NodeDownPublisher
from agent.server import SpopServer
from agent.workers import WorkerRole, supervise

log = logging.getLogger("mqtt_affinity")

# Keys a SIGHUP cannot change without re-binding sockets or pools: a restart applies them.
RESTART_ONLY = (
    "listen", "metrics_listen", "redis_url", "key_prefix", "redis_pool_size", "max_frame_size",
    "max_in_flight", "max_connections", "health", "agent_check_listen", "haproxy_socket", "workers",
)  # hello_timeout applies to connections opened after a reload; drain_period is read at SIGTERM


class App:
    """One agent process. ``worker``: one of the processes of ``workers`` > 1 (see
    :mod:`agent.workers`): it shares the SPOP and agent-check ports with the other workers
    (SO_REUSEPORT), serves its HTTP endpoint on a unix socket for the supervisor, and only
    worker 0 runs the once-per-host background work."""

    def __init__(self, config: Config, config_path: Path | None = None, worker: WorkerRole | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.worker = worker
        # Once per host, not once per worker (worker 0 does it):
        # - the record sweep (a lease in Redis would let one worker sweep at a time anyway;
        #   the others would only ask for the lease);
        # - active evacuation and the connection counts, through this balancer's HAProxy
        #   runtime API (the eviction budget is shared in Redis, so N workers would not close
        #   more, but each would ask HAProxy for every session each round: N times the load);
        # - publishing node-down transitions (every worker probes the brokers and decides
        #   with its own view, but one write per transition is enough).
        # Everything on the decision path (health probes, the refresher, the cache) is per worker.
        self.singletons = worker is None or worker.index == 0
        self.metrics = Metrics()
        self.metrics.bind_nodes(n.name for n in config.nodes)
        # Node transitions are logged once, by the monitor itself; published for the CLI.
        self.health = HealthMonitor(config.nodes, config.health, on_change=self._node_changed)
        self.core = Core.build(
            config, lambda: self.health.healthy, down_since=lambda: self.health.down_since, observer=self.metrics
        )
        self.breaker, self.refresher, self.engine = self.core.breaker, self.core.refresher, self.core.engine
        self.node_down = NodeDownPublisher(self.core.store.redis, Keys(config.key_prefix))
        # HAProxy's agent-check: node states and weights in HAProxy's own stats and hash fallback.
        self.agent_check: AgentCheckServer | None = None
        if config.agent_check_listen is not None:
            host, port = config.agent_check_listen
            # Silent until the overrides come from Redis (a new object each load): an empty view at
            # a start during a Redis outage would tell HAProxy to undo every drain.
            unloaded = self.refresher.overrides
            self.agent_check = AgentCheckServer(host, port, lambda: self.config.nodes,
                                                lambda: self.refresher.overrides, observer=self.metrics,
                                                ready=lambda: self.refresher.overrides is not unloaded,
                                                reuse_port=worker is not None)
        # Active evacuation and connection counts, through this balancer's HAProxy runtime API.
        self.evacuator: Evacuator | None = None
        self._connections: dict[str, int] | None = None
        if config.haproxy_socket is not None and self.singletons:
            self.evacuator = Evacuator(config, self.core.store.redis, self.engine.eligibility,
                                       lambda: self.breaker.available, observer=self.metrics)
            self.metrics.registry.register(ConnectionsCollector(lambda: self._connections))
        self._sessions: tuple[dict[str, int], float | None] | None = None
        self.metrics.registry.register(StoreCollector(self.core.store))
        self.metrics.registry.register(
            StateCollector(self.engine.node_views, lambda: self.breaker.available, lambda: self._sessions)
        )
        self.dispatcher = AffinityDispatcher(self.engine, self.metrics)
        self.server = SpopServer(
            self.dispatcher,
            config.listen[0],
            config.listen[1],
            max_in_flight=config.max_in_flight,
            max_frame_size=config.max_frame_size,
            max_connections=config.max_connections,
            hello_timeout=config.hello_timeout,
            observer=SpopMetricsObserver(self.metrics),
            reuse_port=worker is not None,
        )
        self.http: HttpEndpoint | None = None
        if worker is not None:  # the supervisor serves metrics_listen, and asks this one
            self.http = HttpEndpoint("", 0, self.render_metrics, self.ready, unix_path=worker.http_path)
        elif config.metrics_listen is not None:
            host, port = config.metrics_listen
            self.http = HttpEndpoint(host, port, self.render_metrics, self.ready)
        self._stop = asyncio.Event()
        self._cut_drain = asyncio.Event()
        self._orphan_watch: asyncio.Task[None] | None = None
        #: A worker started again after its config file was edited (see run()).
        self.reload_after_start = False
        #: A worker whose supervisor died.
        self.orphaned = False

    # -- readiness and metrics -------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self.server.draining:
            return False, "draining: shutting down"
        if not self.server.listening:
            return False, "spop: not listening"
        if not self.breaker.available:
            return False, f"redis: unreachable ({self.breaker.reason}); decisions use local fallback hashing"
        return True, "ready"

    async def render_metrics(self) -> bytes:
        """One scrape: session counts are read from Redis now, the rest by the collector."""
        self._sessions = await self.refresher.session_counts()
        if self.evacuator is not None:
            self._connections = await self.evacuator.read_connections()
        if self._sessions is None and self.breaker.available:
            warn_limited(log, "metrics-sessions", "metrics: session counts could not be read from Redis",
                         interval=60.0)
        return self.metrics.render()

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.worker is not None:
            self._orphan_watch = loop.create_task(self._stop_when_orphaned(os.getppid()))
        try:
            await self.start()
            if self.reload_after_start:
                self.reload()
            await self._stop.wait()
            await self.drain()
            log.info("stopping: finishing in-flight requests")
        finally:
            await self.stop()
            if self.orphaned and self.worker is not None:
                # The supervisor can no longer remove its private folder: the workers empty it.
                for path in (self.worker.http_path, self.worker.start_config):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self.worker.http_path))  # only once empty
        return 0

    async def drain(self) -> None:
        """Fail HAProxy's health checks for ``drain_period`` while serving everything.

        Ends early on a second stop request. HAProxy needs `fall` failed checks to mark the
        agent DOWN (about inter + (fall-1) x fastinter); until then it still sends work here.
        """
        period = self.config.drain_period
        if period <= 0 or self._cut_drain.is_set():
            return
        log.info("draining for %gs: failing HAProxy's health checks, still answering "
                 "(a second SIGTERM stops at once)", period)
        self.server.begin_drain()
        try:
            await asyncio.wait_for(self._cut_drain.wait(), period)
            log.info("drain cut short by a second stop signal")
        except TimeoutError:
            pass

    async def _stop_when_orphaned(self, parent: int) -> None:
        """A worker whose supervisor died (SIGKILL, a crash) stops by itself."""
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                log.error("the supervisor (pid %d) is gone: stopping", parent)
                self.orphaned = True
                self.request_stop()
                self.request_stop()  # and no drain: nobody restarts this one
                return

    async def start(self) -> None:
        await self.health.start()
        await self.core.start(sweep=self.singletons)
        if self.agent_check is not None:
            await self.agent_check.start()
        if self.evacuator is not None:
            await self.evacuator.start()
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        _tune_gc()
        config_socket_elsewhere = self.config.haproxy_socket is not None and not self.singletons
        http = "off"
        if self.http is not None:
            http = self.http.unix_path or f"{self.http.host}:{self.http.port}"
        log.info(
            "listening: spop %s:%d, http %s, agent-check %s, redis %s, nodes %s; haproxy runtime api %s",
            self.config.listen[0], self.server.port,
            http,
            f"{self.agent_check.host}:{self.agent_check.port}" if self.agent_check else "off",
            self.config.redis_url_redacted, ",".join(n.name for n in self.config.nodes),
            self.evacuator.api if self.evacuator else
            "in worker 0" if config_socket_elsewhere else "off (evacuate is passive)",
        )

    async def stop(self) -> None:
        await self.server.shutdown()
        if self.http is not None:
            await self.http.stop()
        await self.health.stop()
        if self.evacuator is not None:
            await self.evacuator.stop()
        if self.agent_check is not None:
            await self.agent_check.stop()
        await self.node_down.stop()
        await self.core.stop()
        log.info("stopped")

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: the first starts the drain, the next one ends it."""
        if self._stop.is_set():
            self._cut_drain.set()
        self._stop.set()

    def _node_changed(self, node: str, up: bool) -> None:
        if self.singletons:
            self.node_down.on_change(node, up)

    # -- reload ------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read nodes, weights and log settings; SPOP connections stay open."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: no config file to reload")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        kept = {}
        for key in RESTART_ONLY:
            if getattr(new, key) != getattr(self.config, key):
                if not (key == "workers" and self.worker is not None):  # the supervisor says it
                    log.warning("reload: %s changed; it takes effect at the next restart", key)
                kept[key] = getattr(self.config, key)
        # The running values stay in force (and in self.config, so the next reload compares
        # against what really runs).
        new = dataclasses.replace(new, **kept)
        self.health.update_nodes(new.nodes)
        self.server.hello_timeout = new.hello_timeout
        self.core.reload(new)
        if self.evacuator is not None:
            self.evacuator.reload(new)
        self.metrics.bind_nodes(n.name for n in new.nodes)
        setup_logging(new.log_level, new.log_format)
        self.config = new
        log.info("reloaded %s: nodes %s", self.config_path, ",".join(n.name for n in new.nodes))

#: Young-generation collection threshold once started (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Once started, the objects built so far (modules, config, scripts) live forever: move them
    out of the collector's sight (gc.freeze) and collect the young generation less often. The hot
    path makes few cycles; a full pass over the frozen start-up heap every 700 allocations was
    about 7% of the agent's CPU under load."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


def _text(path: str | os.PathLike[str]) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def run(config_path: Path, worker: WorkerRole | None = None) -> int:
    """The agent: one process, or with ``workers`` > 1 the supervisor of that many (a worker
    is started with ``worker``, by the supervisor)."""
    config = load_config(config_path if worker is None else worker.start_config)
    if worker is None and config.workers > 1:
        return supervise(config_path, config)
    setup_logging(config.log_level, config.log_format)
    if worker is not None:
        set_process_fields(worker=worker.index, pid=os.getpid())
    app = App(config, config_path, worker)
    if worker is not None and _text(config_path) != _text(worker.start_config):
        # Started again after the file was edited: what a SIGHUP would apply, applies once it
        # runs (the restart-only keys stay those of the other workers).
        app.reload_after_start = True
    try:
        return asyncio.run(app.run())
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.NOT_FOUND
