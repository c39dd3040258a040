"""The whole product on one machine: Redis, N brokers, agents and N balancers.

A balancer is one HAProxy running the shipped haproxy.cfg; by default each has its own
agent, as in a real HA pair, and the agents share nothing but Redis. ``start()`` builds the
shipped deployment shape: each balancer asks its own agent and has the next balancer's
agent as backup (a ring: ha1 -> ha2's agent, ha2 -> ha1's). Agents and balancers are
started separately (``start_agent``, ``start_balancer``), so a balancer can be given any
list of agents (its own first): HAProxy gets their addresses as SPOA_ADDR, SPOA_PEER_ADDR, ...

    with Stack("3.2", workdir=path) as stack:     # close() on exit stops what it started
        stack.start(balancers=2)                  # Redis, node1..node3, ha1/ha2 + their agents
        ha1, ha2 = stack.balancers
        raw_connect(ha1.port, b"client-1", version=4, clean=False)
        stack.owner("client-1")                   # -> "node2"

The stack works on a ``redis_url``: its own ``RedisServer`` (``start_redis``, what ``start``
does when given neither), one passed in (``redis=``, e.g. a pytest fixture's), or any URL
the agents accept (``redis_url=``, e.g. a Sentinel or Cluster set up beside it). Processes
passed in (``redis=``, ``brokers=``) are used, never stopped: their owner does that.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_py

from agent.endpoint import RedisEndpoint
from devstack import records
from devstack.agents import AgentProcess, write_agent_config
from devstack.haproxy import HAPROXY_CFG, HAProxy, haproxy_env
from devstack.mosquitto import Mosquitto
from devstack.procs import ManagedProcess, free_port, stop_all, wait_until
from devstack.redis_server import RedisServer

PREFIX = "mqtt-affinity:"  # the agents' default key_prefix
NODES = ("node1", "node2", "node3")  # haproxy.cfg's server names


@dataclass
class Balancer:
    """One HAProxy and the agents it asks (its own first)."""

    name: str
    haproxy: HAProxy
    agents: list[AgentProcess] = field(default_factory=list)
    port: int = 0  # where MQTT clients connect

    @property
    def agent(self) -> AgentProcess:
        """Its own agent (the first it asks)."""
        if not self.agents:
            raise LookupError(f"balancer {self.name} has no agent")
        return self.agents[0]

    @property
    def spop_port(self) -> int | None:
        return self.agent.spop_port

    @property
    def metrics_port(self) -> int | None:
        return self.agent.metrics_port

    def lines(self, cid: str) -> list[dict[str, str]]:
        """Its traffic log lines for client id ``cid``, oldest first."""
        return [d for d in self.haproxy.traffic_log() if d["cid"] == cid]

    def wait_line(self, cid: str, seen_before: int = 0, timeout: float = 5.0) -> dict[str, str]:
        """The first log line for ``cid`` after the ``seen_before`` that existed earlier.

        HAProxy logs a connection when it closes: count the lines, connect, close, then wait.
        """

        def new() -> dict[str, str] | None:
            lines = self.lines(cid)
            return lines[seen_before] if len(lines) > seen_before else None

        return wait_until(new, timeout=timeout,
                          message=lambda: f"HAProxy {self.name} did not log the connection of {cid!r} within "
                          f"{timeout}s:\n{self.haproxy.log_text()[-2000:]}")


class Stack:
    """Builds the topology piece by piece, and stops (``close()``) everything it started.

    ``workdir``: a folder (one subfolder per process is made in it; default: a new
    temporary folder, kept) or a callable name -> fresh folder (pytest's ``tmp_workdir``).
    ``agent_overrides``: top-level keys for every agent YAML (see ``write_agent_config``).
    ``die_with_parent``: processes get SIGTERM if this process dies without closing the stack.
    ``redis_client``: a factory for ``r`` (default: redis-py ``from_url(redis_url)``).
    """

    def __init__(
        self,
        haproxy_version: str = "3.2",
        *,
        workdir: str | Path | Callable[[str], Path] | None = None,
        redis_url: str | None = None,
        redis: RedisServer | None = None,
        brokers: Sequence[Mosquitto] = (),
        nodes: Sequence[str] = NODES,
        haproxy_binary: str | None = None,
        agent_overrides: Mapping[str, object] | None = None,
        die_with_parent: bool = False,
        redis_client: Callable[[], redis_py.Redis] | None = None,
    ) -> None:
        if redis is not None and redis_url is not None:
            raise ValueError("give redis or redis_url, not both")
        self.haproxy_version = haproxy_version
        self.haproxy_binary = haproxy_binary
        self.redis = redis
        self._redis_url = redis_url
        self.brokers: list[Mosquitto] = list(brokers)
        self.nodes = tuple(nodes)
        self.agent_overrides = dict(agent_overrides or {})
        self.die_with_parent = die_with_parent
        self._redis_client = redis_client
        self.agents: dict[str, AgentProcess] = {}
        self.balancers: list[Balancer] = []
        self.processes: list[ManagedProcess] = []  # what this stack started, in order
        self._socket_dirs: list[Path] = []  # short folders for unix sockets, removed at close()
        self._claimed: set[Path] = set()  # agents' haproxy_socket paths a balancer has taken
        if callable(workdir):
            self.workdir: Path | None = None
            self._make_dir: Callable[[str], Path] = workdir
        else:
            self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="devstack-"))
            self._make_dir = self._subdir

    def _subdir(self, name: str) -> Path:
        assert self.workdir is not None
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _start(self, proc: ManagedProcess) -> None:
        """Start ``proc`` and remember it for close() (a process that fails to start stops itself)."""
        proc.die_with_parent = self.die_with_parent
        proc.start()
        self.processes.append(proc)

    # ------------------------------------------------------------------ building blocks

    @property
    def redis_url(self) -> str:
        if self._redis_url is not None:
            return self._redis_url
        if self.redis is not None:
            return self.redis.url
        raise LookupError("the stack has no Redis yet: start_redis(), or pass redis= or redis_url=")

    def start_redis(self) -> RedisServer:
        """A redis-server of its own (only when given neither ``redis`` nor ``redis_url``)."""
        if self.redis is not None or self._redis_url is not None:
            raise RuntimeError(f"the stack already has Redis at {self.redis_url}")
        redis = RedisServer(workdir=self._make_dir("redis"))
        self._start(redis)
        self.redis = redis
        return redis

    def start_brokers(self, *, persistence: bool = False) -> list[Mosquitto]:
        """A mosquitto broker for each node that has none yet; returns the new ones."""
        new = []
        for node in self.nodes[len(self.brokers):]:
            broker = Mosquitto(workdir=self._make_dir(node), label=node, persistence=persistence)
            self._start(broker)
            self.brokers.append(broker)
            new.append(broker)
        return new

    def start_agent(self, name: str, *, overrides: Mapping[str, object] | None = None,
                    wait: bool = True) -> AgentProcess:
        """An agent called ``name`` for every node's broker, on free ports; ``wait``: until it listens."""
        if name in self.agents:
            raise ValueError(f"agent {name} exists already")
        if len(self.brokers) != len(self.nodes):
            raise RuntimeError(f"{len(self.brokers)} brokers for {len(self.nodes)} nodes: start_brokers() first")
        spop, metrics, agent_check = free_port(), free_port(), free_port()
        workdir = self._make_dir(f"agent-{name}")
        # The runtime API socket of the first balancer that asks this agent (started later): the
        # agent evacuates through it and publishes its connection counts.
        sock = self._socket_path(workdir, "haproxy.sock")
        keys: dict[str, object] = {"agent_check_listen": f"127.0.0.1:{agent_check}", "haproxy_socket": str(sock)}
        keys.update({**self.agent_overrides, **(overrides or {})})
        for key in ("agent_check_listen", "haproxy_socket"):  # None: off (not: the agent's default)
            if keys[key] is None or keys[key] == "null":
                keys[key] = "null"
        cfg = write_agent_config(
            workdir / "agent.yaml", spop_port=spop, metrics_port=metrics, redis_url=self.redis_url,
            nodes=[(node, b.addr) for node, b in zip(self.nodes, self.brokers)], overrides=keys,
        )
        agent = AgentProcess(cfg, workdir=workdir, label=name, spop_port=spop, metrics_port=metrics,
                             agent_check_port=agent_check if keys["agent_check_listen"] != "null" else None,
                             haproxy_socket=sock if keys["haproxy_socket"] != "null" else None)
        self._start(agent)
        self.agents[name] = agent
        if wait:
            agent.wait_listening()
        return agent

    def start_balancer(
        self,
        name: str,
        *,
        agents: Iterable[AgentProcess] | None = None,
        cfg_path: str | Path = HAPROXY_CFG,
        env: Mapping[str, str] | None = None,
        wait: bool = False,
    ) -> Balancer:
        """HAProxy ``name`` on a free MQTT port, asking ``agents`` (default: the agent called
        ``name``, if any). ``env`` adds to ``haproxy_env``; ``wait``: see ``wait_ready``."""
        if agents is None:
            agents = [self.agents[name]] if name in self.agents else []
        agents = list(agents)
        port = free_port()
        own = agents[0] if agents else None
        hap_env = haproxy_env(mqtt_port=port, broker_addrs=[b.addr for b in self.brokers],
                              spoa_addrs=[a.addr for a in agents], balancer_name=name,
                              agent_check_port=getattr(own, "agent_check_port", None), extra=env)
        # Its own agent was told where its balancer's runtime API is: the first balancer to ask
        # that agent puts its socket there. (The benchmarks' stand-in agents have neither.)
        own_sock = getattr(own, "haproxy_socket", None)
        sock = own_sock if own_sock is not None and own_sock not in self._claimed else None
        if sock is not None:
            self._claimed.add(sock)
        ha = HAProxy(self.haproxy_version, cfg_path, hap_env, workdir=self._make_dir(f"haproxy-{name}"),
                     label=name, binary=self.haproxy_binary, stats_socket=sock)
        self._start(ha)
        balancer = Balancer(name, ha, agents, port)
        self.balancers.append(balancer)
        if wait:
            self.wait_balancer_ready(balancer)
        return balancer

    def _socket_path(self, workdir: Path, name: str) -> Path:
        """``workdir/name``, or the same name in a short temporary folder when that path is too
        long for AF_UNIX (108 bytes)."""
        path = workdir / name
        if len(str(path)) <= 100:
            return path
        short = Path(tempfile.mkdtemp(prefix="devstack-sock-"))
        self._socket_dirs.append(short)
        return short / name

    def wait_balancer_ready(self, balancer: Balancer, timeout: float = 10.0) -> None:
        """Until HAProxy sees every broker UP and, if it asks agents, every agent server UP."""
        ha = balancer.haproxy
        for node in self.nodes:
            ha.wait_server_status("be_mqtt", node, "UP", timeout=timeout)
        if balancer.agents:
            for server in ha.servers("be_spoa"):
                ha.wait_server_status("be_spoa", server, "UP", timeout=timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        for balancer in self.balancers:
            self.wait_balancer_ready(balancer, timeout)

    def start(self, balancers: int = 2) -> Stack:
        """Everything missing: Redis, the brokers, then ``balancers`` agents ha1..haN and
        their HAProxy, each asking its own agent first and the next one's as backup (with
        two or more); returns once every HAProxy sees brokers and agents UP. Stops what it
        started if that fails."""
        try:
            if self.redis is None and self._redis_url is None:
                self.start_redis()
            self.start_brokers()
            names = [f"ha{i}" for i in range(1, balancers + 1)]
            for name in names:
                self.start_agent(name)
            for i, name in enumerate(names):
                ring = [self.agents[name]]
                if balancers > 1:
                    ring.append(self.agents[names[(i + 1) % balancers]])
                self.start_balancer(name, agents=ring)
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop what this stack started: HAProxy first (no new connections), then the agents,
        the brokers, Redis. Safe to call twice."""
        tiers: list[list[ManagedProcess]] = [[], [], []]
        for p in self.processes:
            tiers[0 if isinstance(p, HAProxy) else 1 if isinstance(p, AgentProcess) else 2].append(p)
        for tier, timeout in zip(tiers, (5.0, 10.0, 10.0)):
            stop_all(tier, timeout=timeout)
        for d in self._socket_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ looking at it

    def exited(self) -> list[str]:
        """Names of the processes it started that have exited without being stopped."""
        return [p.name for p in self.processes if p.proc is not None and p.proc.poll() is not None]

    @property
    def r(self) -> redis_py.Redis:
        """A new synchronous Redis client (use it in ``with`` to close it): the agents' own
        client for their URL, so a Sentinel or Cluster URL works too."""
        if self._redis_client is not None:
            return self._redis_client()
        client: redis_py.Redis = RedisEndpoint.parse(self.redis_url).sync_client(socket_timeout=2)
        return client

    def owner(self, cid: bytes | str) -> str | None:
        """The node the Redis record of ``cid`` names, or None."""
        return self.owners([cid])[cid.decode() if isinstance(cid, bytes) else cid]

    def owners(self, cids: Iterable[bytes | str]) -> dict[str, str | None]:
        """``owner`` for many client ids in one round trip, keyed by the id as str."""
        with self.r as r:
            return records.owners(r, cids, PREFIX)

    def broker(self, node: str) -> Mosquitto:
        return self.brokers[self.nodes.index(node)]

    def wait_agents_see(self, node: str, up: bool, timeout: float = 15.0) -> None:
        """Poll each agent's /metrics until it reports ``node`` up or down."""
        want = f'mqtt_affinity_node_up{{node="{node}"}} {1.0 if up else 0.0}'

        def seen(agent: AgentProcess) -> bool:
            try:
                return want in agent.metrics_text()
            except OSError:
                return False

        for agent in self.agents.values():
            wait_until(lambda a=agent: seen(a), timeout=timeout, message=f"{agent.name} never saw {node} up={up}")
