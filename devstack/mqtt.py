"""Raw MQTT CONNECT/CONNACK over a socket.

paho-mqtt is what users run and the end-to-end tests use it (``devstack.paho_client``);
these helpers are for load-shaped tests and benchmarks, where hundreds of paho clients (one
thread each) would measure paho rather than the path under test.
"""

from __future__ import annotations

import asyncio
import socket
import struct


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def connect_packet(
    client_id: bytes,
    *,
    version: int = 4,
    clean: bool = True,
    keepalive: int = 30,
    session_expiry: int | None = None,
    username: bytes | None = None,
) -> bytes:
    """An MQTT CONNECT for protocol level 3 (3.1), 4 (3.1.1) or 5."""
    flags = 0x02 if clean else 0
    if username is not None:
        flags |= 0x80
    name = b"MQIsdp" if version == 3 else b"MQTT"
    body = _str(name) + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == 5:
        props = b""
        if session_expiry is not None:
            props += b"\x11" + struct.pack("!I", session_expiry)
        body += _varint(len(props)) + props
    body += _str(client_id)
    if username is not None:
        body += _str(username)
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1) -> bytes:
    """An MQTT 3.1.1 PUBLISH (QoS 0 or 1; a packet id only with QoS 1)."""
    body = _str(topic.encode()) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _varint(len(body)) + body


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """Read one MQTT packet: (packet type, body)."""
    first = _recv_exact(sock, 1)[0]
    length, mult = 0, 1
    while True:
        b = _recv_exact(sock, 1)[0]
        length += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    return first >> 4, _recv_exact(sock, length) if length else b""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed before the whole packet arrived")
        buf += chunk
    return bytes(buf)


def mqtt_connect(host: str, port: int, client_id: bytes, *, timeout: float = 5.0, **kw: object) -> socket.socket:
    """Connect, send CONNECT, wait for a successful CONNACK; return the open socket."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(connect_packet(client_id, **kw))  # type: ignore[arg-type]
        ptype, body = read_packet(sock)
        if ptype != 2:
            raise ConnectionError(f"expected CONNACK, got packet type {ptype}")
        code = body[1] if len(body) > 1 else 255
        if code != 0:
            raise ConnectionError(f"CONNACK refused with code {code}")
    except BaseException:
        sock.close()
        raise
    return sock


DISCONNECT = b"\xe0\x00"


def raw_connect(port: int, cid: bytes, *, host: str = "127.0.0.1", **kw: object) -> int:
    """CONNECT, read CONNACK, DISCONNECT; returns the CONNACK return code."""
    with socket.create_connection((host, port), timeout=5) as s:
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


async def connect_many(port: int, ids: list[bytes], *, concurrency: int = 64, **kw: object) -> list[int | None]:
    """CONNECT -> CONNACK -> DISCONNECT for every id through ``port``, ``concurrency`` at a time
    (a window that refills as each finishes); the CONNACK codes, in the order of ``ids``."""
    sem = asyncio.Semaphore(concurrency)
    out: list[int | None] = [None] * len(ids)

    async def one(i: int, cid: bytes) -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(connect_packet(cid, **kw))  # type: ignore[arg-type]
                head = await asyncio.wait_for(reader.readexactly(4), 20)
                out[i] = head[3]
                writer.write(DISCONNECT)
            except asyncio.IncompleteReadError:
                out[i] = None
            finally:
                writer.close()

    await asyncio.gather(*(one(i, c) for i, c in enumerate(ids)))
    return out
