"""The agent's own decision counters, read from its ``/metrics`` endpoint (for ``stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import Config

__all__ = ["METRICS_TIMEOUT", "AgentCounters", "ScrapeError", "default_metrics_url", "fetch"]

METRICS_TIMEOUT = 2.0


class ScrapeError(Exception):
    """The counters cannot be had; the message is one line."""


@dataclass(frozen=True, slots=True)
class AgentCounters:
    decisions: dict[str, int] = field(default_factory=dict)
    fallbacks: int | None = None
    redis_up: int | None = None


def default_metrics_url(config: Config | None) -> str | None:
    """``http://<metrics_listen>/metrics`` of the config, a wildcard address made local."""
    if config is None or config.metrics_listen is None:
        return None
    host, port = config.metrics_listen
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def fetch(url: str, timeout: float = METRICS_TIMEOUT) -> AgentCounters:
    """The agent's decision counters; :class:`ScrapeError` when they cannot be had."""
    # Imported here: only `stats` needs them, and every command pays for module imports.
    import http.client
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # an operator-given URL
            text = resp.read().decode("utf-8", "replace")
        return _parse(text)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise ScrapeError(" ".join(str(getattr(exc, "reason", None) or exc).split())) from None


def _parse(text: str) -> AgentCounters:
    from prometheus_client.parser import text_string_to_metric_families

    decisions: dict[str, float] = {}
    fallbacks: float | None = None
    redis_up: float | None = None
    seen = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mqtt_affinity_decisions_total":
                how = sample.labels.get("how", "")
                decisions[how] = decisions.get(how, 0.0) + sample.value
                seen = True
            elif sample.name == "mqtt_affinity_fallbacks_total":
                fallbacks = sample.value
                seen = True
            elif sample.name == "mqtt_affinity_redis_up":
                redis_up = sample.value
                seen = True
    if not seen:
        raise ValueError("no mqtt_affinity metrics in the answer")
    return AgentCounters(
        decisions={k: int(v) for k, v in sorted(decisions.items())},
        fallbacks=int(fallbacks) if fallbacks is not None else None,
        redis_up=int(redis_up) if redis_up is not None else None,
    )
