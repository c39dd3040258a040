"""The whole product on one machine: Redis, three brokers, two agents, two HAProxy.

Each balancer has its own agent, as in a real HA pair (an agent beside each
HAProxy); they share nothing but Redis. That is exactly the claim under test:
two independent balancers agree because the record lives in Redis.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_sync

from tests.support.mqtt import DISCONNECT, connect_packet, read_packet
from tests.support.procs import (
    HAPROXY_CFG,
    AgentProcess,
    HAProxy,
    Mosquitto,
    RedisServer,
    free_port,
    haproxy_env,
    wait_until,
)

PREFIX = "mqtt-affinity:"
NODES = ("node1", "node2", "node3")


def agent_config(
    path: Path,
    *,
    spop_port: int,
    metrics_port: int,
    redis_url: str,
    brokers: Sequence[Mosquitto],
    extra: str = "",
) -> Path:
    nodes = "\n".join(
        f"  - {{name: {name}, address: \"{b.addr}\", weight: 1}}" for name, b in zip(NODES, brokers)
    )
    path.write_text(
        f"""listen: 127.0.0.1:{spop_port}
metrics_listen: 127.0.0.1:{metrics_port}
redis_url: {redis_url}
session_ttl: 3600
redis_timeout: 0.25
state_refresh: 0.2
nodes:
{nodes}
health:
  check: tcp
  interval: 0.3
  timeout: 0.25
  rise: 2
  fall: 2
log_level: info
{extra}"""
    )
    return path


@dataclass
class Balancer:
    """One HAProxy with its own agent."""

    name: str
    haproxy: HAProxy
    agent: AgentProcess
    port: int
    spop_port: int
    metrics_port: int

    def lines(self, cid: str) -> list[dict[str, str]]:
        return [d for d in self.haproxy.traffic_log() if d["cid"] == cid]


@dataclass
class Stack:
    redis: RedisServer
    brokers: list[Mosquitto]
    balancers: list[Balancer] = field(default_factory=list)

    @property
    def r(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.redis.url, socket_timeout=2)

    def owner(self, cid: bytes | str) -> str | None:
        key = PREFIX.encode() + b"owner:" + (cid.encode() if isinstance(cid, str) else cid)
        node = self.r.hget(key, "node")
        return node.decode() if node else None

    def broker(self, node: str) -> Mosquitto:
        return self.brokers[NODES.index(node)]

    def wait_agents_see(self, node: str, up: bool, timeout: float = 15.0) -> None:
        """Poll each agent's /metrics until it reports ``node`` up or down."""
        import urllib.request

        want = f'mqtt_affinity_node_up{{node="{node}"}} {1.0 if up else 0.0}'

        def seen(b: Balancer) -> bool:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=2).read()
            except OSError:
                return False
            return want in body.decode()

        for b in self.balancers:
            wait_until(lambda b=b: seen(b), timeout=timeout, message=f"{b.name} never saw {node} up={up}")


def build_stack(
    tmp: Callable[[str], Path],
    redis: RedisServer,
    brokers: list[Mosquitto],
    haproxy_factory: Callable[..., HAProxy],
    agent_factory: Callable[..., AgentProcess],
    *,
    count: int = 2,
    agent_extra: str = "",
) -> Stack:
    stack = Stack(redis, brokers)
    for i in range(1, count + 1):
        name = f"ha{i}"
        spop, metrics, mqtt = free_port(), free_port(), free_port()
        cfg = agent_config(tmp(f"agent-{name}") / "agent.yaml", spop_port=spop, metrics_port=metrics,
                           redis_url=redis.url, brokers=brokers, extra=agent_extra)
        agent = agent_factory(cfg).wait_listening(spop)
        env = haproxy_env(mqtt_port=mqtt, broker_addrs=[b.addr for b in brokers], spoa_port=spop,
                          balancer_name=name)
        ha = haproxy_factory(HAPROXY_CFG, env, label=name)
        stack.balancers.append(Balancer(name, ha, agent, mqtt, spop, metrics))
    for b in stack.balancers:
        for node in NODES:
            b.haproxy.wait_server_status("be_mqtt", node, "UP")
        b.haproxy.wait_server_status("be_spoa", "spoa1", "UP")
    return stack


def raw_connect(port: int, cid: bytes, **kw: object) -> int:
    """CONNECT, read CONNACK, DISCONNECT; returns the CONNACK return code."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(connect_packet(cid, **kw))  # type: ignore[arg-type]
        ptype, body = read_packet(s)
        assert ptype == 2, ptype
        s.sendall(DISCONNECT)
        return body[1]


async def connect_all_at_once(targets: list[tuple[int, bytes]], **kw: object) -> list[int | None]:
    """Open every (port, client id) connection concurrently; CONNACK code, or None if the broker
    closed it first (two simultaneous CONNECTs with one id: the broker keeps one)."""

    async def one(port: int, cid: bytes) -> int | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(connect_packet(cid, **kw))  # type: ignore[arg-type]
            head = await asyncio.wait_for(reader.readexactly(4), 20)
            return head[3]
        except asyncio.IncompleteReadError:
            return None
        finally:
            try:
                writer.write(DISCONNECT)
            except Exception:
                pass
            writer.close()

    return list(await asyncio.gather(*(one(p, c) for p, c in targets)))
