"""``workers: N``: a supervisor and N agent processes on one SPOP port (agent/workers.py).

Real processes on free ports: the agent started as operators start it (``mqtt-affinity run``),
Redis, mosquitto and HAProxy 2.6 / 3.2 from the dev stack. What is checked: new connections
spread over the workers, the supervisor's /metrics is the sum of the workers' own (shared-state
gauges taken once), SIGHUP reaches every worker, a SIGKILLed worker is started again while the
port keeps answering, SIGTERM drains every worker and exits 0, ``workers: 1`` is the single
process of before, a taken port is one clear line and exit 1, and a worker that dies as it starts
stops the others (exit 1), and workers whose supervisor is SIGKILLed stop by themselves. No timing is asserted beyond
generous waits, and nothing here measures how far N workers scale (this machine has 2 cores).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AGENT_CHECK_STATES, PER_PROCESS_GAUGES, SHARED_GAUGES, SUMMED_TYPES
from agent.model import How
from agent.spop.frames import FrameType, decode_frame, encode_haproxy_disconnect, encode_haproxy_hello
from agent.workers import http_get
from devstack import AgentProcess, Stack, free_port, raw_connect, wait_until, write_agent_config

pytestmark = pytest.mark.integration

_LISTENING = re.compile(r"listening: spop .* http (\S+), .* worker=(\d+) pid=(\d+)")


def _config(tmp: Path, redis_url: str, nodes: list[tuple[str, str]], **overrides: object) -> tuple[Path, int, int]:
    spop, metrics = free_port(), free_port()
    keys: dict[str, object] = {"agent_check_listen": f"127.0.0.1:{free_port()}", "haproxy_socket": "null",
                               "workers": 2, **overrides}
    cfg = write_agent_config(tmp / "agent.yaml", spop_port=spop, metrics_port=metrics, redis_url=redis_url,
                             nodes=nodes, overrides=keys)
    return cfg, spop, metrics


def _workers(agent: AgentProcess) -> dict[int, tuple[int, str]]:
    """Worker index -> (pid, HTTP unix socket), as each last logged when it started listening."""
    found: dict[int, tuple[int, str]] = {}
    for m in _LISTENING.finditer(agent.stderr_text()):
        found[int(m.group(2))] = (int(m.group(3)), m.group(1))
    return found


def _worker_metrics(sock: str) -> str:
    status, body = asyncio.run(http_get(sock, "/metrics"))
    assert status == 200
    return body.decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening (yet, or any more)
        return 0, str(exc)


def _hello(port: int) -> socket.socket:
    """An SPOP connection after its HELLO exchange (the agent answered AGENT-HELLO)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(encode_haproxy_hello(capabilities="pipelining"))
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        chunk = s.recv(65536)
        assert chunk, "closed before AGENT-HELLO"
        data += chunk
    assert decode_frame(data)[0].type == FrameType.AGENT_HELLO
    return s


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def _start(redis_server, brokers, tmp_workdir, **overrides: object) -> tuple[AgentProcess, Path, int, int]:
    """An agent on the three brokers (``workers: 2`` unless overridden): (agent, config, spop, metrics)."""
    nodes = [(f"node{i}", b.addr) for i, b in enumerate(brokers, 1)]
    workdir = tmp_workdir("agent")
    cfg, spop, metrics = _config(workdir, redis_server.url, nodes, **overrides)
    return AgentProcess(cfg, workdir=workdir, spop_port=spop, metrics_port=metrics).start(), cfg, spop, metrics


