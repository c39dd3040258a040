"""paho-mqtt 2.x clients, as users run them: a one-shot CONNECT, a client that keeps a
session, a direct publisher. (``devstack.mqtt`` has the raw-socket helpers for load.)

Not imported by ``devstack/__init__.py``: only what needs paho-mqtt imports it.
"""

from __future__ import annotations

import os
import selectors
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


@dataclass
class Connect:
    """One CONNACK a ``Subscriber`` got."""

    at: float  # time.monotonic()
    session_present: bool
    reason_code: int


class Subscriber:
    """A long-lived paho client (MQTT 3.1.1, clean session 0) as devices run them: reconnects
    on its own after a lost connection, with backoff (``reconnect``: min, max seconds), and
    subscribes to ``topic`` at QoS 1 whenever the broker has no session for it (session
    present = 0). Records every CONNACK, disconnect and message. Made and driven by a
    :class:`Fleet`."""

    def __init__(self, cid: str, port: int, topic: str | None, host: str, reconnect: tuple[float, float],
                 keepalive: int) -> None:
        self.cid = cid
        self.port = port
        self.host = host
        self.topic = topic
        self.keepalive = keepalive
        self.backoff = reconnect
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv311,
                                  clean_session=False)
        self.lock = threading.Lock()
        self.connects: list[Connect] = []
        self.disconnects: list[float] = []
        self.messages: list[bytes] = []
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        # Driver state (the fleet's thread only).
        self.delay = reconnect[0]
        self.retry_at: float | None = 0.0  # when to (re)connect; None while connected or stopped
        self.stopped = False

    def _on_connect(self, client, userdata, flags, reason_code, props) -> None:
        rc = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        with self.lock:
            self.connects.append(Connect(time.monotonic(), bool(flags.session_present), rc))
        if rc == 0:
            self.delay = self.backoff[0]
            if not flags.session_present and self.topic:
                self.subscribed.clear()
                client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append(msg.payload)

    @property
    def connected(self) -> int:
        """How many successful CONNACKs it has had."""
        with self.lock:
            return sum(1 for c in self.connects if c.reason_code == 0)

    @property
    def last(self) -> Connect | None:
        with self.lock:
            return self.connects[-1] if self.connects else None

    def received(self, payload: bytes) -> bool:
        with self.lock:
            return payload in self.messages


class Fleet:
    """Hundreds of :class:`Subscriber` driven by ONE thread over epoll, through paho's external
    loop API (``loop_read``/``loop_write``/``loop_misc`` and the socket callbacks).

    Why not ``loop_start()`` per client: paho's own loop uses ``select()``, which cannot watch a
    file descriptor above 1023; a test process with a few hundred clients (and whatever else it
    has open) gets there, and those clients then silently never send their CONNECT.

        with Fleet() as fleet:
            subs = [fleet.add(f"c{i}", port, f"t/{i}") for i in range(200)]
    """

    MISC_EVERY = 0.5

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._subs: list[Subscriber] = []
        self._pending: list[Subscriber] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paho-fleet", daemon=True)
        self._thread.start()

    def add(self, cid: str, port: int, topic: str | None = None, *, host: str = "127.0.0.1",
            reconnect: tuple[float, float] = (1, 2), keepalive: int = 30) -> Subscriber:
        """A new subscriber, connecting at once (in the fleet's thread)."""
        sub = Subscriber(cid, port, topic, host, reconnect, keepalive)
        c = sub.client
        c.on_socket_open = lambda client, userdata, sock: self._sel.register(sock, selectors.EVENT_READ, sub)
        c.on_socket_close = lambda client, userdata, sock: self._unregister(sock)
        c.on_socket_register_write = lambda client, userdata, sock: self._sel.modify(
            sock, selectors.EVENT_READ | selectors.EVENT_WRITE, sub)
        c.on_socket_unregister_write = lambda client, userdata, sock: self._modify_read(sock, sub)
        c.on_disconnect = lambda *a: self._lost(sub)
        with self._lock:
            self._pending.append(sub)
        return sub

    def _unregister(self, sock: object) -> None:
        try:
            self._sel.unregister(sock)  # type: ignore[arg-type]
        except (KeyError, ValueError):
            pass

    def _modify_read(self, sock: object, sub: Subscriber) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ, sub)  # type: ignore[arg-type]
        except (KeyError, ValueError):
            pass

    def _lost(self, sub: Subscriber) -> None:
        with sub.lock:
            sub.disconnects.append(time.monotonic())
        if not sub.stopped:
            sub.retry_at = time.monotonic() + sub.delay
            sub.delay = min(sub.delay * 2, sub.backoff[1])

    def _connect(self, sub: Subscriber) -> None:
        sub.retry_at = None
        try:
            if sub.connects or sub.disconnects:
                sub.client.reconnect()
            else:
                sub.client.connect(sub.host, sub.port, keepalive=sub.keepalive)
        except OSError:
            self._lost(sub)

    def _run(self) -> None:
        next_misc = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                self._subs += self._pending
                self._pending.clear()
            now = time.monotonic()
            for sub in self._subs:
                if sub.retry_at is not None and sub.retry_at <= now and not sub.stopped:
                    self._connect(sub)
            for key, mask in self._sel.select(timeout=0.02):
                client = key.data.client
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE and client.socket() is not None:
                    client.loop_write()
            if now >= next_misc:
                next_misc = now + self.MISC_EVERY
                for sub in self._subs:
                    if sub.client.socket() is not None:
                        sub.client.loop_misc()
        for sub in self._subs:  # stopping: say goodbye, close every socket
            sub.stopped = True
            if sub.client.socket() is not None:
                try:
                    sub.client.disconnect()
                    sub.client.loop_write()
                except OSError:
                    pass
                if sub.client.socket() is not None:
                    sub.client._sock_close()  # paho has no public close for an external loop
        self._sel.close()

    def close(self) -> None:
        """Disconnect every client and stop the thread."""
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish_many(port: int, messages: Sequence[tuple[str, bytes]], *, host: str = "127.0.0.1",
                 timeout: float = 10.0) -> None:
    """QoS 1 publishes of (topic, payload) straight to one broker over one connection, all in
    flight at once; MqttError unless every one is acknowledged (PUBACK) within ``timeout``.

    Raw MQTT 3.1.1 on a blocking socket rather than paho: paho's loop uses select(), which a
    test process holding hundreds of connections can outgrow (descriptors above 1023)."""
    from devstack.mqtt import mqtt_connect, publish_packet, read_packet

    try:
        sock = mqtt_connect(host, port, f"devstack-publisher-{os.getpid()}-{port}".encode(), timeout=timeout)
    except (OSError, ConnectionError) as exc:
        raise MqttError(f"publisher: cannot connect to the broker on port {port}: {exc}") from None
    acked = 0
    try:
        out = bytearray()
        for i, (topic, payload) in enumerate(messages):
            out += publish_packet(topic, payload, qos=1, packet_id=i % 65535 + 1)
        sock.sendall(out)
        deadline = time.monotonic() + timeout
        while acked < len(messages):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            ptype, body = read_packet(sock)
            if ptype == 4 and len(body) == 2:
                acked += 1
    except (OSError, ConnectionError) as exc:
        raise MqttError(f"publisher: {len(messages) - acked} of {len(messages)} messages not acknowledged by "
                        f"port {port}: {exc}") from None
    finally:
        sock.close()
