"""devstack: the product's whole topology as real processes on free local ports.

Shared by the tests (``tests/conftest.py`` fixtures), the benchmarks (``bench/``) and the
demo (``scripts/demo.py``); not part of the wheel. Modules:

- ``devstack.procs``: ``ManagedProcess`` (start/stop/kill, log file), ``free_port``,
  ``wait_until``, ``stop_all``, the errors (``ToolMissing``, ``ProcessFailed``);
- ``devstack.redis_server``, ``devstack.mosquitto``, ``devstack.haproxy``,
  ``devstack.agents``: the real processes (and the agent YAML writer);
- ``devstack.stack``: ``Stack``, the topology builder (Redis, brokers, agents, balancers);
- ``devstack.mqtt``: raw CONNECT/CONNACK over sockets, for load;
- ``devstack.records``: read and write the agents' Redis records as the agents do;
- ``devstack.scenario``: an open-loop CONNECT load and the accounting of a failure scenario
  (HAProxy logs joined with the Redis records);
- ``devstack.paho_client``: paho-mqtt clients (imported on demand: it needs paho-mqtt).
"""

from devstack.agents import AGENT_DEFAULTS, AgentProcess, agent_command, write_agent_config
from devstack.haproxy import (
    HAPROXY_CFG,
    HAPROXY_CFG_DIR,
    HAPROXY_VERSIONS,
    NATIVE_STICK_CFG,
    SPOE_CONF,
    HAProxy,
    find_haproxy,
    haproxy_binary,
    haproxy_env,
    haproxy_version_of,
    parse_log_line,
)
from devstack.mosquitto import Mosquitto
from devstack.mqtt import (
    DISCONNECT,
    connect_all_at_once,
    connect_many,
    connect_packet,
    mqtt_connect,
    raw_connect,
    read_packet,
)
from devstack.procs import (
    REPO_ROOT,
    DevstackError,
    ManagedProcess,
    ProcessFailed,
    ToolMissing,
    free_port,
    port_open,
    require_binary,
    stop_all,
    wait_until,
)
from devstack.redis_server import RedisClusterGroup, RedisServer, SentinelGroup
from devstack.stack import NODES, PREFIX, Balancer, Stack

__all__ = [
    "AGENT_DEFAULTS", "AgentProcess", "Balancer", "DISCONNECT", "DevstackError", "HAPROXY_CFG", "HAPROXY_CFG_DIR",
    "HAPROXY_VERSIONS", "HAProxy", "ManagedProcess", "Mosquitto", "NATIVE_STICK_CFG", "NODES", "PREFIX",
    "ProcessFailed", "REPO_ROOT", "RedisClusterGroup", "RedisServer", "SPOE_CONF",
    "SentinelGroup", "Stack", "ToolMissing", "agent_command",
    "connect_all_at_once", "connect_many", "connect_packet", "find_haproxy", "free_port", "haproxy_binary",
    "haproxy_env",
    "haproxy_version_of", "mqtt_connect", "parse_log_line", "port_open", "raw_connect", "read_packet",
    "require_binary", "stop_all", "wait_until", "write_agent_config",
]  # fmt: skip