def test_workers_spread_sum_reload_restart_and_stop(redis_server, brokers, tmp_workdir) -> None:
    agent, cfg, spop, metrics = _start(redis_server, brokers, tmp_workdir, drain_period=1)
    try:
        agent.wait_listening()
        wait_until(lambda: _get(metrics, "/readyz")[0] == 200, timeout=15,
                   message=lambda: f"never ready: {_get(metrics, '/readyz')}\n{agent.log_text()}")
        workers = _workers(agent)
        assert sorted(workers) == [0, 1], agent.stderr_text()
        pids = {i: pid for i, (pid, _) in workers.items()}
        assert _children(agent.pid or 0) == set(pids.values())
        assert all(os.getpgid(p) == p for p in pids.values())  # own process groups: Ctrl-C goes to the supervisor
        assert _get(metrics, "/readyz") == (200, "ready: 2 workers\n")
        assert _get(metrics, "/healthz") == (200, "ok: 2 of 2 workers\n")
        assert "process=supervisor" in agent.stderr_text()

        # -- new connections spread over both workers -------------------------------------------
        base = _value(_get(metrics, "/metrics")[1], "mqtt_affinity_spop_connections_opened_total")  # port probes
        conns = [_hello(spop) for _ in range(40)]
        per_worker = {i: _value(_worker_metrics(sock), "mqtt_affinity_spop_connections")
                      for i, (_, sock) in workers.items()}
        assert sum(per_worker.values()) == 40 and all(n > 0 for n in per_worker.values()), per_worker
        for s in conns[:10]:  # some counters with more than one label set to sum
            s.sendall(encode_haproxy_disconnect(0, "bye"))
            s.close()
        conns = conns[10:]
        wait_until(lambda: sum(_value(_worker_metrics(sock), "mqtt_affinity_spop_connections")
                               for _, sock in workers.values()) == 30, timeout=5)

        # -- the summed /metrics: the workers' own numbers added up, shared state taken once ----
        own = [_worker_metrics(workers[i][1]) for i in (0, 1)]
        status, summed_text = _get(metrics, "/metrics")
        assert status == 200
        summed = {f.name: f for f in text_string_to_metric_families(summed_text)}  # valid exposition
        fams = [{f.name: f for f in text_string_to_metric_families(t)} for t in own]
        checked = 0
        for name, fam in fams[0].items():
            # Every gauge is classified: summed per process, or shared state taken once.
            if fam.type == "gauge":
                assert name in PER_PROCESS_GAUGES | SHARED_GAUGES, f"{name}: add it to one set in agent/metrics.py"
            add = fam.type in SUMMED_TYPES or name in PER_PROCESS_GAUGES
            mine = [_samples_of(f.get(name)) for f in fams]
            for key, value in _samples_of(summed[name]).items():
                want = sum(m.get(key, 0.0) for m in mine) if add else next(m[key] for m in mine if key in m)
                assert value == pytest.approx(want), (name, key, value, want)
                checked += 1
        assert checked > 100
        assert _value(summed_text, "mqtt_affinity_spop_connections") == 30
        assert _value(summed_text, "mqtt_affinity_spop_connections_opened_total") == base + 40
        assert _value(summed_text, "mqtt_affinity_spop_frames_received_total", type="hello") == 40
        assert _value(summed_text, "mqtt_affinity_redis_up") == 1  # not 2
        assert _value(summed_text, "mqtt_affinity_node_up", node="node1") == 1
        assert _value(summed_text, "mqtt_affinity_workers_running") == 2
        for s in conns:
            s.close()

        # -- SIGHUP reaches every worker; workers itself is restart-only --------------------------
        before = agent.stderr_text().count("reloaded ")
        import yaml

        data = yaml.safe_load(cfg.read_text())
        data["nodes"][1]["weight"] = 7
        data["workers"] = 3
        data["listen"] = f"127.0.0.1:{free_port()}"  # restart-only, like workers
        cfg.write_text(yaml.safe_dump(data, sort_keys=False))
        agent.send_signal(signal.SIGHUP)
        wait_until(lambda: agent.stderr_text().count("reloaded ") >= before + 2, timeout=10,
                   message=lambda: agent.log_text()[-3000:])
        for i, (_, sock) in workers.items():
            assert _value(_worker_metrics(sock), "mqtt_affinity_node_weight", node="node2") == 7, i
        log = agent.stderr_text()
        assert re.search(r"reload: workers changed \(2 to 3\); it takes effect at the next restart .*"
                         r"process=supervisor", log), log
        assert log.count("reload: workers changed") == 1  # said once, by the supervisor
        assert log.count("reload: listen changed") == 2  # by each worker
        assert sorted(_workers(agent)) == [0, 1]

        # -- a SIGKILLed worker is started again; the port keeps answering meanwhile --------------
        opened = _value(_get(metrics, "/metrics")[1], "mqtt_affinity_spop_connections_opened_total")
        os.kill(pids[1], signal.SIGKILL)
        # Once it is gone (connections queued on its socket as it died were reset with it),
        # worker 0 takes every new connection until the other is back.
        wait_until(lambda: not _alive(pids[1]), timeout=5)
        for _ in range(20):
            _hello(spop).close()
        wait_until(lambda: _workers(agent).get(1, (pids[1], ""))[0] != pids[1], timeout=10,
                   message=lambda: agent.log_text()[-3000:])
        assert re.search(rf"worker 1 \(pid {pids[1]}\) exited with signal SIGKILL; starting it again",
                         agent.stderr_text())
        wait_until(lambda: _get(metrics, "/readyz")[0] == 200, timeout=15)
        new_pid = _workers(agent)[1][0]
        assert _alive(new_pid) and _alive(pids[0])
        assert _children(agent.pid or 0) == {pids[0], new_pid}
        after = _get(metrics, "/metrics")[1]
        assert _value(after, "mqtt_affinity_worker_restarts_total") == 1
        # The dead worker's counters are kept: the sum does not go back.
        assert _value(after, "mqtt_affinity_spop_connections_opened_total") >= opened + 20
        # Started again from the config its siblings started with, then the file as it is now:
        # the edited weight applies, the edited listen does not (it shares their port).
        assert _value(_worker_metrics(_workers(agent)[1][1]), "mqtt_affinity_node_weight", node="node2") == 7
        assert re.search(rf"listening: spop 127.0.0.1:{spop}, .* worker=1 pid={new_pid}", agent.stderr_text())
        assert re.search(rf"reload: listen changed; .* worker=1 pid={new_pid}", agent.stderr_text())

        # -- SIGTERM: every worker drains, then all exit, the supervisor with 0 ------------------
        live = {pids[0], new_pid}
        agent.send_signal(signal.SIGTERM)
        wait_until(lambda: _get(metrics, "/readyz")[0] == 503, timeout=5)
        code = agent.wait_exit(timeout=15)
        log = agent.stderr_text()
        assert code == 0, log[-3000:]
        for pid in live:
            assert re.search(rf"draining for 1s.* pid={pid}", log), pid
            assert re.search(rf"INFO +mqtt_affinity: stopped worker=\d pid={pid}", log), pid
            assert not _alive(pid)
        assert "stopped: 2 workers" in log
        sock_dir = Path(workers[0][1]).parent
        assert not sock_dir.exists()
    finally:
        agent.stop(timeout=15)


