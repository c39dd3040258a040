"""paho-mqtt 2.x clients, as users run them: a one-shot CONNECT, a client that keeps a
session, a direct publisher. (``devstack.mqtt`` has the raw-socket helpers for load.)

Not imported by ``devstack/__init__.py``: only what needs paho-mqtt imports it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devstack.procs import DevstackError

PROTOCOLS = {"3.1": paho.MQTTv31, "3.1.1": paho.MQTTv311, "5": paho.MQTTv5}


class MqttError(DevstackError):
    """A client could not connect, or a broker did not acknowledge in time."""


@dataclass
class ConnectResult:
    reason_code: int  # 0 = accepted
    session_present: bool

    @property
    def ok(self) -> bool:
        return self.reason_code == 0


def connect_once(
    port: int,
    client_id: str,
    *,
    host: str = "127.0.0.1",
    protocol: str = "3.1.1",
    clean: bool = True,
    session_expiry: int | None = None,
    username: str | None = None,
    keepalive: int = 30,
    timeout: float = 5.0,
) -> ConnectResult:
    """paho client: CONNECT, wait for CONNACK, DISCONNECT. TimeoutError without a CONNACK.

    ``protocol``: "3.1", "3.1.1" or "5". ``clean``: clean_session (3.x) or clean_start (5).
    ``session_expiry``: MQTT 5 only.
    """
    proto = PROTOCOLS[protocol]
    kwargs = {} if proto == paho.MQTTv5 else {"clean_session": clean}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kwargs)
    if username is not None:
        client.username_pw_set(username)
    done = threading.Event()
    result: list[ConnectResult] = []

    def on_connect(_c, _u, flags, reason_code, _props):
        rc = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        result.append(ConnectResult(rc, bool(getattr(flags, "session_present", False))))
        done.set()

    client.on_connect = on_connect
    connect_kwargs: dict = {}
    if proto == paho.MQTTv5:
        connect_kwargs["clean_start"] = clean
        if session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
            connect_kwargs["properties"] = props
    try:
        client.connect(host, port, keepalive=keepalive, **connect_kwargs)
        client.loop_start()
        if not done.wait(timeout):
            raise TimeoutError(f"no CONNACK from {host}:{port} for {client_id!r} within {timeout}s")
        return result[0]
    finally:
        try:
            client.disconnect()
        except Exception:
            pass
        client.loop_stop()


class SessionClient:
    """A paho client that keeps a session: MQTT 3.1.1 clean-session=0, or MQTT 5 with
    ``session_expiry`` seconds. Connects, subscribes at QoS 1 and records what it receives;
    MqttError when the broker path does not answer."""

    def __init__(self, cid: str, protocol: str, *, session_expiry: int = 300, host: str = "127.0.0.1") -> None:
        self.cid = cid
        self.protocol = protocol
        self.host = host
        self.session_expiry = session_expiry
        self.v5 = protocol == "5"
        kw = {} if self.v5 else {"clean_session": False}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=PROTOCOLS[protocol], **kw)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reason: str | None = None
        self.session_present: bool | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.got_message = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, props) -> None:
        self.session_present = bool(flags.session_present)
        self.reason = str(reason_code)
        if not reason_code.is_failure:
            self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self.got_message:
            self.messages.append((msg.topic, msg.payload))
            self.got_message.notify_all()

    def connect(self, port: int, timeout: float = 5.0) -> SessionClient:
        self.connected.clear()
        self.reason = None
        kw: dict = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
            kw = {"clean_start": False, "properties": props}
        try:
            self.client.connect(self.host, port, keepalive=30, **kw)
        except OSError as exc:
            raise MqttError(f"{self.cid}: cannot connect to {self.host}:{port}: {exc}") from None
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.client.loop_stop()
            raise MqttError(f"{self.cid}: no successful CONNACK through port {port} within {timeout:g}s"
                            + (f" (reason: {self.reason})" if self.reason else ""))
        return self

    def subscribe(self, topic: str, timeout: float = 5.0) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        if not self.subscribed.wait(timeout):
            raise MqttError(f"{self.cid}: no SUBACK for {topic!r} within {timeout:g}s")

    def wait_messages(self, count: int, timeout: float) -> list[tuple[str, bytes]]:
        """What it received once it has ``count`` messages, or when ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self.got_message:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.got_message.wait(left)
            return list(self.messages)

    def disconnect(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def publish_direct(port: int, topic: str, payloads: Sequence[bytes], *, host: str = "127.0.0.1") -> None:
    """QoS 1 publishes straight to one broker, bypassing the balancers; MqttError if one is not acknowledged."""
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"devstack-publisher-{os.getpid()}",
                      protocol=paho.MQTTv311)
    try:
        pub.connect(host, port)
    except OSError as exc:
        raise MqttError(f"publisher: cannot connect to the broker on port {port}: {exc}") from None
    pub.loop_start()
    try:
        for p in payloads:
            info = pub.publish(topic, p, qos=1)
            info.wait_for_publish(5)
            if not info.is_published():
                raise MqttError(f"publisher: {p!r} was not acknowledged by the broker on port {port}")
    finally:
        pub.disconnect()
        pub.loop_stop()
