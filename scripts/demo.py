#!/usr/bin/env python3
"""A live demonstration of mqtt-affinity: `make demo`.

Starts, on free ports of this machine: Redis, three mosquitto brokers (node1..node3) and two
balancers, ha1 and ha2, each an HAProxy running the shipped haproxy/haproxy.cfg with its own
mqtt-affinity agent; the agents share nothing but Redis. Then it walks through placement,
a persistent session surviving a balancer switch, pins, draining, a rolling restart of the
brokers and a broker failure, checking every claim against the HAProxy logs, Redis and the
`mqtt-affinity` CLI.

Exit status: 0 everything behaved as shown; 1 a step's expectation failed (the run's logs are
kept under .demo/); 2 a required program is missing; 130/143 interrupted (SIGINT/SIGTERM).
Everything it started is stopped on exit, on Ctrl-C and on SIGTERM.

    .venv/bin/python scripts/demo.py [--haproxy 3.2|2.6|PATH] [--keep] [--no-restart] [--no-failure]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # the repo root (devstack, agent) and scripts/ (demo_support)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

try:
    import devstack
    from agent import placement
    from devstack import DISCONNECT, NODES, Balancer, DevstackError, Mosquitto, Stack, ToolMissing
    from devstack.mqtt import connect_packet, read_packet
    from devstack.paho_client import Fleet, SessionClient, connect_once, publish_direct, publish_many
except ImportError as exc:  # pragma: no cover - a machine without `make bootstrap`
    print(f"demo: {exc}: run `make bootstrap` and start the demo with .venv/bin/python (or `make demo`)",
          file=sys.stderr)
    sys.exit(2)

from demo_support import DemoError, Interrupted, Out, expect, rel, tail, wait_for  # noqa: E402

SESSION_EXPIRY = 300  # seconds, MQTT 5 clients
CLIENTS = [  # (client id, MQTT protocol): all keep a session on the broker
    ("sensor-01", "3.1.1"),
    ("sensor-02", "5"),
    ("sensor-03", "3.1.1"),
    ("sensor-04", "5"),
    ("sensor-05", "3.1.1"),
    ("sensor-06", "5"),
]
INBOX = "inbox-reader"
NEWCOMERS = [f"new-{i:02d}" for i in range(1, 13)]
MAX_RUN_DIRS = 5
# The demo's agents wait this long for a restarting owner (owner_down_grace; default 30 s) so
# that step 6 (a broker that does not come back) fits in a few seconds. Step 5's restarts are
# shorter than this.
DEMO_GRACE = 6
RESTART_DOWN = 2.0  # seconds each broker is stopped in the rolling restart


class Demo:
    def __init__(self, out: Out, haproxy_bin: str, haproxy_version: str, run_dir: Path) -> None:
        self.out = out
        self.haproxy_bin = haproxy_bin
        self.haproxy_version = haproxy_version
        self.run_dir = run_dir
        # die_with_parent: even a SIGKILLed demo leaves no process behind.
        self.stack = Stack(haproxy_version, workdir=run_dir, haproxy_binary=haproxy_bin, die_with_parent=True,
                           agent_overrides={"owner_down_grace": DEMO_GRACE})
        self.shown: list[str] = []
        self.session_present: bool | None = None  # of the last via()

    # ------------------------------------------------------------------ stack

    def start(self) -> None:
        """Redis, node1..node3, ha1 and ha2 each with its agent, on free ports; retried once by
        main() (a port can be taken in between). Stops what it started if it fails. The brokers keep
        their sessions on disk (persistence true), as brokers that are restarted for upgrades do."""
        try:
            self.stack.start_redis()
            self.stack.start_brokers(persistence=True)
        except BaseException:
            self.stack.close()
            raise
        self.stack.start(balancers=2)

    def describe(self, seconds: float) -> None:
        out = self.out
        redis = self.stack.redis
        assert redis is not None
        rows = [["redis", f"127.0.0.1:{redis.port}", "the shared placement store"]]
        rows += [[b.label, b.addr, "mosquitto broker"] for b in self.stack.brokers]
        for bal in self.stack.balancers:
            rows.append([bal.name, f"127.0.0.1:{bal.port}",
                         f"HAProxy {self.haproxy_version} + its own agent (SPOP :{bal.spop_port}, "
                         f"metrics :{bal.metrics_port})"])
        out.table(["PROCESS", "LISTENS ON", "ROLE"], rows)
        out.ok(f"both balancers see node1..node3 and their agent UP ({seconds:.1f}s); "
               f"logs in {rel(self.run_dir)}/")

    def stop(self) -> None:
        self.stack.close()  # HAProxy first (no new connections), then the agents, brokers, Redis

    def owner(self, cid: str) -> str | None:
        return self.stack.owner(cid)

    def broker(self, node: str) -> Mosquitto:
        return self.stack.broker(node)

    @property
    def balancers(self) -> list[Balancer]:
        return self.stack.balancers

    @property
    def ha1(self) -> Balancer:
        return self.balancers[0]

    @property
    def ha2(self) -> Balancer:
        return self.balancers[1]

    # ------------------------------------------------------------------ helpers

    def via(self, bal: Balancer, cid: str, protocol: str) -> dict[str, str]:
        """Connect ``cid`` through ``bal`` (keeping its session) and return HAProxy's log line for it."""
        before = len(bal.lines(cid))
        try:
            res = connect_once(bal.port, cid, protocol=protocol, clean=False,
                               session_expiry=SESSION_EXPIRY if protocol == "5" else None)
        except (OSError, TimeoutError) as exc:
            raise DemoError(f"{cid}: no CONNACK through {bal.name} (port {bal.port}): {exc}") from None
        if not res.ok:
            raise DemoError(f"{cid}: {bal.name} (port {bal.port}) refused the CONNECT (reason {res.reason_code})")
        self.session_present = res.session_present
        return self.line(bal, cid, before)

    @staticmethod
    def line(bal: Balancer, cid: str, before: int) -> dict[str, str]:
        """HAProxy's log line for the connection of ``cid`` that came after the ``before`` earlier ones."""
        return wait_for(lambda: len(lines := bal.lines(cid)) > before and lines[before], 5,
                        f"HAProxy {bal.name} to log the connection of {cid!r}",
                        detail=lambda: tail(bal.haproxy.log_text(), 10))

    def cli(self, *args: str, bal: Balancer | None = None, status: int = 0) -> str:
        """Run the real `mqtt-affinity` CLI against ``bal``'s agent config and print what it says."""
        cfg = (bal or self.ha1).agent.config_path
        argv = [devstack.agent_command(), *args, "--config", str(cfg)]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            raise DemoError(f"`mqtt-affinity {' '.join(args)}` did not finish within 20s") from None
        self.out.command(f"mqtt-affinity {' '.join(args)} --config {rel(cfg)}", res.stdout + res.stderr)
        if res.returncode != status:
            raise DemoError(f"`mqtt-affinity {' '.join(args)}` exited with {res.returncode}, expected {status}:\n"
                            f"{res.stdout}{res.stderr}")
        return res.stdout

    @staticmethod
    def cell(line: dict[str, str]) -> str:
        return f"{line['server']} ({line['how']})"

    def wait_agents_state(self, node: str, state: str) -> float:
        """Until every agent applies ``state`` to ``node``; returns the seconds it took.

        Agents re-read node states from Redis every state_refresh (0.2 s here); their /metrics
        gauge, refreshed every 2 s, shows what the agent decides with.
        """
        t0 = time.monotonic()
        want = f'mqtt_affinity_node_state{{node="{node}",state="{state}"}} 1.0'

        def applied(bal: Balancer) -> bool:
            try:
                return want in bal.agent.metrics_text()
            except OSError:
                return False

        for bal in self.balancers:
            wait_for(lambda bal=bal: applied(bal), 10, f"agent {bal.name} to report {node} as {state}",
                     interval=0.1)
        return time.monotonic() - t0

    # ------------------------------------------------------------------ 1. placement

    def step_placement(self) -> None:
        out = self.out
        out.step(1, "Placement: two balancers, one answer",
                 "Six clients that keep a session connect through ha1, then through ha2. The first agent to",
                 "see a client picks a broker (weighted rendezvous hash) and records it in Redis; the other",
                 "balancer's agent has never seen the client, yet reads the same record: how=hit.")
        rows, bad = [], []
        for cid, proto in CLIENTS:
            a = self.via(self.ha1, cid, proto)
            b = self.via(self.ha2, cid, proto)
            owner = self.owner(cid)
            agree = a["server"] == b["server"] == owner and a["node"] == a["server"] and b["node"] == b["server"]
            rows.append([cid, session_label(proto), self.cell(a), self.cell(b), owner or "-",
                         out.tick if agree else out.cross])
            if not (agree and a["how"] == "assigned" and b["how"] == "hit"):
                bad.append(f"{cid}: ha1 {a['node']}/{a['server']} how={a['how']}, ha2 {b['node']}/{b['server']} "
                           f"how={b['how']}, Redis owner {owner}")
        out.table(["CLIENT", "SESSION", "VIA ha1", "VIA ha2", "REDIS OWNER", "AGREE"], rows)
        spread = Counter(self.owner(cid) for cid, _ in CLIENTS)
        out.info(out.dim("(from the HAProxy log lines: server = where HAProxy sent the connection, "
                         "(how) = the agent's answer)"))
        out.info("spread: " + ", ".join(f"{n} x{spread.get(n, 0)}" for n in NODES))
        expect(not bad, "every client was assigned once via ha1 and found (hit) on the same broker via ha2",
               out, lambda: "; ".join(bad))
        self.shown.append("placement recorded in Redis: both balancers send each client to the same broker")

    # ------------------------------------------------------------------ 2. persistent session

    def step_session(self) -> None:
        out = self.out
        out.step(2, "A persistent session survives a balancer switch",
                 f"{INBOX} ({session_label('5')}) subscribes at QoS 1 through ha1 and "
                 "goes offline.",
                 "Messages for it queue on its broker; it comes back through ha2 and must land on that same broker.")
        topic = f"inbox/{INBOX}"
        sub = SessionClient(INBOX, "5", session_expiry=SESSION_EXPIRY)
        before = len(self.ha1.lines(INBOX))
        sub.connect(self.ha1.port)
        sub.subscribe(topic)
        sub.disconnect()
        first = self.line(self.ha1, INBOX, before)
        owner = self.owner(INBOX)
        out.info(f"via ha1: {INBOX} -> {self.cell(first)}, subscribed to {topic!r} (QoS 1), disconnected")
        expect(owner is not None and first["server"] == owner, f"its session lives on {owner} (Redis owner = "
               "HAProxy's server)", out, lambda: f"HAProxy sent it to {first['server']}, Redis says {owner}")

        payloads = [f"reading {i} of 5 (queued while offline)".encode() for i in range(1, 6)]
        publish_direct(self.broker(owner).port, topic, payloads)
        out.info(f"published 5 QoS 1 messages straight to {owner} (port {self.broker(owner).port}), "
                 "bypassing the balancers")

        before = len(self.ha2.lines(INBOX))
        sub.connect(self.ha2.port)
        try:
            got = sub.wait_messages(len(payloads), timeout=5)
        finally:
            sub.disconnect()
        back = self.line(self.ha2, INBOX, before)
        out.info(f"via ha2: {INBOX} -> {self.cell(back)}, session present: {sub.session_present}")
        for t, p in got:
            out.info(f"  received on {t}: {p.decode(errors='replace')}")
        expect(back["server"] == owner and back["how"] == "hit", f"ha2 sent it to {owner} too (how=hit)", out,
               lambda: f"ha2 log: node={back['node']} how={back['how']} server={back['server']}")
        expect(sub.session_present and sorted(p for _, p in got) == sorted(payloads),
               "the broker kept its session: all 5 queued messages delivered", out,
               lambda: f"session_present={sub.session_present}, received {len(got)}: {[p for _, p in got]}")
        self.shown.append("a QoS 1 session and its queued messages survive reconnecting through the other balancer")

    # ------------------------------------------------------------------ 3. pin

    def step_pin(self) -> None:
        out = self.out
        cid, proto = CLIENTS[0]
        owner = self.owner(cid)
        target = next(n for n in NODES if n not in (owner, "node2"))  # node2 is drained in step 4
        out.step(3, "Pin: an operator sends a client to a chosen broker",
                 f"{cid} lives on {owner}. The operator pins it to {target} with the CLI; every agent reads pins",
                 "on every decision, so the next CONNECT through either balancer goes there.")
        self.cli("pin", cid, target, "--reason", "demo")
        a = self.via(self.ha1, cid, proto)
        fresh = self.session_present
        b = self.via(self.ha2, cid, proto)
        out.info(f"via ha1: {cid} -> {self.cell(a)}")
        out.info(f"via ha2: {cid} -> {self.cell(b)}")
        expect(all(x["server"] == x["node"] == target and x["how"] == "pinned" for x in (a, b)),
               f"both balancers sent it to {target} (how=pinned)", out,
               lambda: f"ha1: {a['node']}/{a['server']} how={a['how']}; ha2: {b['node']}/{b['server']} how={b['how']}")
        expect(fresh is False, f"on {target} it got a new session (session present: no); the old one stays on {owner}",
               out,
               lambda: f"the first CONNACK from {target} said session present: {fresh}")
        self.cli("show", cid)
        self.cli("unpin", cid)
        c = self.via(self.ha2, cid, proto)
        out.info(f"after unpin, via ha2: {cid} -> {self.cell(c)}")
        out.info(out.dim(f"(following the pin moved its record: its session now lives on {target}, "
                         "so it stays there)"))
        expect(c["server"] == target and c["how"] == "hit" and self.owner(cid) == target,
               f"unpinned, it sticks to {target}, where its session now is (how=hit)", out,
               lambda: f"ha2: {c['node']}/{c['server']} how={c['how']}, Redis owner {self.owner(cid)}")
        self.shown.append("`mqtt-affinity pin` overrides placement on every balancer at once")

    # ------------------------------------------------------------------ 4. drain

    def step_drain(self) -> None:
        out = self.out
        drained = "node2"
        known = [(cid, proto) for cid, proto in CLIENTS] + [(INBOX, "5")]
        residents = [(cid, proto) for cid, proto in known if self.owner(cid) == drained]
        extra = 7
        while not residents and extra < 40:  # the fixed ids above put two clients on node2; be sure anyway
            cid = f"sensor-{extra:02d}"
            extra += 1
            if self.via(self.ha1, cid, "3.1.1")["server"] == drained:
                residents.append((cid, "3.1.1"))
        if not residents:
            raise DemoError(f"could not get any client placed on {drained} before draining it")
        out.step(4, f"Drain {drained}: keep its clients, give it no new ones",
                 "Draining is how a broker is emptied gently (before an upgrade): clients whose session is on it",
                 "keep going there, new clients are placed on the other brokers.")
        self.cli("drain", drained)
        self.wait_agents_state(drained, "drain")
        out.info(out.dim(f"(both agents' /metrics now show {drained} as drain: they re-read node states every 0.2 s)"))
        rows, bad = [], []
        for cid, proto in residents:
            a = self.via(self.ha1, cid, proto)
            b = self.via(self.ha2, cid, proto)
            rows.append([cid, self.cell(a), self.cell(b)])
            if not all(x["server"] == drained and x["how"] == "hit" for x in (a, b)):
                bad.append(f"{cid}: ha1 {a['server']} how={a['how']}, ha2 {b['server']} how={b['how']}")
        out.info(f"clients of {drained} reconnect:")
        out.table(["CLIENT", "VIA ha1", "VIA ha2"], rows)
        expect(not bad, f"they stay on {drained} (how=hit)", out, lambda: "; ".join(bad))

        landed: dict[str, str] = {}
        wrong = []
        for i, cid in enumerate(NEWCOMERS):
            bal = self.balancers[i % 2]
            line = self.via(bal, cid, "3.1.1" if i % 2 else "5")
            landed[cid] = line["server"]
            if line["server"] == drained or line["how"] != "assigned":
                wrong.append(f"{cid} via {bal.name}: {line['server']} how={line['how']}")
        spread = Counter(landed.values())
        # What the agents would have picked with node2 active (the same HRW, all weights 1).
        would = [cid for cid in NEWCOMERS
                 if placement.choose(cid.encode(), [(n, 1.0) for n in NODES]) == drained]
        out.info(f"{len(NEWCOMERS)} new clients ({NEWCOMERS[0]}..{NEWCOMERS[-1]}, alternating ha1/ha2): "
                 + ", ".join(f"{n} x{spread.get(n, 0)}" for n in NODES))
        if would:
            out.info(out.dim(f"(with {drained} active, {len(would)} of them would have gone to {drained}: "
                             f"{', '.join(would)})"))
        expect(not wrong, f"no new client landed on {drained}", out, lambda: "; ".join(wrong))
        self.cli("nodes")
        self.cli("activate", drained)
        self.wait_agents_state(drained, "active")
        self.shown.append("`mqtt-affinity drain` keeps a broker's clients and sends new ones elsewhere")

    # ------------------------------------------------------------------ 5. rolling restart

    def step_restart(self) -> None:
        out = self.out
        out.step(5, "Rolling restart: every broker restarted in turn, no session lost",
                 "One subscriber per broker (QoS 1, clean session 0, reconnecting 1-2 s after a lost connection),",
                 f"through ha1 or ha2. Each broker in turn is stopped for {RESTART_DOWN:g} s (it saves its sessions "
                 "to disk) and started again.",
                 "While it is down the agents answer how=wait for its clients (down for less than owner_down_grace:",
                 f"{DEMO_GRACE} s here, 30 s by default) and HAProxy refuses them: they retry and land on their own "
                 "broker again,", "instead of starting an empty session on another one.")
        weights = [(n, 1.0) for n in NODES]
        owned: dict[str, str] = {}
        for i in range(1, 200):
            cid = f"meter-{i:02d}"
            owned.setdefault(placement.choose(cid.encode(), weights) or "", cid)
            if all(n in owned for n in NODES):
                break
        rows, bad = [], []
        with Fleet() as fleet:
            subs = {n: fleet.add(owned[n], self.balancers[i % 2].port, f"meters/{owned[n]}", reconnect=(1, 2))
                    for i, n in enumerate(NODES)}
            wait_for(lambda: all(s.subscribed.is_set() for s in subs.values()), 10, "the subscribers to subscribe")
            for node in NODES:
                sub = subs[node]
                bal = self.balancers[NODES.index(node) % 2]
                expect(self.owner(sub.cid) == node, f"{sub.cid} (via {bal.name}) has its session on {node}", out,
                       lambda sub=sub: f"Redis owner {self.owner(sub.cid)}")
            for node in NODES:
                sub = subs[node]
                bal = self.balancers[NODES.index(node) % 2]
                before, waits0 = sub.connected, self.count_how(bal, sub.cid, "wait")
                t0 = time.monotonic()
                broker = self.broker(node)
                broker.stop()
                time.sleep(RESTART_DOWN)
                broker.start()
                wait_for(lambda sub=sub, before=before: sub.connected > before, 15, f"{sub.cid} to reconnect",
                         detail=lambda bal=bal: tail(bal.haproxy.log_text(), 8))
                back = time.monotonic() - t0
                payload = f"reading after the restart of {node}".encode()
                publish_many(broker.port, [(sub.topic or "", payload)])
                got = wait_for(lambda sub=sub, p=payload: sub.received(p), 5, f"{sub.cid} to receive its message")
                last = sub.last
                waits = self.count_how(bal, sub.cid, "wait") - waits0
                present = bool(last and last.session_present)
                rows.append([node, sub.cid, bal.name, f"{RESTART_DOWN:g}s", str(waits), f"{back:.1f}s",
                             "1" if present else "0", out.tick if got else out.cross])
                if not (present and got and self.owner(sub.cid) == node and waits > 0):
                    bad.append(f"{node}: session present {present}, message {got}, owner {self.owner(sub.cid)}, "
                               f"refusals {waits}")
        out.table(["BROKER", "CLIENT", "VIA", "DOWN", "REFUSED (how=wait)", "BACK AFTER", "SESSION PRESENT",
                   "MESSAGE"], rows)
        expect(not bad, "every subscriber came back to its own broker with its session and got the message "
               "published there after the restart", out, lambda: "; ".join(bad))
        self.shown.append("a rolling restart of the brokers keeps every session: clients wait for their own broker")

    def count_how(self, bal: Balancer, cid: str, how: str) -> int:
        return sum(1 for d in bal.lines(cid) if d["how"] == how)

    # ------------------------------------------------------------------ 6. broker failure

    def step_failure(self) -> str:
        out = self.out
        cid, proto = INBOX, "5"
        old = self.owner(cid)
        assert old is not None
        broker = self.broker(old)
        out.step(6, "Broker failure: the owner does not come back",
                 f"{cid} lives on {old}. Its broker is killed (SIGKILL). Each agent's health check notices; for "
                 f"owner_down_grace ({DEMO_GRACE} s)", "its CONNECTs are refused (how=wait), then the next one, "
                 "through either balancer, moves it once and both follow the new record.")
        pid = broker.pid
        # (step 5 restarted this broker: count this death's lines only)
        seen = {bal.name: bal.agent.log_text().count(f"node {old} is down") for bal in self.balancers}
        broker.kill()
        out.info(f"killed mosquitto {old} (pid {pid})")
        t0 = time.monotonic()
        for bal in self.balancers:
            wait_for(lambda bal=bal: bal.agent.log_text().count(f"node {old} is down") > seen[bal.name], 5,
                     f"agent {bal.name} to notice that {old} is down",
                     detail=lambda bal=bal: tail(bal.agent.log_text()))
        seen_agents = time.monotonic() - t0
        for bal in self.balancers:
            bal.haproxy.wait_server_status("be_mqtt", old, "DOWN", timeout=8)
        out.info(f"both agents saw it down after {seen_agents:.1f}s, both HAProxy after "
                 f"{time.monotonic() - t0:.1f}s")
        before = len(self.ha2.lines(cid))
        accepted, present = attempt(self.ha2.port, cid)
        first = self.line(self.ha2, cid, before)
        out.info(f"via ha2 at once: {cid} -> {first['server']} ({first['how']})")
        expect(not accepted and first["how"] == "wait", f"refused while {old} is down for less than the grace "
               "(how=wait): no empty session elsewhere yet", out,
               lambda: f"ha2: node={first['node']} server={first['server']} how={first['how']}")
        # The client retries once a second, as a device would, until the grace is over.
        started = time.monotonic()
        refusals = 0
        while True:
            time.sleep(1)
            before = len(self.ha2.lines(cid))
            accepted, present = attempt(self.ha2.port, cid)
            if accepted:
                break
            refusals += 1
            if time.monotonic() - started > DEMO_GRACE + 10:
                raise DemoError(f"{cid} was still refused {DEMO_GRACE + 10} s after {old} died")
        moved = self.line(self.ha2, cid, before)
        out.info(f"{refusals} more refusals, one a second, then the grace was over")
        new = self.owner(cid)
        out.info(f"via ha2: {cid} -> {self.cell(moved)}")
        expect(moved["how"] == "moved" and moved["server"] == moved["node"] == new and new not in (None, old),
               f"re-placed once on a healthy broker, {new} (how=moved), and recorded in Redis", out,
               lambda: f"ha2: node={moved['node']} server={moved['server']} how={moved['how']}, Redis owner {new}")
        again = self.via(self.ha1, cid, proto)
        out.info(f"via ha1: {cid} -> {self.cell(again)}")
        expect(again["how"] == "hit" and again["server"] == new, f"ha1 follows the new owner {new} (how=hit)", out,
               lambda: f"ha1: node={again['node']} server={again['server']} how={again['how']}")
        expect(present is False, f"its session did not survive: it started afresh on {new}", out,
               lambda: f"session present: {present}")
        out.info(out.dim(f"(brokers share no sessions: what was queued on {old} stays there; mqtt-affinity keeps "
                         "the client on one broker,"))
        out.info(out.dim(" it does not copy sessions between them)"))
        self.shown.append("a broker that does not come back: its clients wait out the grace, then move once, and "
                          "every balancer follows the move")
        return old

    # ------------------------------------------------------------------ --keep

    def keep(self, killed: str | None) -> None:
        out = self.out
        if killed is not None:
            b = self.broker(killed)
            b.start()
            for bal in self.balancers:
                bal.haproxy.wait_server_status("be_mqtt", killed, "UP", timeout=10)
            out.info(f"restarted {killed} (mosquitto pid {b.pid}) so the cluster is whole again")
        out.print()
        out.print(out.bold("The stack keeps running until Ctrl-C."))
        rows = [[bal.name, f"127.0.0.1:{bal.port}", f"http://127.0.0.1:{bal.metrics_port}/metrics",
                 rel(bal.haproxy.log_path)] for bal in self.balancers]
        out.table(["BALANCER", "MQTT", "AGENT METRICS", "HAPROXY LOG"], rows)
        out.info("brokers: " + ", ".join(f"{b.label} {b.addr}" for b in self.stack.brokers)
                 + f"; redis {self.stack.redis_url}")
        out.print()
        cli = f"{rel(devstack.agent_command())} {{}} --config {rel(self.ha1.agent.config_path)}"
        ports = ", ".join(f"{b.label} {b.port}" for b in self.stack.brokers)
        out.info("Try it (mosquitto_sub/_pub come with the Debian package mosquitto-clients):")
        out.info(f"  mosquitto_sub -h 127.0.0.1 -p {self.ha1.port} -i my-client -c -q 1 -t 'demo/#' -v"
                 "    # via ha1, keeps a session")
        out.info("  " + cli.format("show my-client") + "    # which broker owns it")
        out.info(f"  mosquitto_pub -h 127.0.0.1 -p <that broker's port: {ports}> -q 1 -t demo/hello -m hi")
        out.info(out.dim("    (publish on the owner broker: the brokers are independent, not bridged)"))
        out.info(f"  mosquitto_sub -h 127.0.0.1 -p {self.ha2.port} -i my-client -c -q 1 -t 'demo/#' -v"
                 "    # via ha2: the same broker")
        out.info("  " + cli.format("nodes"))
        out.info(f"  tail -f {rel(self.ha1.haproxy.log_path)}")
        while True:
            time.sleep(1)
            for p in self.stack.processes:
                if p.proc is not None and p.proc.poll() is not None:
                    status = p.wait_stopped(0)
                    out.info(out.yellow(f"{p.name} exited (status {status}); log {rel(p.log_path)}"))