def _samples_of(fam) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    if fam is None:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}


def test_one_worker_is_the_single_process_of_before(redis_server, brokers, tmp_workdir) -> None:
    agent, _, spop, metrics = _start(redis_server, brokers, tmp_workdir, workers=1)
    try:
        agent.wait_listening()
        _hello(spop).close()
        assert _children(agent.pid or 0) == set()
        text = agent.metrics_text()
        assert _value(text, "mqtt_affinity_spop_frames_received_total", type="hello") == 1
        assert "mqtt_affinity_workers_running" not in text
        log = agent.stderr_text()
        assert "worker=" not in log and "pid=" not in log and "mqtt_affinity.workers" not in log
        assert re.search(rf"listening: spop 127.0.0.1:{spop}, http 127.0.0.1:{metrics},", log), log
    finally:
        assert agent.stop(timeout=10) == 0


def test_a_taken_port_is_one_clear_line_and_exit_1(redis_server, tmp_workdir) -> None:
    workdir = tmp_workdir("agent")
    cfg, spop, metrics = _config(workdir, redis_server.url, [("node1", "127.0.0.1:1")])
    with socket.socket() as holder:  # another program, without SO_REUSEPORT
        holder.bind(("127.0.0.1", spop))
        holder.listen()
        agent = AgentProcess(cfg, workdir=workdir, spop_port=spop, metrics_port=metrics).start()
        try:
            assert agent.wait_exit(timeout=10) == 1
        finally:
            agent.stop()
    log = agent.stderr_text()
    assert re.search(rf"ERROR +mqtt_affinity.workers: cannot start: listen 127.0.0.1:{spop}: "
                     r"Address already in use", log), log
    assert "listening:" not in log  # no worker was started


