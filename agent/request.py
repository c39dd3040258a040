"""The `mqtt-connect` SPOE message as a request, and the MQTT rules about session lifetime.

HAProxy's ``mqtt.field_value()`` hands us MQTT fields as BINARY holding ASCII decimals
(``proto_ver=b'5'``, ``flags=b'194'``, ``sess_expiry=b'300'``) and NULL when a field is absent.
Everything here is liberal on purpose: a CONNECT we cannot fully parse must still be routed
(HAProxy waits for our answer), so garbage becomes None instead of an exception, and an
unknown session type is treated as persistent, because wrongly keeping a client sticky costs
one Redis record while wrongly dropping stickiness loses the client's queued messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

__all__ = ["ConnectRequest", "parse_connect", "NEVER_EXPIRES", "CLEAN_SESSION_FLAG"]

#: MQTT 5 Session Expiry Interval meaning "the session does not expire".
NEVER_EXPIRES = 0xFFFFFFFF
#: CONNECT flags bit: Clean Session (3.1/3.1.1), Clean Start (5).
CLEAN_SESSION_FLAG = 0x02
MAX_CLIENT_ID = 65535

_MQTT5 = 5
_MQTT3 = frozenset({3, 4})


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    client_id: bytes | None
    username: bytes | None = None
    #: The client's address as HAProxy sent it (an ``ipaddress`` object, or text); only the
    #: logs read it, so it is turned into text there (:attr:`source`), not per decision.
    src: IPv4Address | IPv6Address | str | None = None
    proto_ver: int | None = None
    flags: int | None = None
    sess_expiry: int | None = None
    balancer: str | None = None

    @property
    def source(self) -> str | None:
        """The client's address as text."""
        src = self.src
        return src if src is None or isinstance(src, str) else str(src)

    @property
    def persistent(self) -> bool:
        """Whether the broker keeps this client's session after it disconnects.

        MQTT 3.1/3.1.1: the Clean Session flag decides. MQTT 5: only the Session Expiry
        Interval does (Clean Start merely discards an *old* session; a new one with expiry > 0
        still outlives the connection). An absent MQTT 5 expiry property means 0 by the spec,
        and HAProxy sends NULL exactly when the property is absent. Anything we cannot
        classify (unknown protocol, missing flags) counts as persistent.
        """
        if self.proto_ver == _MQTT5:
            return (self.sess_expiry or 0) > 0
        if self.proto_ver in _MQTT3 and self.flags is not None:
            return not (self.flags & CLEAN_SESSION_FLAG)
        return True

    def record_ttl(self, default_ttl: int) -> int | None:
        """How long the placement record should live; None = never expire.

        The record must outlive the broker's session or a reconnect after a long absence would
        be placed anew and miss its session, hence max(default, expiry) for MQTT 5.
        """
        if self.proto_ver == _MQTT5 and self.sess_expiry is not None:
            if self.sess_expiry >= NEVER_EXPIRES:
                return None
            return max(default_ttl, self.sess_expiry)
        return default_ttl


def _as_int(value: object, maximum: int) -> int | None:
    """ASCII decimal (bytes/str) or int -> int in [0, maximum]; anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    elif isinstance(value, (bytes, bytearray, memoryview, str)):
        raw = bytes(value) if not isinstance(value, str) else value.encode("utf-8", "replace")
        raw = raw.strip()
        # Digits only: int() would also accept "+5", "1_000", non-ASCII digits and huge input.
        if not raw or len(raw) > 20 or not raw.isdigit():
            return None
        n = int(raw)
    else:
        return None
    return n if 0 <= n <= maximum else None


def _as_bytes(value: object) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return None


def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return None


def _as_src(value: object) -> IPv4Address | IPv6Address | str | None:
    if isinstance(value, (IPv4Address, IPv6Address)):
        return value
    return _as_text(value)


def parse_connect(args: Iterable[tuple[str, object]]) -> ConnectRequest:
    """Build a request from SPOE message args; the first occurrence of a name wins, unknown names are ignored."""
    seen: dict[str, object] = {}
    for name, value in args:
        if name not in seen:
            seen[name] = value

    client_id = _as_bytes(seen.get("client_id"))
    if not client_id or len(client_id) > MAX_CLIENT_ID:
        # Empty: the broker assigns an id, nothing to be sticky about. Over-long: not valid MQTT.
        client_id = None
    return ConnectRequest(
        client_id=client_id,
        username=_as_bytes(seen.get("username")),
        src=_as_src(seen.get("src")),
        proto_ver=_as_int(seen.get("proto_ver"), 255),
        flags=_as_int(seen.get("flags"), 255),
        sess_expiry=_as_int(seen.get("sess_expiry"), NEVER_EXPIRES),
        balancer=_as_text(seen.get("balancer")),
    )
