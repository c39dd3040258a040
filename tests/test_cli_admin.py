"""The operator commands, run as the real ``mqtt-affinity`` console script.

Why subprocesses: exit statuses, the one-line stderr contract and the password redaction
are what an operator (and their scripts) see, so they are tested at the process boundary.
Redis is a real ``redis-server``; the "live" broker nodes are plain TCP listeners (peers the
CLI connects to, as it would to a broker), the "down" node is a closed port, and the agent's
metrics endpoint serves the exposition text of the real ``agent.metrics.Metrics``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from agent.metrics import Metrics, StateCollector
from agent.model import How
from agent.placement import choose
from agent.rules import parse_overrides
from devstack import REPO_ROOT, RedisServer, free_port, records

CLI = str(REPO_ROOT / ".venv" / "bin" / "mqtt-affinity")
P = b"mqtt-affinity:"


class _Quiet(socketserver.BaseRequestHandler):
    def handle(self) -> None:  # accept and close: all a TCP health probe needs
        pass


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    body: bytes = b""

    def do_GET(self) -> None:  # the http.server API's name
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Env:
    redis: RedisServer
    r: redis.Redis
    config: Path
    metrics_port: int
    down_port: int
    tmp: Path


def _serve(server: socketserver.BaseServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("cli-admin")
    server = RedisServer(workdir=tmp / "redis")
    server.start()
    live = [socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Quiet) for _ in range(2)]
    metrics = Metrics()
    for _ in range(3):
        metrics.record_decision(How.HIT, "node1", 0.001, None)
    metrics.record_decision(How.ASSIGNED, "node2", 0.001, None)
    metrics.record_decision(How.FALLBACK, "node1", 0.001, None)
    metrics.registry.register(StateCollector(list, lambda: True, lambda: None))
    handler = type("H", (_MetricsHandler,), {"body": metrics.render()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    servers: list[socketserver.BaseServer] = [*live, httpd]
    threads = [_serve(s) for s in servers]
    down_port = free_port()
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        "nodes:\n"
        f"  - {{name: node1, address: '127.0.0.1:{live[0].server_address[1]}', weight: 2}}\n"
        f"  - {{name: node2, address: '127.0.0.1:{live[1].server_address[1]}'}}\n"
        f"  - {{name: node3, address: '127.0.0.1:{down_port}'}}\n"
        f"redis_url: {server.url}\n"
        f"metrics_listen: 127.0.0.1:{httpd.server_address[1]}\n"
        f"listen: 127.0.0.1:{free_port()}\n"
        "evacuate_rate: 20\n"
        "health: {timeout: 0.3, interval: 1.0}\n"
    )
    client = redis.Redis.from_url(server.url)
    try:
        yield Env(server, client, cfg, httpd.server_address[1], down_port, tmp)
    finally:
        client.close()
        for s in servers:
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(5)
        server.kill()


@pytest.fixture(autouse=True)
def _clean(env: Env) -> None:
    env.r.flushall()


def run(*args: str, env_vars: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "MQTT_AFFINITY_CONFIG"}
    environ.update(env_vars or {})
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=20, env=environ)


def cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return run(*args, "--config", str(env.config))


def one_line_error(res: subprocess.CompletedProcess[str], status: int) -> str:
    assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mqtt-affinity"), lines[0]
    return lines[0]


def show_json(env: Env, *args: str) -> dict:
    res = cli(env, "show", *args, "--json")
    assert res.returncode in (0, 1), res.stderr
    return json.loads(res.stdout)


# --------------------------------------------------------------------------- pins


def test_pin_show_unpin_round_trip(env: Env) -> None:
    before = int(time.time())
    res = cli(env, "pin", "dev-1", "node1", "--ttl", "300", "--reason", "debugging")
    assert res.returncode == 0, res.stderr
    assert "node1" in res.stdout
    pin = records.pin(env.r, "dev-1")
    assert pin is not None and pin.node == "node1" and pin.reason == "debugging"
    assert before <= pin.created_at <= int(time.time())
    assert 0 < pin.expiry - time.time() <= 300

    text = cli(env, "show", "dev-1")
    assert text.returncode == 0, text.stderr
    fields = dict(line.split(":", 1) for line in text.stdout.splitlines())
    assert fields["pin"].strip() == "node1"
    assert fields["pin reason"].strip() == "debugging"
    assert fields["why"].strip() == "pinned to node1"
    assert "no record" in fields["owner"]

    doc = show_json(env, "dev-1")
    assert doc["client_id"] == "dev-1" and doc["owner"] is None
    assert doc["pin"]["node"] == "node1" and doc["pin"]["reason"] == "debugging"
    assert 0 < doc["pin"]["ttl"] <= 300
    assert doc["next"] == {"action": "pinned", "node": "node1"}

    # A re-pin without --ttl replaces the whole pin, expiry included.
    assert cli(env, "pin", "dev-1", "node2").returncode == 0
    pin = records.pin(env.r, "dev-1")
    assert pin is not None and (pin.node, pin.reason, pin.expiry) == ("node2", "", 0)
    assert show_json(env, "dev-1")["pin"]["ttl"] is None

    assert cli(env, "unpin", "dev-1").returncode == 0
    assert records.pin(env.r, "dev-1") is None
    assert "no pin" in one_line_error(cli(env, "unpin", "dev-1"), 1)
    assert "no record and no pin" in one_line_error(cli(env, "show", "dev-1"), 1)
    doc = show_json(env, "dev-1")
    assert doc["owner"] is None and doc["pin"] is None


def test_pin_refused_for_unknown_down_or_maintenance_node(env: Env) -> None:
    # an unknown node does not exist (1, as in every command); a node that exists but cannot
    # take the client is a refused request (2)
    line = one_line_error(cli(env, "pin", "dev-2", "node9"), 1)
    assert "node9" in line and "unknown" in line
    line = one_line_error(cli(env, "pin", "dev-2", "node3"), 2)
    assert "down" in line and str(env.down_port) in line
    env.r.hset(P + b"node-state", "node2", "maintenance")
    assert "maintenance" in one_line_error(cli(env, "pin", "dev-2", "node2"), 2)
    assert records.pin(env.r, "dev-2") is None
    # draining still takes pinned clients: the agent honours pins to drain nodes
    env.r.hset(P + b"node-state", "node2", "drain")
    assert cli(env, "pin", "dev-2", "node2").returncode == 0


def test_pin_written_with_redis_cli_shows_up(env: Env) -> None:
    """The key `show` prints is the one an operator can write with redis-cli."""
    keys_line = next(ln for ln in cli(env, "pin", "hand-made", "node1").stdout.splitlines() if "keys" in ln)
    pins_key = records.keys(env.r).client(b"hand-made")[1].decode()
    assert pins_key in keys_line
    cli_bin = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    subprocess.run(
        [cli_bin, "-p", str(env.redis.port), "HSET", pins_key, "hand-made", "node2|0|0|by hand"],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    res = cli(env, "show", "hand-made")
    assert res.returncode == 0, res.stderr
    assert "pinned to node2" in res.stdout and pins_key in res.stdout
    doc = show_json(env, "hand-made")
    assert doc["pin"] == {"node": "node2", "reason": "by hand", "created_at": 0, "ttl": None}


def test_show_explains_the_next_connect(env: Env) -> None:
    now = int(time.time())
    records.write_owner(env.r, "car-7", "node1", placed_at=now - 60, by="ha1", ttl=3600)

    doc = show_json(env, "car-7")
    assert doc["owner"]["node"] == "node1" and doc["owner"]["by"] == "ha1"
    assert doc["owner"]["placed_at"] == now - 60 and 3590 <= doc["owner"]["ttl"] <= 3600
    assert doc["why"] == "sticks to owner node1"
    text = cli(env, "show", "car-7").stdout
    assert "sticks to owner node1" in text and "ha1" in text

    assert doc["next"] == {"action": "stick", "node": "node1"}
    assert doc["owner"]["node_state"] == "active" and doc["owner"]["node_health"] == "up"

    # node3 is down (the closed port): the hash candidate is chosen among node1 (weight 2) and node2
    live = [("node1", 2.0), ("node2", 1.0)]
    expected = {
        "drain": ("node1 is draining: stays", "stay", "node1"),
        # the only other usable node takes it, within the evacuation budget (config: 20/s)
        "evacuate": ("node1 is evacuating: moves to node2 (within the shared budget of 20/s, else stays this time)",
                     "move", "node2"),
        "maintenance": ("node1 is in maintenance: moves to node2", "move", "node2"),
    }  # fmt: skip
    for state, (why, action, node) in expected.items():
        env.r.hset(P + b"node-state", "node1", state)
        doc = show_json(env, "car-7")
        assert (doc["why"], doc["next"]["action"], doc["next"]["node"]) == (why, action, node), state
        assert doc["owner"]["node_state"] == state
    env.r.delete(P + b"node-state")

    records.write_owner(env.r, "car-7", "node1", placed_at=now - 60, by="ha1")
    assert show_json(env, "car-7")["owner"]["ttl"] is None
    assert "never" in cli(env, "show", "car-7").stdout

    target = choose(b"car-7", live)
    records.write_owner(env.r, "car-7", "node3")  # the closed port
    doc = show_json(env, "car-7")
    assert doc["why"] == f"node3 is down: moves to {target}"
    assert doc["next"] == {"action": "move", "node": target} and doc["owner"]["node_health"] == "down"
    assert "node3 (active, down)" in cli(env, "show", "car-7").stdout
    records.write_owner(env.r, "car-7", "retired")
    assert show_json(env, "car-7")["why"] == f"retired is unknown: moves to {target}"

    records.write_owner(env.r, "car-7", "node1")
    records.write_pin(env.r, "car-7", "node3")  # pin to a down node is ignored
    doc = show_json(env, "car-7")
    assert doc["why"].startswith("pin to node3 is ignored (node3 is down)")
    assert doc["why"].endswith("sticks to owner node1")
    records.write_pin(env.r, "car-7", "node2")
    assert show_json(env, "car-7")["next"] == {"action": "pinned", "node": "node2"}

    env.r.hdel(records.keys(env.r).client(b"car-7")[0], b"car-7")
    records.write_pin(env.r, "car-7", "node3")
    doc = show_json(env, "car-7")
    assert doc["why"] == f"pin to node3 is ignored (node3 is down); no record: will be placed on {target} by hash"
    assert doc["next"] == {"action": "place", "node": target}

    # nothing usable: nobody can take it
    env.r.hset(P + b"node-state", mapping={"node1": "maintenance", "node2": "maintenance"})
    doc = show_json(env, "car-7")
    assert doc["why"].endswith("no record, and no node can take new clients")
    assert doc["next"] == {"action": "none", "node": None}


def test_show_and_nodes_when_every_node_drains(env: Env) -> None:
    """Nothing takes new clients: the agents place on the usable nodes, and the CLI says so."""
    env.r.hset(P + b"node-state", mapping={"node1": "drain", "node2": "drain"})  # node3 is down
    rows = {r["node"]: r for r in json.loads(cli(env, "nodes", "--json").stdout)["nodes"]}
    assert {n: rows[n]["effective_weight"] for n in rows} == {"node1": 2, "node2": 1, "node3": 0}
    table = {ln.split()[0]: ln.split() for ln in cli(env, "nodes").stdout.splitlines()[1:]}
    assert table["node1"] == ["node1", "drain", "2", "-", "2", "up", "-", "0"]
    assert table["node2"] == ["node2", "drain", "1", "-", "1", "up", "-", "0"]

    records.write_pin(env.r, "newbie", "node3")  # so that show has something to show
    doc = show_json(env, "newbie")
    target = choose(b"newbie", [("node1", 2.0), ("node2", 1.0)])
    assert doc["next"] == {"action": "place", "node": target}, doc

    # an evacuating owner with nowhere else to go stays
    env.r.hset(P + b"node-state", mapping={"node1": "evacuate", "node2": "maintenance"})
    records.write_owner(env.r, "newbie", "node1")
    doc = show_json(env, "newbie")
    assert doc["next"] == {"action": "stay", "node": "node1"}, doc
    assert "node1 is evacuating, but no node takes new clients" in doc["why"]


def test_binary_client_id_with_hex(env: Env) -> None:
    cid = b"\x00\xffdev\x80"
    assert cli(env, "pin", "--hex", cid.hex(), "node1", "--reason", "bin").returncode == 0
    assert records.pin(env.r, cid).node == "node1"  # type: ignore[union-attr]
    records.write_owner(env.r, cid, "node2", placed_at=1, by="ha2")
    doc = show_json(env, "--hex", cid.hex())
    assert doc["client_id_hex"] == cid.hex() and doc["client_id"] is None
    assert doc["owner"]["node"] == "node2" and doc["pin"]["node"] == "node1"
    res = cli(env, "show", "--hex", cid.hex())
    assert res.returncode == 0 and cid.hex() in res.stdout
    assert cli(env, "unpin", "--hex", cid.hex()).returncode == 0
    assert records.pin(env.r, cid) is None
    assert "hex" in one_line_error(cli(env, "show", "--hex", "zz"), 2)


# --------------------------------------------------------------------------- node state and weight


def _overrides(env: Env):  # what an agent would read, through the agent's own parser
    return parse_overrides(
        env.r.hgetall(P + b"node-state"), env.r.hgetall(P + b"node-weight"), env.r.hgetall(P + b"evacuate-rate")
    )


def test_node_state_commands_set_what_the_agent_reads(env: Env) -> None:
    assert cli(env, "drain", "node2").returncode == 0
    assert _overrides(env).states == {"node2": "drain"}
    res = cli(env, "evacuate", "node2", "--rate", "7")
    assert res.returncode == 0 and "was drain" in res.stdout and "at most 7/s" in res.stdout
    o = _overrides(env)
    assert o.states == {"node2": "evacuate"} and o.rates == {"node2": 7}
    # without --rate the configured default applies again
    res = cli(env, "evacuate", "node2")
    assert res.returncode == 0 and "was evacuate" in res.stdout and "20/s (config default)" in res.stdout
    assert _overrides(env).rates == {}
    assert cli(env, "maintenance", "node1").returncode == 0
    assert cli(env, "activate", "node2").returncode == 0
    assert _overrides(env).states == {"node1": "maintenance", "node2": "active"}

    for cmd in (["drain", "node9"], ["evacuate", "node9"], ["activate", "node9"], ["maintenance", "node9"],
                ["weight", "node9", "1"], ["weight", "node9", "--reset"], ["pin", "c", "node9"]):
        line = one_line_error(cli(env, *cmd), 1)
        assert "unknown node 'node9'" in line and "known nodes: node1, node2, node3" in line
    assert one_line_error(cli(env, "evacuate", "node1", "--rate", "0"), 2)
    assert not env.r.hexists(P + b"node-state", "node9")


def test_evacuate_says_passive_or_active_and_waits(env: Env) -> None:
    # No agent publishes connection counts: passive, and --wait follows the placed sessions.
    res = cli(env, "evacuate", "node2", "--rate", "50")
    assert res.returncode == 0, res.stderr
    assert "passive: no agent publishes connection counts" in res.stdout
    res = cli(env, "evacuate", "node2", "--wait")
    assert res.returncode == 0 and "node2 has no placed session left" in res.stdout, res.stdout
    records.write_owner(env.r, "a", "node2")
    res = cli(env, "evacuate", "node2", "--wait", "--timeout", "1")
    assert res.returncode == 1, (res.stdout, res.stderr)
    # (each look counts every bucket's records: the elapsed time it reports may pass the timeout)
    assert re.search(r"not empty after \ds: connections unknown, 1 sessions placed", res.stdout), res.stdout
    assert "--timeout goes with --wait" in one_line_error(cli(env, "evacuate", "node2", "--timeout", "3"), 2)

    # Two balancers' agents publish their HAProxy's counts (one of them stale: ignored).
    now = time.time()
    env.r.hset(P + b"conns:ha-a:10", mapping={"node1": 4, "node2": 3, "_at": now})
    env.r.hset(P + b"conns:ha-b:11", mapping={"node1": 1, "node2": 2, "_at": now})
    env.r.hset(P + b"conns:ha-c:12", mapping={"node1": 100, "node2": 100, "_at": now - 60})
    res = cli(env, "evacuate", "node2", "--rate", "100")
    assert "active: the agents of 2 balancer(s) close its client connections, at most 100/s" in res.stdout, res.stdout
    rows = {r["node"]: r for r in json.loads(cli(env, "nodes", "--json").stdout)["nodes"]}
    assert [rows[n]["connections"] for n in ("node1", "node2", "node3")] == [5, 5, 0]
    table = {ln.split()[0]: ln.split() for ln in cli(env, "nodes").stdout.splitlines()[1:]}
    assert table["node2"][6:] == ["5", "1"]  # CONNS, SESSIONS

    # --wait follows the connections, one line a second, until none is left.
    def empty_soon() -> None:
        time.sleep(1.5)
        for key in (b"conns:ha-a:10", b"conns:ha-b:11"):
            env.r.hset(P + key, mapping={"node2": 0, "_at": time.time()})

    t = threading.Thread(target=empty_soon)
    t.start()
    res = cli(env, "evacuate", "node2", "--rate", "100", "--wait")
    t.join()
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "node2: 5 client connections, 1 sessions placed" in lines[0], lines
    assert "node2: 0 client connections" in lines[-4], lines  # then the three lines of the result
    assert lines[-1].startswith("node2 has no client connection left"), lines


def test_show_and_nodes_say_when_clients_wait_for_a_restarting_owner(env: Env) -> None:
    """node3 (a closed port) went down 5 s ago by the agents: within owner_down_grace (30 s by
    default) its persistent clients wait; 100 s ago: they move."""
    records.write_owner(env.r, "car-9", "node3")
    env.r.hset(P + b"node-down", "node3", f"{time.time() - 5:.3f}")
    doc = show_json(env, "car-9")
    assert doc["next"] == {"action": "wait", "node": None}, doc
    assert doc["why"].startswith("node3 is down for less than owner_down_grace: the CONNECT is refused"), doc
    assert 4 <= time.time() - doc["owner"]["node_down_since"] < 60
    assert re.search(r"owner: +node3 \(active, down for \ds\)", cli(env, "show", "car-9").stdout)
    rows = {r["node"]: r for r in json.loads(cli(env, "nodes", "--json").stdout)["nodes"]}
    assert rows["node3"]["in_grace"] is True and rows["node1"]["in_grace"] is False
    table = {ln.split()[0]: ln for ln in cli(env, "nodes").stdout.splitlines()[1:]}
    assert re.search(r" down \ds \(grace\) ", table["node3"]), table

    # In maintenance, nobody waits for it: the operator took it out on purpose.
    env.r.hset(P + b"node-state", "node3", "maintenance")
    assert show_json(env, "car-9")["next"]["action"] == "move"
    env.r.delete(P + b"node-state")

    env.r.hset(P + b"node-down", "node3", f"{time.time() - 100:.3f}")
    doc = show_json(env, "car-9")
    assert doc["next"]["action"] == "move" and doc["why"].startswith("node3 is down: moves to"), doc
    table = {ln.split()[0]: ln for ln in cli(env, "nodes").stdout.splitlines()[1:]}
    assert re.search(r" down 10\ds ", table["node3"]) and "grace" not in table["node3"], table

    # Without a config (no probes), the agents' word is the health: node3 is down.
    env.r.hset(P + b"node-down", "node3", f"{time.time() - 2:.3f}")
    doc = json.loads(run("show", "car-9", "--json", "--redis-url", env.redis.url).stdout)
    assert doc["next"] == {"action": "wait", "node": None}, doc


def test_weight_set_and_reset(env: Env) -> None:
    assert cli(env, "weight", "node2", "2.5").returncode == 0
    assert _overrides(env).weights == {"node2": 2.5}
    assert cli(env, "weight", "node2", "0").returncode == 0
    assert _overrides(env).weights == {"node2": 0.0}
    assert cli(env, "weight", "node2", "--reset").returncode == 0
    assert not env.r.exists(P + b"node-weight")
    one_line_error(cli(env, "weight", "node2", "-1"), 2)
    assert "either a weight W or --reset" in one_line_error(cli(env, "weight", "node2"), 2)
    one_line_error(cli(env, "weight", "node2", "1", "--reset"), 2)
    one_line_error(cli(env, "weight", "node9", "1"), 1)
    assert not env.r.exists(P + b"node-weight")


def test_nodes_table_counts_live_sessions(env: Env) -> None:
    for cid, node, ttl in (("a", "node1", None), ("b", "node1", 600), ("c", "node1", 120), ("d", "node2", None),
                           ("e", "ghost", None)):
        records.write_owner(env.r, cid, node, ttl=ttl)
    k = records.keys(env.r)
    env.r.hset(k.client(b"old1")[0], b"old1", b"node1|1|1|x")  # expired
    env.r.hset(P + b"node-state", "node2", "drain")
    env.r.hset(P + b"node-weight", "node1", "4")

    # The agents' last count (none yet), then a count now: expired records are not sessions.
    doc = json.loads(cli(env, "nodes", "--json").stdout)
    assert doc["sessions_counted_at"] is None and all(r["sessions"] == 0 for r in doc["nodes"])
    assert "not counted yet" in cli(env, "nodes").stdout
    doc = json.loads(cli(env, "nodes", "--json", "--count").stdout)
    assert abs(doc["sessions_counted_at"] - time.time()) < 30
    assert env.r.hget(k.client(b"old1")[0], b"old1") is None  # the sweep removed it
    rows = {r["node"]: r for r in json.loads(cli(env, "nodes", "--json").stdout)["nodes"]}
    assert [rows[n]["sessions"] for n in ("node1", "node2", "node3", "ghost")] == [3, 1, 0, 1]
    assert [rows[n]["health"] for n in ("node1", "node2", "node3")] == ["up", "up", "down"]
    assert rows["node1"]["configured_weight"] == 2 and rows["node1"]["weight_override"] == 4
    assert rows["node1"]["effective_weight"] == 4
    assert rows["node2"]["state"] == "drain" and rows["node2"]["effective_weight"] == 0
    assert rows["node3"]["effective_weight"] == 0  # down
    assert rows["ghost"]["configured"] is False

    res = cli(env, "nodes")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "WEIGHT", "OVERRIDE", "EFFECTIVE", "HEALTH", "CONNS", "SESSIONS"]
    table = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert table["node1"] == ["node1", "active", "2", "4", "4", "up", "-", "3"]
    assert table["node2"] == ["node2", "drain", "1", "-", "0", "up", "-", "1"]
    assert table["node3"] == ["node3", "active", "1", "-", "0", "down", "-", "0"]
    assert "no agent publishes connection counts" in res.stdout
    # the columns line up: every row has the SESSIONS cell at the header's column
    col = lines[0].index("SESSIONS")
    assert all(ln[col:].strip().isdigit() for ln in lines[1:4])

    # --redis-url alone: nodes are what Redis names, and those are valid targets
    url_only = ("--redis-url", env.redis.url)
    rows = {r["node"]: r for r in json.loads(run("nodes", "--json", *url_only).stdout)["nodes"]}
    assert set(rows) == {"node1", "node2", "ghost"} and rows["ghost"]["health"] == "unknown"
    assert rows["ghost"]["configured"] is False and rows["ghost"]["configured_weight"] is None
    assert rows["node1"]["effective_weight"] == 4 and rows["node2"]["effective_weight"] == 0
    assert "(no --config" in run("nodes", *url_only).stdout
    assert run("pin", "x", "ghost", *url_only).returncode == 0
    one_line_error(run("pin", "x", "node3", *url_only), 1)  # not named in Redis: unknown
    one_line_error(run("drain", "node3", *url_only), 1)
    # without a config the hash candidate is not named: the node list and weights are a guess
    records.write_owner(env.r, "x", "gone")
    doc = json.loads(run("show", "x", "--json", *url_only).stdout)
    assert doc["next"] == {"action": "pinned", "node": "ghost"}
    records.delete_pin(env.r, "x")
    doc = json.loads(run("show", "x", "--json", *url_only).stdout)
    assert doc["why"] == "gone is unknown: moves to a node chosen by hash"
    assert doc["next"] == {"action": "move", "node": None}


def test_stats_with_and_without_agent_metrics(env: Env) -> None:
    for i in range(4):
        records.write_owner(env.r, f"c{i}", "node1")
    records.write_pin(env.r, "c0", "node2")
    env.r.hset(P + b"node-state", "node3", "maintenance")

    doc = json.loads(cli(env, "stats", "--json", "--count").stdout)
    assert doc["records"] == 4 and doc["pins"] == 1 and doc["sessions_total"] == 4
    assert doc["nodes"]["node1"] == {"state": "active", "sessions": 4}
    assert doc["nodes"]["node3"]["state"] == "maintenance"
    m = doc["agent_metrics"]
    assert m["reachable"] is True
    assert m["decisions"]["hit"] == 3 and m["decisions"]["assigned"] == 1
    assert m["fallbacks"] == 1 and m["redis_up"] == 1

    res = cli(env, "stats")
    assert res.returncode == 0 and "decisions hit" in res.stdout

    closed = f"http://127.0.0.1:{env.down_port}/metrics"
    res = cli(env, "stats", "--metrics-url", closed)
    assert res.returncode == 0, res.stderr
    assert "agent metrics: unreachable" in res.stdout
    doc = json.loads(cli(env, "stats", "--json", "--metrics-url", closed).stdout)
    assert doc["agent_metrics"]["reachable"] is False and doc["agent_metrics"]["url"] == closed


# --------------------------------------------------------------------------- usage and failures


def test_bad_usage_exits_2(env: Env) -> None:
    one_line_error(cli(env, "pin", "only-a-client-id"), 2)
    one_line_error(cli(env, "pin", "c", "node1", "--ttl", "0"), 2)
    one_line_error(cli(env, "show", ""), 2)
    line = one_line_error(run("nodes"), 2)  # no --config, no --redis-url, no env var
    assert "--config" in line
    bad = env.tmp / "bad.yaml"
    bad.write_text("nodes: []\n")
    assert "config error" in one_line_error(run("nodes", "--config", str(bad)), 2)
    # a bad Redis URL: on the command line, or in the config
    line = one_line_error(run("nodes", "--redis-url", "redis://u:pw-123@h/abc"), 2)
    assert line.startswith("mqtt-affinity: invalid Redis URL redis://u:***@h/abc: ") and "pw-123" not in line
    bad.write_text(env.config.read_text().replace(env.redis.url, "redis://h/abc"))
    assert "config error: redis_url: database must be a number" in one_line_error(run("nodes", "--config", str(bad)), 2)
    # the environment variable stands in for --config
    res = run("nodes", "--json", env_vars={"MQTT_AFFINITY_CONFIG": str(env.config)})
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["nodes"]) == 3


def test_unreachable_redis_exits_1_without_leaking_the_password(env: Env) -> None:
    port = free_port()
    url = f"redis://admin:s3cret-pw@127.0.0.1:{port}/0"
    for args in (["nodes"], ["show", "x"], ["pin", "x", "node1"], ["drain", "node1"]):
        res = run(*args, "--redis-url", url)
        line = one_line_error(res, 1)
        assert line.startswith(f"mqtt-affinity: cannot reach Redis at redis://admin:***@127.0.0.1:{port}/0: ")
        assert "s3cret" not in res.stderr + res.stdout
    # the same through a config file's redis_url
    cfg = env.tmp / "unreachable.yaml"
    cfg.write_text(env.config.read_text().replace(env.redis.url, f"redis://:s3cret-pw@127.0.0.1:{port}/0"))
    res = run("stats", "--config", str(cfg))
    assert "cannot reach Redis at redis://:***@" in one_line_error(res, 1)
    assert "s3cret" not in res.stderr + res.stdout


def test_a_redis_error_is_one_line_and_status_1(env: Env) -> None:
    env.r.set(P + b"node-state", "not a hash")
    line = one_line_error(cli(env, "nodes"), 1)
    assert line.startswith(f"mqtt-affinity: Redis error at {env.redis.url}: ") and "WRONGTYPE" in line, line


# --------------------------------------------------------------------------- in process


def test_failures_map_to_exit_codes_in_one_place() -> None:
    from agent.admin.errors import CommandError, failure
    from agent.config import ConfigError
    from agent.endpoint import EndpointError
    from agent.model import ExitCode

    url = "redis://u:s3cret@h:1/0"
    cases = {
        CommandError(ExitCode.NOT_FOUND, "no pin\nfor x"): (ExitCode.NOT_FOUND, "no pin for x"),
        ConfigError("nodes", "empty"): (ExitCode.USAGE, "config error: nodes: empty"),
        EndpointError("bad"): (ExitCode.USAGE, "invalid Redis URL redis://u:***@h:1/0: bad"),
        redis.ConnectionError("refused s3cret"): (ExitCode.NOT_FOUND,
                                                  "cannot reach Redis at redis://u:***@h:1/0: refused ***"),
        redis.TimeoutError("slow"): (ExitCode.NOT_FOUND, "cannot reach Redis at redis://u:***@h:1/0: slow"),
        redis.ResponseError("WRONGTYPE x"): (ExitCode.NOT_FOUND, "Redis error at redis://u:***@h:1/0: WRONGTYPE x"),
    }  # fmt: skip
    for exc, expected in cases.items():
        assert failure(exc, url) == expected, exc
    assert failure(KeyError("a bug")) is None  # not an expected failure: the traceback stays


def test_every_command_of_the_table_is_registered() -> None:
    from agent import cli
    from agent.admin import COMMANDS

    parser = cli.build_parser()
    for c in COMMANDS:
        args = {"pin": ["c", "n"], "unpin": ["c"], "show": ["c"], "weight": ["n", "1"]}.get(c.name, ["n"])
        if c.name in ("nodes", "stats", "migrate"):
            args = []
        ns = parser.parse_args([c.name, *args])
        assert ns.command == c.name and callable(ns.handler)
        assert hasattr(ns, "json") == (c.json is not None), c.name


def test_a_broken_admin_package_is_not_silently_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    import agent

    monkeypatch.setitem(sys.modules, "agent.admin", None)  # what a broken install looks like
    monkeypatch.delattr(agent, "admin", raising=False)
    monkeypatch.delitem(sys.modules, "agent.cli", raising=False)
    with pytest.raises(ImportError):  # at import, or at the latest when the commands are registered
        importlib.import_module("agent.cli").build_parser()


def test_migrate_command(env: Env) -> None:
    env.r.hset(P + b"owner:v1-client", mapping={"node": "node2", "placed_at": 5, "by": "old"})
    env.r.zadd(P + b"placed:node2", {"v1-client": 1e18})
    res = cli(env, "migrate", "--dry-run")
    assert res.returncode == 0 and "would move 1 owner records and 0 pins" in res.stdout, res.stdout
    assert env.r.exists(P + b"owner:v1-client")
    doc = show_json(env, "v1-client")  # not moved yet: shown as the agents would read it through
    assert doc["owner"]["node"] == "node2"
    res = cli(env, "migrate")
    assert res.returncode == 0 and "moved 1 owner records" in res.stdout, res.stdout
    assert not env.r.exists(P + b"owner:v1-client", P + b"placed:node2")
    assert records.owner(env.r, "v1-client").node == "node2"  # type: ignore[union-attr]
    assert env.r.hget(P + b"layout", "v1") == b"gone"
