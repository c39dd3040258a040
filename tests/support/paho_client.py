"""A synchronous paho-mqtt 2.x helper: CONNECT, wait for CONNACK, DISCONNECT.

(tests/support/mqtt.py has the raw-socket CONNECT helpers for load-shaped tests.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PROTOCOLS = {"3.1": paho.MQTTv31, "3.1.1": paho.MQTTv311, "5": paho.MQTTv5}


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
