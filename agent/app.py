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

from agent.affinity import AffinityEngine
from agent.config import Config, ConfigError, load_config
from agent.dispatch import AffinityDispatcher
from agent.health import HealthMonitor
from agent.http import HttpEndpoint
from agent.logs import setup_logging
from agent.metrics import Metrics, SpopMetricsObserver
from agent.server import SpopServer
from agent.store import Store

log = logging.getLogger("mqtt_affinity")

NODE_METRICS_INTERVAL = 2.0
# Keys a SIGHUP cannot change without re-binding sockets or pools: a restart applies them.
RESTART_ONLY = (
    "listen", "metrics_listen", "redis_url", "key_prefix", "redis_pool_size", "max_frame_size",
    "max_in_flight", "health",
)


class App:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.metrics.bind_nodes(n.name for n in config.nodes)
        self.health = HealthMonitor(config.nodes, config.health, on_change=self._health_changed)
        self.store = Store.from_config(config)
        self.engine = AffinityEngine(config, self.store, lambda: self.health.healthy)
        self.engine.observe_redis = self.metrics.redis_seconds.observe
        self.dispatcher = AffinityDispatcher(self.engine, self.metrics)
        self.server = SpopServer(
            self.dispatcher,
            config.listen[0],
            config.listen[1],
            max_in_flight=config.max_in_flight,
            max_frame_size=config.max_frame_size,
            observer=SpopMetricsObserver(self.metrics),
        )
        self.http: HttpEndpoint | None = None
        if config.metrics_listen is not None:
            self.http = HttpEndpoint(config.metrics_listen[0], config.metrics_listen[1], self.metrics.render, self.ready)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- readiness and health ------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self.server.listening:
            return False, "spop: not listening"
        if not self.engine.redis_available:
            return False, "redis: unreachable (decisions use local fallback hashing)"
        return True, "ready"

    def _health_changed(self, node: str, up: bool) -> None:
        if up:
            log.info("node %s is up", node)
        else:
            log.warning("node %s is down: new and returning clients are placed elsewhere", node)

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
        await self.engine.start()
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        self._tasks.append(asyncio.create_task(self._node_metrics_loop(), name="node-metrics"))
        log.info(
            "listening: spop %s:%d, http %s, redis %s, nodes %s",
            self.config.listen[0], self.server.port,
            f"{self.http.host}:{self.http.port}" if self.http else "off",
            self.config.redis_url_redacted, ",".join(n.name for n in self.config.nodes),
        )

    async def stop(self) -> None:
        await self.server.shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.stop()
        await self.engine.stop()
        await self.health.stop()
        await self.store.close()
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

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
        old_names = {n.name for n in self.config.nodes}
        new_names = {n.name for n in new.nodes}
        self.health.update_nodes(new.nodes)
        self.engine.reload(new)
        self.metrics.bind_nodes(new_names)
        for gone in old_names - new_names:
            self.metrics.forget_node(gone)
        setup_logging(new.log_level, new.log_format)
        self.config = new
        log.info("reloaded %s: nodes %s", self.config_path, ",".join(n.name for n in new.nodes))

    async def _node_metrics_loop(self) -> None:
        while True:
            try:
                sessions = await self.engine.placed_counts()
                status = self.health.status()
                for view in self.engine.node_views():
                    self.metrics.set_node(
                        view.name,
                        up=status[view.name].up if view.name in status else False,
                        state=view.state,
                        weight=view.effective_weight,
                        sessions=sessions.get(view.name) if sessions is not None else None,
                    )
                self.metrics.redis_up.set(1 if self.engine.redis_available else 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # metrics must never take the agent down
                log.debug("node metrics refresh failed: %r", exc)
            await asyncio.sleep(NODE_METRICS_INTERVAL)


def run(config_path: Path) -> int:
    config = load_config(config_path)
    setup_logging(config.log_level, config.log_format)
    app = App(config, config_path)
    try:
        return asyncio.run(app.run())
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
