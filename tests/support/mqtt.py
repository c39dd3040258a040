"""Raw MQTT CONNECT/CONNACK over a socket.

paho-mqtt is what users run and the end-to-end tests use it; this helper is
for load-shaped tests and benchmarks, where hundreds of paho clients (one
thread each) would measure paho rather than the path under test.
"""

from __future__ import annotations

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
