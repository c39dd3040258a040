"""Process wiring: builds the pieces from a Config, runs them, stops them in order.

Order matters on both ends. Health probes run one round before the SPOP port
opens, so the first decision already knows which brokers are down. On SIGTERM
the SPOP server finishes in-flight NOTIFYs before Redis is closed under it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from pathlib import Path

from agent.agent_check import AgentCheckServer
from agent.config import Config, ConfigError, load_config
from agent.core import Core
from agent.dispatch import AffinityDispatcher
from agent.evacuate import Evacuator
from agent.health import HealthMonitor
from agent.http import HttpEndpoint
from agent.logs import setup_logging, warn_limited
from agent.metrics import ConnectionsCollector, Metrics, SpopMetricsObserver, StateCollector
from agent.model import ExitCode, Keys
from agent.node_down import NodeDownPublisher
from agent.server import SpopServer

log = logging.getLogger("mqtt_affinity")

# Keys a SIGHUP cannot change without re-binding sockets or pools: a restart applies them.
RESTART_ONLY = (
    "listen", "metrics_listen", "redis_url", "key_prefix", "redis_pool_size", "max_frame_size",
    "max_in_flight", "max_connections", "health", "agent_check_listen", "haproxy_socket",
)


class App:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
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
                                                ready=lambda: self.refresher.overrides is not unloaded)
        # Active evacuation and connection counts, through this balancer's HAProxy runtime API.
        self.evacuator: Evacuator | None = None
        self._connections: dict[str, int] | None = None
        if config.haproxy_socket is not None:
            self.evacuator = Evacuator(config, self.core.store.redis, self.engine.eligibility,
                                       lambda: self.breaker.available, observer=self.metrics)
            self.metrics.registry.register(ConnectionsCollector(lambda: self._connections))
        self._sessions: dict[str, int] | None = None
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
            observer=SpopMetricsObserver(self.metrics),
        )
        self.http: HttpEndpoint | None = None
        if config.metrics_listen is not None:
            host, port = config.metrics_listen
            self.http = HttpEndpoint(host, port, self.render_metrics, self.ready)
        self._stop = asyncio.Event()

    # -- readiness and metrics -------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self.server.listening:
            return False, "spop: not listening"
        if not self.breaker.available:
            return False, f"redis: unreachable ({self.breaker.reason}); decisions use local fallback hashing"
        return True, "ready"

    async def render_metrics(self) -> bytes:
        """One scrape: session counts are read from Redis now, the rest by the collector."""
        self._sessions = await self.refresher.placed_counts()
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
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            await self._stop.wait()
            log.info("stopping: finishing in-flight requests")
        finally:
            await self.stop()
        return 0

    async def start(self) -> None:
        await self.health.start()
        await self.core.start()
        if self.agent_check is not None:
            await self.agent_check.start()
        if self.evacuator is not None:
            await self.evacuator.start()
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        log.info(
            "listening: spop %s:%d, http %s, agent-check %s, redis %s, nodes %s; haproxy runtime api %s",
            self.config.listen[0], self.server.port,
            f"{self.http.host}:{self.http.port}" if self.http else "off",
            f"{self.agent_check.host}:{self.agent_check.port}" if self.agent_check else "off",
            self.config.redis_url_redacted, ",".join(n.name for n in self.config.nodes),
            self.evacuator.api if self.evacuator else "off (evacuate is passive)",
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
        self._stop.set()

    def _node_changed(self, node: str, up: bool) -> None:
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
                log.warning("reload: %s changed; it takes effect at the next restart", key)
                kept[key] = getattr(self.config, key)
        # The running values stay in force (and in self.config, so the next reload compares
        # against what really runs).
        new = dataclasses.replace(new, **kept)
        self.health.update_nodes(new.nodes)
        self.core.reload(new)
        if self.evacuator is not None:
            self.evacuator.reload(new)
        self.metrics.bind_nodes(n.name for n in new.nodes)
        setup_logging(new.log_level, new.log_format)
        self.config = new
        log.info("reloaded %s: nodes %s", self.config_path, ",".join(n.name for n in new.nodes))

def run(config_path: Path) -> int:
    config = load_config(config_path)
    setup_logging(config.log_level, config.log_format)
    app = App(config, config_path)
    try:
        return asyncio.run(app.run())
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return ExitCode.NOT_FOUND
