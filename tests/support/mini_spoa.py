"""A deliberately tiny SPOP peer, used ONLY to check the shipped HAProxy configs.

It is not the product agent (that is ``mqtt-affinity run``, tested elsewhere). It lets
tests/test_haproxy_configs.py prove, on HAProxy 2.6 and 3.2, that haproxy.cfg +
spoe-mqtt.conf send the ``mqtt-connect`` message with the expected arguments and route
on the ``node`` variable the agent sets, independently of the agent's own code.

Run: ``python -m tests.support.mini_spoa --port P --node node2 --record FILE``, or start the
``MiniSpoa`` process class below.
Every NOTIFY message is appended to FILE as one JSON line
``{"message": name, "args": {name: [type_id, value_repr]}}``; each is answered with
set-var txn.<prefix>.node=<--node> (none when --node is empty) and txn.<prefix>.how=<--how>
(default "mini"). ``--drop-once CID``: the
first NOTIFY carrying that client id is not answered, its connection is closed instead
(an agent that dies with the request in flight). ``--stall-once CID``: that NOTIFY is never
answered, the connection stays (a wedged agent).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import struct
import sys
import threading
from pathlib import Path

from devstack import REPO_ROOT, ManagedProcess, free_port, port_open

HAPROXY_HELLO, HAPROXY_DISCONNECT, NOTIFY = 1, 2, 3
AGENT_HELLO, AGENT_DISCONNECT, ACK = 101, 102, 103
T_NULL, T_BOOL, T_INT32, T_UINT32, T_INT64, T_UINT64, T_IPV4, T_IPV6, T_STRING, T_BINARY = range(10)
FIN = 1


def enc_varint(i: int) -> bytes:
    if i < 240:
        return bytes([i])
    out = bytearray([(i | 240) & 0xFF])
    i = (i - 240) >> 4
    while i >= 128:
        out.append((i | 128) & 0xFF)
        i = (i - 128) >> 7
    out.append(i)
    return bytes(out)


def dec_varint(buf: bytes, pos: int) -> tuple[int, int]:
    i = buf[pos]
    pos += 1
    if i < 240:
        return i, pos
    r = 4
    while True:
        b = buf[pos]
        pos += 1
        i += b << r
        r += 7
        if b < 128:
            return i, pos


def enc_str(s: bytes) -> bytes:
    return enc_varint(len(s)) + s


def dec_typed(buf: bytes, pos: int) -> tuple[int, object, int]:
    t = buf[pos] & 0x0F
    flags = buf[pos] >> 4
    pos += 1
    if t == T_NULL:
        return t, None, pos
    if t == T_BOOL:
        return t, bool(flags & 1), pos
    if t in (T_INT32, T_UINT32, T_INT64, T_UINT64):
        v, pos = dec_varint(buf, pos)
        return t, v, pos
    if t == T_IPV4:
        return t, socket.inet_ntop(socket.AF_INET, buf[pos : pos + 4]), pos + 4
    if t == T_IPV6:
        return t, socket.inet_ntop(socket.AF_INET6, buf[pos : pos + 16]), pos + 16
    n, pos = dec_varint(buf, pos)
    raw = buf[pos : pos + n]
    return t, (raw.decode(errors="replace") if t == T_STRING else raw.hex()), pos + n


def frame(ftype: int, stream_id: int, frame_id: int, payload: bytes) -> bytes:
    body = bytes([ftype]) + struct.pack("!I", FIN) + enc_varint(stream_id) + enc_varint(frame_id) + payload
    return struct.pack("!I", len(body)) + body


def kv_str(key: str, value: str) -> bytes:
    return enc_str(key.encode()) + bytes([T_STRING]) + enc_str(value.encode())


class Handler(socketserver.BaseRequestHandler):
    server: MiniServer

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.request.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def handle(self) -> None:
        try:
            while True:
                (length,) = struct.unpack("!I", self.recv_exact(4))
                body = self.recv_exact(length)
                ftype = body[0]
                pos = 5
                stream_id, pos = dec_varint(body, pos)
                frame_id, pos = dec_varint(body, pos)
                if ftype == HAPROXY_HELLO:
                    payload = (
                        kv_str("version", "2.0")
                        + enc_str(b"max-frame-size") + bytes([T_UINT32]) + enc_varint(16380)
                        + kv_str("capabilities", "")
                    )  # fmt: skip
                    self.request.sendall(frame(AGENT_HELLO, 0, 0, payload))
                elif ftype == NOTIFY:
                    fate = self.on_notify(body, pos)
                    if fate == "drop":
                        self.request.close()
                        return
                    if fate == "stall":
                        continue
                    actions = b""
                    pairs = [("node", self.server.node)] if self.server.node else []
                    for name, value in (*pairs, ("how", self.server.how)):
                        actions += bytes([1, 3, 2]) + enc_str(name.encode())  # SET-VAR, 3 args, txn scope
                        actions += bytes([T_STRING]) + enc_str(value.encode())
                    self.request.sendall(frame(ACK, stream_id, frame_id, actions))
                elif ftype == HAPROXY_DISCONNECT:
                    payload = enc_str(b"status-code") + bytes([T_UINT32]) + enc_varint(0) + kv_str("message", "bye")
                    self.request.sendall(frame(AGENT_DISCONNECT, 0, 0, payload))
                    return
        except (EOFError, ConnectionError):
            return

    def on_notify(self, body: bytes, pos: int) -> str:
        """Record the messages; "drop" or "stall" if this NOTIFY is the one to drop or stall."""
        fate = ""
        while pos < len(body):
            n, pos = dec_varint(body, pos)
            name = body[pos : pos + n].decode()
            pos += n
            nargs = body[pos]
            pos += 1
            args = {}
            for _ in range(nargs):
                n, pos = dec_varint(body, pos)
                key = body[pos : pos + n].decode()
                pos += n
                t, v, pos = dec_typed(body, pos)
                args[key] = [t, v]
            with self.server.lock, open(self.server.record, "a") as f:
                f.write(json.dumps({"message": name, "args": args}) + "\n")
                cid = args.get("client_id", [None, None])[1]
                if cid is not None and cid == self.server.drop_once:
                    self.server.drop_once = None
                    fate = "drop"
                if cid is not None and cid == self.server.stall_once:
                    self.server.stall_once = None
                    fate = "stall"
        return fate


class MiniServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class MiniSpoa(ManagedProcess):
    """This module as a process: a tiny SPOP peer for config tests only."""

    name = "mini-spoa"

    def __init__(self, node: str, port: int | None = None, workdir: str | Path | None = None,
                 *, how: str = "mini", drop_once: bytes | None = None, stall_once: bytes | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.node = node
        self.how = how
        self.drop_once = drop_once
        self.stall_once = stall_once
        self.record_path = self.workdir / "notify.jsonl"

    def argv(self) -> list[str]:
        drop = ["--drop-once", self.drop_once.hex()] if self.drop_once is not None else []
        drop += ["--stall-once", self.stall_once.hex()] if self.stall_once is not None else []
        return [sys.executable, "-m", "tests.support.mini_spoa", "--port", str(self.port),
                "--node", self.node, "--how", self.how, "--record", str(self.record_path), *drop]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def ready(self) -> bool:
        return port_open(self.port)

    def messages(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.record_path.read_text().splitlines() if line]
        except FileNotFoundError:
            return []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--node", required=True, help="node to answer; empty: no node variable")
    ap.add_argument("--how", default="mini")
    ap.add_argument("--record", required=True)
    ap.add_argument("--drop-once", help="client id (hex) whose first NOTIFY is dropped with its connection")
    ap.add_argument("--stall-once", help="client id (hex) whose first NOTIFY is never answered")
    a = ap.parse_args()
    srv = MiniServer(("127.0.0.1", a.port), Handler)
    srv.node, srv.how, srv.record, srv.lock = a.node, a.how, a.record, threading.Lock()  # type: ignore[attr-defined]
    srv.drop_once, srv.stall_once = a.drop_once, a.stall_once  # type: ignore[attr-defined]
    srv.serve_forever()


if __name__ == "__main__":
    main()
