"""HAProxy's agent-check protocol: each broker server's operator state and weight, for HAProxy.

The shipped haproxy.cfg gives every broker server ``agent-check agent-addr A agent-port P
agent-send "NODE\\n" agent-inter 1s``: every second HAProxy connects here, sends the node
name, reads one line and applies it. So a ``drain`` set with the CLI shows as ``DRAIN`` in
HAProxy's own stats on every balancer, and HAProxy's hash fallback (used when no agent
answers the SPOE call) stops picking that broker for new clients, as the agents do.

The answer, from the node's state and its weight (:func:`reply`):

==================  ==============================================================
node state          answer
==================  ==============================================================
active              ``ready up N%``
drain, evacuate     ``drain N%``
maintenance         ``maint N%``
not configured      ``drain 0%`` (the agents never place a client there either)
==================  ==============================================================

``N%`` is the node's weight in force (the run-time override, else the configured weight)
relative to the largest weight in force among the configured nodes, so the heaviest node is
100% and HAProxy, whose ``weight`` is the same (100) on every server line, splits new clients
in the agents' proportions. HAProxy applies a percentage to the server's configured weight
and keeps integers, hence 100 there: a weight below 1% of the largest is sent as 1%, never 0.

If the agent cannot be reached, HAProxy keeps the last state and weight it was told
("Failure to connect to the agent is not considered an error"): a dead agent changes nothing.
For the same reason an agent that has not read the node states from Redis yet (started during a
Redis outage) answers nothing: ``ready`` from an empty view would undo a drain or a maintenance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.config import NodeConfig
from agent.logs import warn_limited
from agent.model import NodeState
from agent.rules import NodeOverrides
from agent.streams import close_writer

__all__ = ["AgentCheckObserver", "AgentCheckServer", "percent", "reply"]

log = logging.getLogger("mqtt_affinity.agent_check")

#: Seconds HAProxy has to send the node name (it sends it right after connecting).
READ_TIMEOUT = 2.0
#: The longest request line accepted (a node name is at most 64 characters).
MAX_LINE = 256

#: The answer's first word per node state (``unknown``: a name the config does not have).
WORDS = {
    NodeState.ACTIVE: "ready up",
    NodeState.DRAIN: "drain",
    NodeState.EVACUATE: "drain",
    NodeState.MAINTENANCE: "maint",
}
UNKNOWN = "unknown"


def percent(node: str, nodes: Sequence[NodeConfig], overrides: NodeOverrides) -> int:
    """The node's weight in force as a percentage of the largest among ``nodes`` (1..100; 0 for
    weight 0). All weights 0: 100 each, as the agents then place uniformly."""
    weights = {n.name: overrides.weights.get(n.name, n.weight) for n in nodes}
    top = max(weights.values(), default=0.0)
    w = weights.get(node, 0.0)
    if top <= 0:
        return 100
    if w <= 0:
        return 0
    return max(1, min(100, round(100 * w / top)))


def reply(node: str, nodes: Sequence[NodeConfig], overrides: NodeOverrides) -> tuple[str, str]:
    """(what to answer for ``node``, the state word for metrics)."""
    if not any(n.name == node for n in nodes):
        return "drain 0%", UNKNOWN
    state = overrides.state(node)
    return f"{WORDS[state]} {percent(node, nodes, overrides)}%", state.value


class AgentCheckObserver(Protocol):
    def agent_check(self, state: str) -> None: ...


class AgentCheckServer:
    """One TCP listener; one line in, one line out, per connection."""

    def __init__(
        self,
        host: str,
        port: int,
        nodes: Callable[[], Sequence[NodeConfig]],
        overrides: Callable[[], NodeOverrides],
        *,
        observer: AgentCheckObserver | None = None,
        ready: Callable[[], bool] = lambda: True,
        reuse_port: bool = False,
    ) -> None:
        self.host = host
        #: SO_REUSEPORT, for ``workers`` > 1 (every worker answers the same port).
        self.reuse_port = reuse_port
        self.port = port
        self._nodes = nodes
        self._overrides = overrides
        self._observer = observer
        #: False until the node states have been read from Redis once: then say nothing.
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_LINE,
                                                  reuse_port=self.reuse_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial  # a name without its newline, then EOF: answer it anyway
            except (TimeoutError, asyncio.LimitOverrunError, ValueError):
                line = b""
            node = line.decode("utf-8", "replace").strip()
            if not self._ready():
                warn_limited(log, "agent-check-not-ready", "agent-check: node states not read from Redis yet; "
                             "HAProxy keeps what it has")
                return
            if not node:
                warn_limited(log, "agent-check-empty", "agent-check: no node name received (set agent-send "
                             "\"NODE\\n\" on the HAProxy server line)")
                return
            answer, state = reply(node, self._nodes(), self._overrides())
            if state == UNKNOWN:
                warn_limited(log, f"agent-check-unknown-{node[:64]}", "agent-check for %r: not a configured node, "
                             "answered drain", node[:64])
            if self._observer is not None:
                self._observer.agent_check(state)
            writer.write(answer.encode() + b"\n")
            await writer.drain()
        except OSError:
            pass  # HAProxy gave up (agent-inter/timeout): nothing to say
        finally:
            await close_writer(writer)
