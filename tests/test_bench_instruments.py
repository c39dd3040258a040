"""The benchmarks' instruments say what they claim (no timings here: those live in bench/).

- bench/floor_spoa.c speaks SPOP correctly: checked frame by frame with our own codec, then
  behind real HAProxy 2.6 and 3.2 (with bench/null_agent.py, the do-nothing agent);
- bench/spop_load.py sends the messages it says: persistent by default, clean or MQTT 5 on
  request, the asked share of never-seen ids, parsed by the agent's own request parser.
- bench/redis_memory.py writes its sessions with the agent's own decision script.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.request import parse_connect
from agent.spop import Scope, SetVar
from agent.spop.frames import (
    FrameType,
    decode_actions,
    decode_frame,
    decode_kv_list,
    decode_messages,
    encode_haproxy_disconnect,
    encode_haproxy_hello,
    encode_notify,
)
from devstack import Stack as DevStack
from devstack import ToolMissing, connect_many

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import spop_load  # noqa: E402
from spoas import FloorSpoa, NullAgent, build_floor  # noqa: E402


def _read_frame(sock: socket.socket):
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    n = int.from_bytes(head, "big")
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            raise ConnectionError("closed mid-frame")
        body += chunk
    return decode_frame(head + body)[0]


def _eof(sock: socket.socket) -> bool:
    sock.settimeout(2)
    return sock.recv(1) == b""


@pytest.fixture
def floor(tmp_path: Path):
    try:
        binary = build_floor(tmp_path / "bin")
    except ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    proc = FloorSpoa(binary, tmp_path / "floor")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop(5)


@pytest.mark.integration
def test_floor_spoa_speaks_spop(floor: FloorSpoa) -> None:
    notify = spop_load.Mix(ids=1, new_share=0, mqtt5=False, expiry=None, clean=False, username=None).pool[0]
    with socket.create_connection(("127.0.0.1", floor.port), timeout=5) as s:
        s.sendall(encode_haproxy_hello(capabilities="pipelining,async", max_frame_size=9000, engine_id="t"))
        hello = _read_frame(s)
        assert hello.type == FrameType.AGENT_HELLO
        kv = {k: v for k, _, v in decode_kv_list(hello.payload)}
        assert kv == {"version": "2.0", "max-frame-size": 9000, "capabilities": "pipelining"}
        # Two NOTIFYs in one write, one with a multi-byte stream id: two ACKs, ids echoed.
        s.sendall(notify_frame(7, notify) + notify_frame(300000, notify))
        acks = [_read_frame(s), _read_frame(s)]
        assert [(a.type, a.stream_id, a.frame_id) for a in acks] == [(FrameType.ACK, 7, 1), (FrameType.ACK, 300000, 1)]
        for a in acks:
            assert decode_actions(a.payload) == (SetVar(Scope.TRANSACTION, "node", "node2"),
                                                 SetVar(Scope.TRANSACTION, "how", "hit"))
        s.sendall(encode_haproxy_disconnect(0, "bye"))
        bye = _read_frame(s)
        assert bye.type == FrameType.AGENT_DISCONNECT
        assert {k: v for k, _, v in decode_kv_list(bye.payload)}["status-code"] == 0
        assert _eof(s)
    # Health check (option spop-check): AGENT-HELLO, then the agent closes.
    with socket.create_connection(("127.0.0.1", floor.port), timeout=5) as s:
        s.sendall(encode_haproxy_hello(healthcheck=True))
        assert _read_frame(s).type == FrameType.AGENT_HELLO
        assert _eof(s)
    # Protocol errors: AGENT-DISCONNECT with SPOE.txt's status, then close.
    for data, status in ((encode_notify(1, 1, []), 4),  # NOTIFY before HELLO: invalid frame
                         (encode_haproxy_hello(max_frame_size=300) + (100000).to_bytes(4, "big"), 3),  # too big
                         (encode_haproxy_hello(supported_versions="1.0"), 8)):  # unsupported version
        with socket.create_connection(("127.0.0.1", floor.port), timeout=5) as s:
            s.sendall(data)
            frame = _read_frame(s)
            if frame.type == FrameType.AGENT_HELLO:
                frame = _read_frame(s)
            assert frame.type == FrameType.AGENT_DISCONNECT
            assert {k: v for k, _, v in decode_kv_list(frame.payload)}["status-code"] == status
            assert _eof(s)
    floor.stop(5)
    counters = floor.counters()
    assert counters["notify"] == counters["ack"] == 2
    assert counters["healthchecks"] == 1 and counters["haproxy-disconnect"] == 1 and counters["errors"] == 3


@pytest.mark.integration
def test_floor_spoa_spreads_by_client_id(tmp_path: Path) -> None:
    try:
        binary = build_floor(tmp_path / "bin")
    except ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    floor = FloorSpoa(binary, tmp_path / "floor", node="node1,node2,node3")
    floor.start()
    try:
        mix = spop_load.Mix(ids=60, new_share=0, mqtt5=False, expiry=None, clean=False, username=None)
        with socket.create_connection(("127.0.0.1", floor.port), timeout=5) as s:
            s.sendall(encode_haproxy_hello())
            assert _read_frame(s).type == FrameType.AGENT_HELLO
            answers: dict[int, str] = {}
            for rnd in range(2):  # the same id twice: the same node
                s.sendall(b"".join(notify_frame(1000 * rnd + i, p) for i, p in enumerate(mix.pool)))
                for _ in mix.pool:
                    ack = _read_frame(s)
                    node = {a.name: a.value for a in decode_actions(ack.payload)}["node"]
                    assert answers.setdefault(ack.stream_id % 1000, node) == node
        assert set(answers.values()) == {"node1", "node2", "node3"}
    finally:
        floor.stop(5)


def notify_frame(sid: int, payload: bytes) -> bytes:
    body = bytes((FrameType.NOTIFY, 0, 0, 0, 1)) + spop_load._varint(sid) + b"\x01" + payload
    return len(body).to_bytes(4, "big") + body


@pytest.mark.integration
def test_floor_and_null_agent_behind_haproxy(haproxy_version: str, tmp_path: Path) -> None:
    """Both reference agents (one node; spread by client id) pass HAProxy's spop-check and route
    every CONNECT to the node they name."""
    try:
        binary = build_floor(tmp_path / "bin")
    except ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    spoas = [FloorSpoa(binary, tmp_path / "floor"), NullAgent(tmp_path / "null"),
             FloorSpoa(binary, tmp_path / "floor3", node="node1,node2,node3", label="3"),
             NullAgent(tmp_path / "null3", node="node1,node2,node3", label="3")]
    # Short names: HAProxy refuses a stats socket path over 97 bytes, and devstack only moves
    # the socket to a short folder past 100.
    with DevStack(haproxy_version, workdir=tmp_path / "s") as stack:
        try:
            stack.start_brokers()
            for p in spoas:
                p.start()
            balancers = [stack.start_balancer(f"b{i}", agents=[p, p]) for i, p in enumerate(spoas)]  # type: ignore[list-item]
            stack.wait_ready(timeout=15)  # includes be_spoa UP: the health-check HELLO works
            ids = [b"inst-%03d" % i for i in range(60)]
            for b in balancers:
                codes = asyncio.run(connect_many(b.port, ids, concurrency=20, version=4, clean=False))
                assert codes == [0] * len(ids)
            for b in balancers[:2]:  # one node
                lines = [b.wait_line(i.decode()) for i in ids]
                assert {(d["server"], d["node"], d["how"], d["err"]) for d in lines} == {("node2", "node2", "hit", "-")}
            for b in balancers[2:]:  # spread by client id: every line routed as named, all three used
                lines = [b.wait_line(i.decode()) for i in ids]
                assert all(d["server"] == d["node"] and d["how"] == "hit" and d["err"] == "-" for d in lines)
                assert {d["node"] for d in lines} == {"node1", "node2", "node3"}
        finally:
            for p in spoas:
                p.stop(5)
    assert spoas[0].counters()["errors"] == spoas[2].counters()["errors"] == 0


def test_spop_load_sends_persistent_sessions_by_default() -> None:
    mix = spop_load.Mix(ids=100, new_share=0.5, mqtt5=False, expiry=None, clean=False, username=None)
    payloads = [mix.next_payload() for _ in range(1000)]
    requests = [parse_connect(decode_messages(p)[0].args) for p in payloads]
    assert all(r.persistent and r.proto_ver == 4 and r.flags == 0 and r.sess_expiry is None for r in requests)
    ids = [r.client_id for r in requests]
    pool = set(mix.pool_id(i) for i in range(100))
    new = [i for i in ids if i not in pool]
    assert len(new) == 500 and len(set(new)) == 500  # exactly the share, never repeated
    assert {len(i) for i in ids} == {len(mix.pool_id(0))}
    assert mix.sent_new == 500 and mix.sent_pool == 500


@pytest.mark.parametrize(("mqtt5", "expiry", "clean", "persistent", "flags", "proto"), [
    (False, None, True, False, 2, 4),
    (True, 600, False, True, 0, 5),
    (True, None, True, False, 2, 5),
])
def test_spop_load_other_session_kinds(mqtt5: bool, expiry: int | None, clean: bool, persistent: bool, flags: int,
                                       proto: int) -> None:
    mix = spop_load.Mix(ids=10, new_share=0.0, mqtt5=mqtt5, expiry=expiry, clean=clean, username=b"u")
    r = parse_connect(decode_messages(mix.next_payload())[0].args)
    assert (r.persistent, r.flags, r.proto_ver, r.sess_expiry) == (persistent, flags | 0x80, proto, expiry)
    assert r.username == b"u" and mix.persistent == persistent


def test_redis_memory_writes_through_the_agents_own_script() -> None:
    """bench/redis_memory.py places its sessions with decide.lua as the agent calls it (a stale
    argument layout fails there) and prints one row per layout."""
    out = subprocess.run([sys.executable, str(BENCH / "redis_memory.py"), "--sessions", "3000",
                          "--ids", "sensor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [ln.split("|") for ln in out.stdout.splitlines() if ln.startswith("| sensor")]
    assert [r[2].strip() for r in rows] == ["v2 (buckets)", "v1 (hash + placed zset)", "plain string"], out.stdout
    assert all(float(r[3]) > 0 for r in rows), out.stdout
