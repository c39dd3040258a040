"""A persistent session survives a balancer switch: queued QoS 1 messages are delivered.

This is the reason the product exists: with independent brokers, a client
sent to the wrong node after reconnecting finds no session and loses every
message queued for it.
"""

from __future__ import annotations

import queue
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devstack import Stack, wait_until

pytestmark = pytest.mark.haproxy

PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}


class Subscriber:
    """A paho client that keeps a session and records what it receives."""

    def __init__(self, cid: str, protocol: str) -> None:
        self.protocol = PROTOCOLS[protocol]
        kw = {} if self.protocol == paho.MQTTv5 else {"clean_session": False}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=self.protocol, **kw)
        self.received: queue.Queue[bytes] = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.received.put(m.payload)
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(self, client, userdata, flags, reason_code, props) -> None:
        self.session_present = bool(flags.session_present)
        if not reason_code.is_failure:
            self.connected.set()

    def connect(self, port: int) -> None:
        self.connected.clear()
        kw: dict = {}
        if self.protocol == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
            kw = {"clean_start": False, "properties": props}
        self.client.connect("127.0.0.1", port, keepalive=30, **kw)
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_direct(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish QoS 1 straight to one broker, bypassing the balancers."""
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{port}", protocol=paho.MQTTv311)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        for p in payloads:
            pub.publish(topic, p, qos=1).wait_for_publish(10)
    finally:
        pub.disconnect()
        pub.loop_stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_queued_messages_follow_the_client_to_the_other_balancer(stack: Stack, haproxy_version, protocol):
    ha1, ha2 = stack.balancers
    cid = f"persist-{haproxy_version}-{protocol}"
    topic = f"t/{cid}"
    sub = Subscriber(cid, protocol)
    sub.connect(ha1.port)
    sub.client.subscribe(topic, qos=1)
    assert sub.subscribed.wait(10)
    sub.disconnect()
    wait_until(lambda: ha1.lines(cid))
    owner = stack.owner(cid)
    assert owner is not None and ha1.lines(cid)[0]["server"] == owner

    # While the client is away, messages for it arrive on its owner broker.
    payloads = [b"msg-%d" % i for i in range(10)]
    publish_direct(stack.broker(owner).port, topic, payloads)

    # It comes back through the OTHER balancer, whose agent has never seen it.
    sub.connect(ha2.port)
    got = []
    try:
        for _ in payloads:
            got.append(sub.received.get(timeout=10))
    finally:
        sub.disconnect()
    assert sorted(got) == sorted(payloads)
    assert sub.session_present is True
    wait_until(lambda: ha2.lines(cid))
    back = ha2.lines(cid)[0]
    assert (back["how"], back["server"]) == ("hit", owner)
