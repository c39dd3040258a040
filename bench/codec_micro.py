"""Micro-benchmark of the SPOP codec hot paths (decode NOTIFY, encode ACK).

Why: the agent must sustain >25k NOTIFY->ACK per second on one core including
asyncio, so the codec's share has to stay a small fraction of the ~40 us
budget.  Run: ``.venv/bin/python bench/codec_micro.py [seconds-per-case]``.
Prints rates only; it asserts nothing (timings are machine-dependent).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from agent.spop import Ack, AgentHello, Message, Scope, SetVar, SpopConnection
from agent.spop.frames import encode_ack, encode_haproxy_hello, encode_notify

NOTIFY_MESSAGE = Message(
    "mqtt-connect",
    (
        ("client_id", b"sensor-0042-4f1c9a7be3d2"),
        ("src", IPv4Address("10.1.2.3")),
        ("username", b"device-user"),
        ("proto_ver", b"4"),
        ("flags", b"2"),
        ("sess_expiry", None),
        ("balancer", "lb-eu-1"),
    ),
)
ACTIONS = (
    SetVar(Scope.TRANSACTION, "node", "node2"),
    SetVar(Scope.TRANSACTION, "how", "hit"),
)


def _rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of `fn`, measured in batches to keep timer overhead out."""
    batch = 1000
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - start)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    conn = SpopConnection()
    conn.receive_data(encode_haproxy_hello("2.0", 16380, "pipelining"))
    conn.send(AgentHello())
    notify = encode_notify(1234, 1, [NOTIFY_MESSAGE])
    batch16 = notify * 16
    ack = Ack(1234, 1, ACTIONS)

    decode = _rate(lambda: conn.receive_data(notify), seconds)
    decode16 = _rate(lambda: conn.receive_data(batch16), seconds) * 16
    encode = _rate(lambda: encode_ack(1234, 1, ACTIONS), seconds)
    send = _rate(lambda: conn.send(ack), seconds)

    def roundtrip() -> None:
        for ev in conn.receive_data(notify):
            conn.send(Ack(ev.stream_id, ev.frame_id, ACTIONS))  # type: ignore[union-attr]

    both = _rate(roundtrip, seconds)
    print(f"NOTIFY frame {len(notify)} bytes, ACK frame {len(conn.send(ack))} bytes")
    print(f"decode NOTIFY (receive_data, 1 frame/call): {decode:>10,.0f} /s  ({1e6 / decode:.2f} us)")
    print(f"decode NOTIFY (receive_data, 16 frames/call): {decode16:>8,.0f} /s  ({1e6 / decode16:.2f} us)")
    print(f"encode ACK    (frames.encode_ack):           {encode:>10,.0f} /s  ({1e6 / encode:.2f} us)")
    print(f"encode ACK    (SpopConnection.send):         {send:>10,.0f} /s  ({1e6 / send:.2f} us)")
    print(f"NOTIFY -> Ack round trip through the codec:  {both:>10,.0f} /s  ({1e6 / both:.2f} us)")


if __name__ == "__main__":
    main()
