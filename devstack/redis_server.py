"""``redis-server`` as managed processes: one server, a Sentinel group, a Cluster.

A stack takes a ``redis_url``: each class here offers a ``url`` the agents can use.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import redis as redis_py

from devstack.procs import ManagedProcess, ProcessFailed, free_port, require_binary, stop_all, wait_until


class RedisServer(ManagedProcess):
    """``redis-server`` on 127.0.0.1:<port>, no persistence. ``start()`` again reuses the port."""

    name = "redis"

    def __init__(
        self, port: int | None = None, workdir: str | Path | None = None, *, extra: Sequence[str] = (),
        label: str = "",
    ) -> None:
        if label:
            self.name = f"redis-{label}"
        super().__init__(workdir)
        self.binary = require_binary("redis-server", "redis-server")
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra = list(extra)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", self.host,
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--daemonize", "no", "--logfile", "", "--protected-mode", "no", *self.extra,
        ]  # fmt: skip

    def ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> redis_py.Redis:
        return redis_py.Redis(host=self.host, port=self.port, socket_timeout=2)


class Sentinel(ManagedProcess):
    """``redis-server <conf> --sentinel`` watching one primary as service ``service``."""

    def __init__(self, primary: RedisServer, *, service: str, quorum: int, down_after_ms: int,
                 failover_timeout_ms: int, workdir: str | Path | None = None, label: str = "") -> None:
        self.name = f"sentinel-{label}" if label else "sentinel"
        super().__init__(workdir)
        self.binary = require_binary("redis-server", "redis-server")
        self.port = free_port()
        self.host = "127.0.0.1"
        self.conf = self.workdir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.workdir}\n"
            f"sentinel monitor {service} {primary.host} {primary.port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n"
        )

    def argv(self) -> list[str]:
        return [self.binary, str(self.conf), "--sentinel"]

    def ready(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis_py.RedisError:
            return False

    def client(self) -> redis_py.Redis:
        return redis_py.Redis(host=self.host, port=self.port, socket_timeout=2)


class SentinelGroup:
    """A primary, its replicas and three Sentinels (quorum 2) on free ports.

    ``url`` is the agents' ``redis+sentinel://`` URL. ``down_after_ms`` and
    ``failover_timeout_ms`` are the Sentinels' settings, kept short for tests.
    """

    def __init__(self, workdir: str | Path | None = None, *, service: str = "mymaster", replicas: int = 1,
                 sentinels: int = 3, down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sentinel-group-"))
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers = [RedisServer(workdir=self.workdir / "redis-0", label="0")]
        primary = self.servers[0]
        for i in range(1, replicas + 1):
            self.servers.append(RedisServer(workdir=self.workdir / f"redis-{i}", label=str(i),
                                            extra=["--replicaof", primary.host, str(primary.port)]))
        self.sentinels = [
            Sentinel(primary, service=service, quorum=2, down_after_ms=down_after_ms,
                     failover_timeout_ms=failover_timeout_ms, workdir=self.workdir / f"sentinel-{i}", label=str(i))
            for i in range(sentinels)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    @property
    def processes(self) -> list[ManagedProcess]:
        return [*self.servers, *self.sentinels]

    def start(self) -> SentinelGroup:
        try:
            for s in self.servers:
                s.start()
            wait_until(self._replicas_linked, timeout=15, message="replicas never linked to the primary")
            for s in self.sentinels:
                s.start()
            wait_until(self._sentinels_agree, timeout=15, message="the Sentinels never saw each other and the replica")
        except BaseException:
            self.stop()
            raise
        return self

    def _replicas_linked(self) -> bool:
        for s in self.servers[1:]:
            info = s.client().info("replication")
            if info.get("master_link_status") != "up":
                return False
        return True

    def _sentinels_agree(self) -> bool:
        for s in self.sentinels:
            try:
                m = s.client().sentinel_master(self.service)
            except redis_py.RedisError:
                return False
            if int(m.get("num-other-sentinels", 0)) < len(self.sentinels) - 1 or int(m.get("num-slaves", 0)) < 1:
                return False
        return True

    def primary(self) -> RedisServer:
        """The server the Sentinels name as primary now."""
        _, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(self.service)
        return next(s for s in self.servers if s.port == int(port))

    def replicas_in_sync(self) -> bool:
        """Every replica's offset caught up with the primary's (nothing written is missing)."""
        primary = self.primary().client().info("replication")
        return all(
            s.client().info("replication").get("slave_repl_offset") == primary.get("master_repl_offset")
            for s in self.servers if s is not self.primary()
        )

    def stop(self) -> None:
        stop_all(self.processes)


class RedisClusterGroup:
    """A Redis Cluster: ``primaries`` primaries with one replica each, made with redis-cli."""

    def __init__(self, workdir: str | Path | None = None, *, primaries: int = 3, node_timeout_ms: int = 1000) -> None:
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.node_timeout_ms = node_timeout_ms
        self.redis_cli = require_binary("redis-cli", "redis-tools")
        self.nodes = [
            RedisServer(workdir=self.workdir / f"node-{i}", label=f"c{i}", extra=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(free_port()),
            ])
            for i in range(primaries * 2)
        ]  # fmt: skip
        self.primary_count = primaries

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes[: self.primary_count])

    @property
    def processes(self) -> list[ManagedProcess]:
        return list(self.nodes)

    def start(self) -> RedisClusterGroup:
        try:
            for n in self.nodes:
                n.start()
            res = subprocess.run(
                [self.redis_cli, "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if res.returncode != 0:
                raise ProcessFailed(f"redis-cli --cluster create failed:\n{res.stdout}\n{res.stderr}")
            wait_until(self.healthy, timeout=30, message="the cluster never reached state ok")
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        """cluster_state:ok on every running node, every slot served by a running primary, and
        every replica in sync with its primary (a replica that never synced cannot be promoted)."""
        running = [n for n in self.nodes if n.running]
        try:
            if not all(n.client().cluster("info")["cluster_state"] == "ok" for n in running):
                return False
            primaries = self.primaries()
            if len(primaries) != self.primary_count:
                return False
            replicas = [n for n in running if n not in primaries]
            return all(n.client().info("replication").get("master_link_status") == "up" for n in replicas)
        except redis_py.RedisError:
            return False

    def primaries(self) -> list[RedisServer]:
        """Running nodes that serve slots as primaries, as a running node sees the cluster."""
        running = [n for n in self.nodes if n.running]
        nodes = running[0].client().cluster("nodes")
        ports = {
            int(addr.split("@")[0].rsplit(":", 1)[1])
            for addr, info in nodes.items()
            if "master" in info["flags"] and "fail" not in info["flags"] and info.get("slots")
        }
        return [n for n in running if n.port in ports]

    def stop(self) -> None:
        stop_all(self.processes)