def test_workers_stop_by_themselves_when_the_supervisor_dies(redis_server, tmp_workdir) -> None:
    workdir = tmp_workdir("agent")
    cfg, spop, metrics = _config(workdir, redis_server.url, [("node1", "127.0.0.1:1")], drain_period=30)
    agent = AgentProcess(cfg, workdir=workdir, spop_port=spop, metrics_port=metrics).start()
    try:
        wait_until(lambda: _get(metrics, "/readyz")[0] == 200, timeout=15, message=agent.log_text)
        pids = [pid for pid, _ in _workers(agent).values()]
        assert len(pids) == 2
        private = Path(next(iter(_workers(agent).values()))[1]).parent
        supervisor = agent.pid
        agent.kill()  # SIGKILL: nothing is passed on
        wait_until(lambda: not any(_alive(p) for p in pids), timeout=10, message=agent.log_text)
        log = agent.stderr_text()
        for pid in pids:  # without the 30 s drain: nobody would start them again
            assert re.search(rf"the supervisor \(pid {supervisor}\) is gone: stopping "
                             rf"worker=\d pid={pid}", log), log
            assert re.search(rf"INFO +mqtt_affinity: stopped worker=\d pid={pid}", log), log
        with socket.socket() as s:  # the port is free again
            s.bind(("127.0.0.1", spop))
        assert not private.exists()  # the workers emptied and removed the supervisor's folder
    finally:
        agent.stop()


def test_a_worker_that_cannot_start_stops_the_others_and_exit_1(redis_server, tmp_workdir) -> None:
    """Worker 1 dies as it starts (its interpreter exits before the agent runs: what a broken
    install or an out-of-memory kill at start looks like); worker 0 is stopped without a drain."""
    workdir = tmp_workdir("agent")
    cfg, spop, metrics = _config(workdir, redis_server.url, [("node1", "127.0.0.1:1")], drain_period=30)
    site = workdir / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "if '--worker-index' in sys.argv and sys.argv[sys.argv.index('--worker-index') + 1] == '1':\n"
        "    sys.exit(1)\n")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    agent = AgentProcess(cfg, env, workdir=workdir, spop_port=spop, metrics_port=metrics).start()
    try:
        assert agent.wait_exit(timeout=15) == 1
    finally:
        agent.stop()
    log = agent.stderr_text()
    assert "worker 1 could not start (code 1): stopping the others" in log, log
    assert re.search(r"drain cut short by a second stop signal worker=0", log), log
    assert re.search(r"INFO +mqtt_affinity: stopped worker=0", log), log


def test_workers_behind_haproxy(redis_server, brokers, tmp_workdir, haproxy_version) -> None:
    stack = Stack(haproxy_version, workdir=tmp_workdir, redis=redis_server, brokers=brokers,
                  agent_overrides={"workers": 2})
    try:
        stack.start(balancers=1)
        agent, balancer = stack.agents["ha1"], stack.balancers[0]
        assert agent.metrics_port is not None
        wait_until(lambda: _get(agent.metrics_port or 0, "/readyz")[0] == 200, timeout=15)
        workers = _workers(agent)
        assert sorted(workers) == [0, 1]
        ids = [f"w-{haproxy_version}-{i}".encode() for i in range(30)]
        assert [raw_connect(balancer.port, cid, version=4, clean=False) for cid in ids] == [0] * len(ids)
        owners = stack.owners(ids)
        assert all(owners.values()), owners  # every one decided and recorded by an agent worker

        # HAProxy's SPOP connections (its spop-check health checks open one each) and its
        # agent-checks reach both workers.
        def both_serve() -> bool:
            texts = [_worker_metrics(sock) for _, sock in workers.values()]
            return all(_value(t, "mqtt_affinity_spop_connections_opened_total") > 0
                       and _value(t, "mqtt_affinity_spop_healthchecks_total") > 0
                       and sum(_value(t, "mqtt_affinity_agent_checks_total", state=s) for s in AGENT_CHECK_STATES) > 0
                       for t in texts)
        wait_until(both_serve, timeout=15, message=lambda: str([_worker_metrics(s) for _, s in workers.values()]))
        summed = agent.metrics_text()
        decided = sum(_value(summed, "mqtt_affinity_decisions_total", how=h.value) for h in How)
        assert decided >= len(ids)
        # Active evacuation and connection counts: through worker 0 only.
        assert "haproxy runtime api in worker 0" in agent.stderr_text()
        ha_metrics = [_worker_metrics(sock) for _, sock in (workers[0], workers[1])]
        assert "mqtt_affinity_node_connections" not in ha_metrics[1]
    finally:
        stack.close()
