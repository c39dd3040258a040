"""The project's vocabulary, defined once: decision outcomes, node states, Redis key names,
exit codes and protocol names.

Everything else imports these; nothing else spells them. The Lua script gets them too: its
source is prefixed with a prelude generated from this module (:func:`lua_prelude`), so a
``how`` value or a state name exists in exactly one place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

from agent.spop import DEFAULT_MAX_FRAME_SIZE

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_PREFIX",
    "LAYOUT_VERSION",
    "NEVER",
    "OwnerRecord",
    "PinRecord",
    "SEP",
    "ExitCode",
    "How",
    "Keys",
    "MESSAGE_NAME",
    "NO_EXPIRY_SCORE",
    "NodeState",
    "VAR_HOW",
    "VAR_NODE",
    "lua_prelude",
]


class How(StrEnum):
    """How a decision was reached: the ``how`` variable HAProxy receives and logs."""

    #: The client's record names a usable node; the record's TTL was refreshed.
    HIT = "hit"
    #: A new persistent client: a record was written for the HRW candidate.
    ASSIGNED = "assigned"
    #: The record's node was down, in maintenance, unknown or evacuating: re-placed.
    MOVED = "moved"
    #: An operator pin to a usable node.
    PINNED = "pinned"
    #: Redis unavailable: the same HRW hash, computed locally by every agent alike.
    FALLBACK = "fallback"
    #: Nothing to be sticky about (no client id, a clean session without record) or no usable node.
    NONE = "none"
    #: A persistent client whose owner is down for less than ``owner_down_grace``: no node is
    #: named and HAProxy refuses the connection, so the client retries and finds its session
    #: on its owner when that broker is back.
    WAIT = "wait"


#: Outcomes only the Redis script produces (``fallback`` is the engine's own).
SCRIPT_HOWS: Final = frozenset({How.HIT, How.ASSIGNED, How.MOVED, How.PINNED, How.NONE, How.WAIT})


class NodeState(StrEnum):
    """Operator state of a broker node (``P node-state``; a missing entry is ``active``)."""

    ACTIVE = "active"
    #: Keeps its clients, gets no new ones.
    DRAIN = "drain"
    #: As drain, and its clients are moved away as they reconnect, at a shared rate.
    EVACUATE = "evacuate"
    #: Gets nobody: treated as down.
    MAINTENANCE = "maintenance"


class ExitCode(IntEnum):
    """Exit status of every ``mqtt-affinity`` command, the agent included."""

    OK = 0
    #: The thing asked about does not exist, Redis cannot be reached, or the agent could not start.
    NOT_FOUND = 1
    #: Bad usage or a bad config (one line on stderr names the problem).
    USAGE = 2


#: The SPOE message the shipped ``spoe-mqtt.conf`` sends, and the variables the ACK sets
#: (``option var-prefix mqtt``: HAProxy sees ``txn.mqtt.node`` and ``txn.mqtt.how``).
MESSAGE_NAME: Final = "mqtt-connect"
VAR_NODE: Final = "node"
VAR_HOW: Final = "how"

DEFAULT_PREFIX: Final = "mqtt-affinity:"
#: Record buckets of a new deployment (the number in force lives in Redis: ``P layout``).
DEFAULT_BUCKETS: Final = 16384
#: The layout version this agent writes. Version 1 (one HASH per client, ``placed:<node>``
#: ZSETs) is still read through until ``mqtt-affinity migrate`` has run.
LAYOUT_VERSION: Final = 2
#: A record's ``expiry`` when the session never expires.
NEVER: Final = 0
#: Separator of a record's fields; node names can never contain it (see agent.config).
SEP: Final = "|"
#: ZSET score of a version-1 ``placed:<node>`` member that never expires (migration only).
NO_EXPIRY_SCORE: Final = 1e18


class Keys:
    """Every Redis key name, for one key prefix ``P``.

    Per client (everything one decision touches is in one Cluster slot):

    - ``P{<b>}o``  HASH cid -> owner record ``node|expiry|placed_at|by``
    - ``P{<b>}p``  HASH cid -> pin ``node|expiry|created_at|reason``

    where ``<b>`` is the client's record bucket (:meth:`bucket`): a hash of the client id,
    so the hash tag never contains the id itself (which may hold braces) and both keys of
    one client are always in the same slot. Many clients share a bucket: Redis stores a
    small HASH as one compact listpack, which is what brings a session under 150 bytes.
    ``expiry`` is unix seconds (0 = never): records expire in the value, and a background
    sweep removes expired ones and counts sessions per node.

    Global (one key each, so each may live in its own slot): node states, weights, rates,
    the session counts of the last sweep, the sweep lease, one evacuation budget per node,
    the layout, when nodes went down, connection counts per HAProxy, one eviction token
    bucket per node. Each kind has its own fixed text after ``P``, and ``P`` may not contain
    braces, so no client id can reach another kind of key.
    """

    OWNERS: Final = b"o"
    PINS: Final = b"p"
    NODE_STATE: Final = b"node-state"
    NODE_WEIGHT: Final = b"node-weight"
    EVACUATE_RATE: Final = b"evacuate-rate"
    SESSIONS: Final = b"sessions"
    SWEEP_LEASE: Final = b"sweep-lease"
    EVAC: Final = b"evac-budget:"
    LAYOUT: Final = b"layout"
    NODE_DOWN: Final = b"node-down"
    CONNS: Final = b"conns:"
    EVICT: Final = b"evict:"
    # Version 1 (read through, then removed by `mqtt-affinity migrate`).
    V1_OWNER: Final = b"owner:"
    V1_PIN: Final = b"pin:"
    V1_PLACED: Final = b"placed:"

    __slots__ = ("buckets", "evacuate_rate", "layout", "node_down", "node_state", "node_weight", "prefix", "raw",
                 "sessions", "sweep_lease")

    def __init__(self, prefix: str = DEFAULT_PREFIX, buckets: int = DEFAULT_BUCKETS) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a key prefix may not contain braces (they would change the hash tag)")
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        self.prefix = prefix
        self.raw = prefix.encode("utf-8")
        self.buckets = buckets
        #: HASH node -> state (see :class:`NodeState`).
        self.node_state = self.raw + self.NODE_STATE
        #: HASH node -> weight override.
        self.node_weight = self.raw + self.NODE_WEIGHT
        #: HASH node -> evacuation moves per second.
        self.evacuate_rate = self.raw + self.EVACUATE_RATE
        #: HASH node -> sessions counted by the last sweep; ``_at`` -> when it finished.
        self.sessions = self.raw + self.SESSIONS
        #: STRING: which agent sweeps now (SET NX PX).
        self.sweep_lease = self.raw + self.SWEEP_LEASE
        #: HASH {version, buckets}: written once, read by every agent and the CLI.
        self.layout = self.raw + self.LAYOUT
        #: HASH node -> unix time an agent's probes found it down (informational: written on
        #: the down transition, removed on the up one; the CLI shows "down since" from it).
        self.node_down = self.raw + self.NODE_DOWN

    def with_buckets(self, buckets: int) -> Keys:
        return Keys(self.prefix, buckets)

    def bucket(self, cid: bytes) -> int:
        """The client's record bucket: the same on every agent (BLAKE2b, like placement)."""
        digest = hashlib.blake2b(cid, digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.buckets

    def owners(self, bucket: int) -> bytes:
        return b"%s{%d}%s" % (self.raw, bucket, self.OWNERS)

    def pins(self, bucket: int) -> bytes:
        return b"%s{%d}%s" % (self.raw, bucket, self.PINS)

    def client(self, cid: bytes) -> tuple[bytes, bytes]:
        """(owners key, pins key) of one client: same bucket, same slot."""
        b = self.bucket(cid)
        return self.owners(b), self.pins(b)

    def evac_budget(self, node: str) -> bytes:
        """STRING ``<redis second> <moves>``: the evacuation budget shared by every agent."""
        return self.raw + self.EVAC + node.encode("utf-8")

    def v1_owner(self, cid: bytes) -> bytes:
        return self.raw + self.V1_OWNER + cid

    def v1_pin(self, cid: bytes) -> bytes:
        return self.raw + self.V1_PIN + cid

    def v1_placed(self, node: str) -> bytes:
        return self.raw + self.V1_PLACED + node.encode("utf-8")

    def conns(self, haproxy: str) -> bytes:
        """HASH node -> client connections through one HAProxy process (``<node>:<pid>``), plus
        ``_at`` (unix time); short EXPIRE, refreshed by its agents (those with ``haproxy_socket``)."""
        return self.raw + self.CONNS + haproxy.encode("utf-8")

    def evict(self, node: str) -> bytes:
        """HASH ``{tokens, at}``: the shared token bucket of active evacuation of ``node``."""
        return self.raw + self.EVICT + node.encode("utf-8")

    def scan_pattern(self, infix: bytes) -> bytes:
        """A SCAN MATCH pattern for keys that start with ``P`` + ``infix`` (glob characters escaped)."""
        return _glob_escape(self.raw + infix) + b"*"

    def bucket_pattern(self, kind: bytes) -> bytes:
        """A SCAN MATCH pattern for every bucket key of one kind (``OWNERS`` or ``PINS``)."""
        return _glob_escape(self.raw) + b"{*}" + kind


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """One client's owner record, as stored in its bucket."""

    node: str
    expiry: int
    placed_at: int
    by: str

    def encode(self) -> bytes:
        return f"{self.node}{SEP}{self.expiry}{SEP}{self.placed_at}{SEP}{self.by}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> OwnerRecord:
        node, expiry, placed_at, by = _fields(raw)
        return cls(node, _int(expiry), _int(placed_at), by)

    def live(self, now: float) -> bool:
        return self.expiry == NEVER or self.expiry > now


@dataclass(frozen=True, slots=True)
class PinRecord:
    """An operator pin, as stored in its bucket."""

    node: str
    expiry: int
    created_at: int
    reason: str

    def encode(self) -> bytes:
        return f"{self.node}{SEP}{self.expiry}{SEP}{self.created_at}{SEP}{self.reason}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> PinRecord:
        node, expiry, created_at, reason = _fields(raw)
        return cls(node, _int(expiry), _int(created_at), reason)

    def live(self, now: float) -> bool:
        return self.expiry == NEVER or self.expiry > now


def _fields(raw: bytes) -> tuple[str, str, str, str]:
    """A record's four fields; missing ones are empty (the last one may hold the separator)."""
    parts = raw.decode("utf-8", "replace").split(SEP, 3)
    parts += [""] * (4 - len(parts))
    return parts[0], parts[1], parts[2], parts[3]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _glob_escape(raw: bytes) -> bytes:
    out = bytearray()
    for b in raw:
        if b in b"*?[]\\":
            out.append(0x5C)
        out.append(b)
    return bytes(out)


def _lua_string(value: str | bytes) -> str:
    text = value.decode("ascii") if isinstance(value, bytes) else value
    if not text.isascii() or any(c in text for c in "'\\\n"):
        raise ValueError(f"not a plain Lua string literal: {text!r}")
    return f"'{text}'"


def lua_prelude() -> str:
    """Lua ``local`` definitions of the vocabulary, prepended to every script at load time."""
    lines = ["-- generated from agent/model.py: the one definition of these names"]
    for how in How:
        lines.append(f"local HOW_{how.name} = {_lua_string(how.value)}")
    for state in NodeState:
        lines.append(f"local STATE_{state.name} = {_lua_string(state.value)}")
    lines.append(f"local SEP = {_lua_string(SEP)}")
    lines.append(f"local NEVER = {NEVER}")
    return "\n".join(lines) + "\n"