# ---------------------------------------------------------------------- setup


def attempt(port: int, cid: str) -> tuple[bool, bool]:
    """One MQTT 5 CONNECT that keeps a session: (CONNACK received, session present)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(connect_packet(cid.encode(), version=5, clean=False, session_expiry=SESSION_EXPIRY))
        try:
            ptype, body = read_packet(s)
        except (ConnectionError, OSError):
            return False, False
        if ptype != 2:
            return False, False
        s.sendall(DISCONNECT)
        return True, bool(body[0] & 1)


def session_label(protocol: str) -> str:
    return f"MQTT 5, session expiry {SESSION_EXPIRY}s" if protocol == "5" else "MQTT 3.1.1, clean-session=0"


# ---------------------------------------------------------------------- run directory


def make_run_dir() -> Path:
    base = devstack.REPO_ROOT / ".demo"
    base.mkdir(exist_ok=True)
    # Keep the newest few runs (failed runs keep their logs); never touch a running demo's.
    old = sorted((p for p in base.glob("run-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in old[: max(0, len(old) - (MAX_RUN_DIRS - 1))]:
        try:
            pid = int((p / "pid").read_text())
            os.kill(pid, 0)
            continue  # still running
        except (OSError, ValueError):
            shutil.rmtree(p, ignore_errors=True)
    run_dir = base / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir()
    (run_dir / "pid").write_text(str(os.getpid()))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo.py", description="Live demonstration of mqtt-affinity: Redis, three mosquitto brokers and "
        "two HAProxy balancers with their agents, on free ports of this machine.")
    parser.add_argument("--haproxy", metavar="VERSION|PATH", default=None,
                        help="3.2 (.haproxy/3.2/haproxy), 2.6 (/usr/sbin/haproxy) or a binary; "
                             "default: 3.2 if bootstrapped, else 2.6")
    parser.add_argument("--keep", action="store_true",
                        help="after the scenario, leave the stack running and print how to connect, until Ctrl-C")
    parser.add_argument("--no-restart", action="store_true", help="skip step 5 (the rolling restart)")
    parser.add_argument("--no-failure", action="store_true", help="skip step 6 (killing a broker)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colours (default: only when stdout is a terminal)")
    args = parser.parse_args(argv)
    out = Out({"auto": None, "always": True, "never": False}[args.color])

    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    started = time.monotonic()
    demo: Demo | None = None
    run_dir: Path | None = None
    status = 1
    interrupted = False
    try:
        haproxy_bin, version = devstack.find_haproxy(args.haproxy)
        for binary, package in (("redis-server", "redis-server"), ("mosquitto", "mosquitto")):
            devstack.require_binary(binary, package)
        devstack.agent_command()
        run_dir = make_run_dir()
        out.title("mqtt-affinity demo: sticky MQTT sessions across HAProxy balancers")
        out.info(f"HAProxy {version} ({rel(haproxy_bin)}), the shipped {rel(devstack.HAPROXY_CFG)} "
                 f"and {rel(devstack.SPOE_CONF)}")
        out.step(0, "Bringing up the stack",
                 "Every process below is started by this script on a free port and stopped when it ends.")
        t0 = time.monotonic()
        for attempt in (1, 2):
            demo = Demo(out, haproxy_bin, version, run_dir)
            try:
                demo.start()
                break
            except ToolMissing:
                raise
            except (DevstackError, TimeoutError) as exc:
                if attempt == 2:
                    raise
                # Most likely a port that another program took between our choice and the bind.
                out.info(out.yellow(f"start-up failed, retrying once on new ports: {str(exc).splitlines()[0]}"))
                demo.stop()
                for child in run_dir.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
        demo.describe(time.monotonic() - t0)
        demo.step_placement()
        demo.step_session()
        demo.step_pin()
        demo.step_drain()
        if not args.no_restart:
            demo.step_restart()
        killed = None if args.no_failure else demo.step_failure()

        out.print()
        out.print(out.bold(out.green(f"All steps behaved as described ({time.monotonic() - started:.1f}s):")))
        for line in demo.shown:
            out.ok(line)
        status = 0
        if args.keep:
            demo.keep(killed)
    except ToolMissing as exc:
        print(f"demo: {exc}", file=sys.stderr)
        status = 2
    except (DemoError, DevstackError, TimeoutError) as exc:  # a check, a process or a wait failed
        out.print()
        out.print(out.red(out.bold("DEMO FAILED: ")) + str(exc))
        status = 1
    except (Interrupted, KeyboardInterrupt) as exc:
        out.print()
        name = str(exc) or "SIGINT"
        if status == 0:  # --keep ends with Ctrl-C: that is success
            out.info(f"stopping ({name})")
        else:
            out.print(out.yellow(f"interrupted ({name})"))
            status = 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
            interrupted = True
    finally:
        # A second Ctrl-C must not cut the teardown short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if demo is not None:
            demo.stop()
            out.print(out.dim(f"Stopped the {len(demo.stack.processes)} processes this demo started."))
        if run_dir is not None:
            if status == 0 or interrupted:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                out.print(f"Logs of this run are kept in {rel(run_dir)}/ (one folder per process: haproxy-ha1/, "
                          "agent-ha1/, node1/, redis/, ...)")
    return status


if __name__ == "__main__":
    sys.exit(main())
