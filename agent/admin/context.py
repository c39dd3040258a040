"""Where the operator commands act: one Redis, one key prefix, and (ideally) the agent's config.

Finding Redis: ``--config FILE`` (the agent YAML; preferred, because it also gives the node
list, addresses, weights, ``evacuate_rate`` and ``metrics_listen``), or ``--redis-url URL``
(+ ``--key-prefix``), or else the ``MQTT_AFFINITY_CONFIG`` environment variable. Given both,
``--redis-url``/``--key-prefix`` override the config's values.

With ``--redis-url`` alone there is no node list: a node is then "known" if Redis names it
(``P node-state``, ``P node-weight`` or a ``P placed:<node>`` key), and node health cannot be
probed (no addresses).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.admin.access import RedisAccess
from agent.admin.errors import CommandError
from agent.admin.explain import GuessedNode
from agent.admin.probe import DEFAULT_PROBE_TIMEOUT, probe, probe_many
from agent.config import Config, ConfigError, load_config
from agent.endpoint import EndpointError, RedisEndpoint
from agent.model import DEFAULT_PREFIX, ExitCode, Keys
from agent.rules import NodeLike

__all__ = ["CONFIG_ENV", "Context", "open_context"]

CONFIG_ENV = "MQTT_AFFINITY_CONFIG"
_DEFAULTS = Config(nodes=())


@dataclass
class Context:
    url: str
    redis: RedisAccess
    config: Config | None = None
    _known: frozenset[str] | None = field(default=None, repr=False)

    @property
    def exact(self) -> bool:
        """The node list is the agents' own (a config was given)."""
        return self.config is not None

    def known_nodes(self) -> frozenset[str]:
        """The nodes a command may act on: the config's, else what Redis names."""
        if self._known is None:
            if self.config is not None:
                self._known = frozenset(n.name for n in self.config.nodes)
            else:
                self._known = frozenset(self.redis.named_nodes())
        return self._known

    def require_node(self, node: str) -> None:
        """An unknown node does not exist: status 1, whatever the command."""
        known = self.known_nodes()
        if node in known:
            return
        if self.config is not None:
            where = "the config"
        else:
            where = "Redis (node-state, node-weight or placed:*; pass --config for the configured list)"
        raise CommandError(
            ExitCode.NOT_FOUND,
            f"unknown node {node!r}: not in {where}; known nodes: {', '.join(sorted(known)) or 'none'}",
        )

    def rule_nodes(self) -> Sequence[NodeLike]:
        """The node list the rules run on: the config's, else the names Redis holds (a guess)."""
        if self.config is not None:
            return self.config.nodes
        return [GuessedNode(name) for name in sorted(self.known_nodes())]

    @property
    def default_rate(self) -> int | None:
        return self.config.evacuate_rate if self.config is not None else None

    @property
    def grace(self) -> float:
        """``owner_down_grace``: the config's, else the agents' default."""
        return (self.config or _DEFAULTS).owner_down_grace

    @property
    def probe_timeout(self) -> float:
        return self.config.health.timeout if self.config is not None else DEFAULT_PROBE_TIMEOUT

    def address(self, node: str) -> tuple[str, int] | None:
        nc = self.config.node(node) if self.config is not None else None
        return (nc.host, nc.port) if nc is not None else None

    def probe(self, node: str) -> bool | None:
        """One TCP connect to the node's configured address (None: no address)."""
        return probe(self.address(node), self.probe_timeout)

    def probe_configured(self) -> dict[str, bool | None]:
        """Every configured node, probed in parallel (empty without a config)."""
        if self.config is None:
            return {}
        return probe_many({n.name: (n.host, n.port) for n in self.config.nodes}, self.probe_timeout)

    def close(self) -> None:
        self.redis.close()


def open_context(args: argparse.Namespace) -> Context:
    """Load the config, validate the Redis URL, make a client (which connects on first use)."""
    config: Config | None = None
    config_path: str | None = args.config
    if config_path is None and args.redis_url is None:
        config_path = os.environ.get(CONFIG_ENV) or None
        if config_path is None:
            raise CommandError(
                ExitCode.USAGE, f"no Redis to talk to: pass --config FILE or --redis-url URL (or set {CONFIG_ENV})"
            )
    if config_path is not None:
        config = load_config(config_path)
    url: str = args.redis_url or (config.redis_url if config is not None else "")
    try:
        endpoint = RedisEndpoint.parse(url)
    except EndpointError as exc:
        if args.redis_url is None:  # the config's redis_url: a config error, as the agent reports it
            raise ConfigError("redis_url", str(exc)) from None
        raise
    prefix = args.key_prefix or (config.key_prefix if config is not None else DEFAULT_PREFIX)
    return Context(url=url, redis=RedisAccess.connect(endpoint, Keys(prefix)), config=config)
