"""The SPOE message handler: turns an ``mqtt-connect`` message into an ACK.

Kept apart from the server (which knows nothing of MQTT) and from the engine
(which knows nothing of SPOP). Every ACK sets at least ``how``: HAProxy 3.1+
leaves a stream waiting until ``timeout processing`` on an empty ACK.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.affinity import AffinityEngine, Decision
from agent.logs import warn_limited
from agent.metrics import Metrics
from agent.model import MESSAGE_NAME, VAR_HOW, VAR_NODE, How
from agent.request import ConnectRequest, parse_connect
from agent.spop import Action, Message, Scope, SetVar

log = logging.getLogger("mqtt_affinity.decision")

# Immutable, so shared by every ACK instead of rebuilt per decision.
_HOW_ACTIONS = {how: SetVar(Scope.TRANSACTION, VAR_HOW, how.value) for how in How}


def _show_id(client_id: bytes | None) -> str:
    """A bounded, printable rendering of a client id for logs."""
    if client_id is None:
        return "-"
    text = client_id[:64].decode("utf-8", "backslashreplace")
    return text + ("..." if len(client_id) > 64 else "")


class AffinityDispatcher:
    def __init__(self, engine: AffinityEngine, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics
        self._node_actions: dict[str, SetVar] = {}

    def _node_action(self, node: str) -> SetVar:
        action = self._node_actions.get(node)
        if action is None:
            if len(self._node_actions) > 1024:  # node names come from config, but stay bounded anyway
                self._node_actions.clear()
            action = self._node_actions[node] = SetVar(Scope.TRANSACTION, VAR_NODE, node)
        return action

    def start(self, message: Message, reply: Callable[[list[Action]], None]) -> None:
        """Decide one ``mqtt-connect`` message; ``reply(actions)`` now or from the Redis read path."""
        if message.name != MESSAGE_NAME:
            warn_limited(log, "unknown-message", "ignoring unknown SPOE message %r", message.name[:64])
            reply([_HOW_ACTIONS[How.NONE]])
            return
        started = time.perf_counter()
        request = parse_connect(message.args)

        def decided(decision: Decision) -> None:
            elapsed = time.perf_counter() - started
            self._metrics.record_decision(decision.how, decision.node, elapsed, decision.pin_ignored)
            if decision.cause is not None:
                self._metrics.record_redis_error(decision.cause)
            if decision.pin_ignored:
                warn_limited(log, f"pin-ignored-{decision.pin_ignored}",
                             "pin to node %r ignored: node is down, in maintenance or unknown", decision.pin_ignored)
            if log.isEnabledFor(logging.DEBUG):
                self._log(request, decision, elapsed)
            node = decision.node
            if node:
                reply([self._node_action(node), _HOW_ACTIONS[decision.how]])
            else:
                reply([_HOW_ACTIONS[decision.how]])

        self._engine.decide_cb(request, decided)

    def on_error(self, message: Message, exc: BaseException) -> list[Action]:
        # A bug, not an outage (the engine absorbs Redis failures): HAProxy's
        # consistent hash on txn.cid takes over, which both balancers share.
        self._metrics.record_decision(How.NONE, None, 0.0, None)
        return [_HOW_ACTIONS[How.NONE]]

    @staticmethod
    def _log(request: ConnectRequest, decision: Decision, elapsed: float) -> None:
        log.debug(
            "decision client_id=%s how=%s node=%s previous=%s source=%s ms=%.3f",
            _show_id(request.client_id), decision.how.value, decision.node, decision.previous, decision.source,
            elapsed * 1000,
            extra={"fields": {
                "client_id": _show_id(request.client_id),
                "how": decision.how.value,
                "node": decision.node,
                "previous": decision.previous,
                "pin_ignored": decision.pin_ignored,
                "source": decision.source,
                "persistent": request.persistent,
                "proto_ver": request.proto_ver,
                "balancer": request.balancer,
                "src": request.source,
                "ms": round(elapsed * 1000, 3),
                "error": decision.error,
            }},
        )
