"""The project's vocabulary, defined once: decision outcomes, node states, Redis key names,
exit codes and protocol names.

Everything else imports these; nothing else spells them. The Lua script gets them too: its
source is prefixed with a prelude generated from this module (:func:`lua_prelude`), so a
``how`` value or a state name exists in exactly one place.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final

from agent.spop import DEFAULT_MAX_FRAME_SIZE

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_PREFIX",
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
#: ``placed:<node>`` score of a record that never expires: far beyond any unix time, exact in a double.
NO_EXPIRY_SCORE: Final = 1e18


class Keys:
    """Every Redis key name, for one key prefix.

    ``P`` = the prefix, ``<cid>`` = the client id's raw bytes. Each kind has its own fixed
    infix right after the prefix, so no client id (any bytes) can reach another client's key
    or another kind of key.
    """

    OWNER: Final = b"owner:"
    PIN: Final = b"pin:"
    PLACED: Final = b"placed:"
    EVAC: Final = b"evac:"
    NODE_STATE: Final = b"node-state"
    NODE_WEIGHT: Final = b"node-weight"
    EVACUATE_RATE: Final = b"evacuate-rate"
    NODE_DOWN: Final = b"node-down"
    CONNS: Final = b"conns:"
    EVICT: Final = b"evict:"

    __slots__ = ("prefix", "raw", "node_state", "node_weight", "evacuate_rate", "node_down")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.raw = prefix.encode("utf-8")
        #: HASH node -> state (see :class:`NodeState`).
        self.node_state = self.raw + self.NODE_STATE
        #: HASH node -> weight override.
        self.node_weight = self.raw + self.NODE_WEIGHT
        #: HASH node -> evacuation moves per second.
        self.evacuate_rate = self.raw + self.EVACUATE_RATE
        #: HASH node -> unix time an agent's probes found it down (informational: written on
        #: the down transition, removed on the up one; the CLI shows "down since" from it).
        self.node_down = self.raw + self.NODE_DOWN

    def owner(self, cid: bytes) -> bytes:
        """HASH ``{node, placed_at, by}``: where the client's session lives."""
        return self.raw + self.OWNER + cid

    def pin(self, cid: bytes) -> bytes:
        """HASH ``{node, reason, created_at}``: an operator pin."""
        return self.raw + self.PIN + cid

    def placed(self, node: str) -> bytes:
        """ZSET member cid, score = record expiry: the sessions placed on ``node``."""
        return self.raw + self.PLACED + node.encode("utf-8")

    def conns(self, haproxy: str) -> bytes:
        """HASH node -> client connections through one HAProxy process (``<node>:<pid>``), plus
        ``_at`` (unix time); short EXPIRE, refreshed by its agents (those with ``haproxy_socket``)."""
        return self.raw + self.CONNS + haproxy.encode("utf-8")

    def evict(self, node: str) -> bytes:
        """HASH ``{tokens, at}``: the shared token bucket of active evacuation of ``node``."""
        return self.raw + self.EVICT + node.encode("utf-8")

    def scan_pattern(self, infix: bytes) -> bytes:
        """A SCAN MATCH pattern for every key of one kind (glob characters in the prefix escaped)."""
        return _glob_escape(self.raw + infix) + b"*"


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
    lines.append(f"local INFIX_PLACED = {_lua_string(Keys.PLACED)}")
    lines.append(f"local INFIX_EVAC = {_lua_string(Keys.EVAC)}")
    lines.append(f"local NO_EXPIRY = {NO_EXPIRY_SCORE!r}")
    return "\n".join(lines) + "\n"
