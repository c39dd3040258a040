"""The CLI's idea of broker health: one TCP connect per node, now.

The agent probes continuously (tcp or mqtt, with rise/fall); a one-shot command cannot
reproduce that state, so "down" here means: a single TCP connect to the node's configured
address failed within the config's ``health.timeout``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

__all__ = ["DEFAULT_PROBE_TIMEOUT", "probe", "probe_many"]

#: Probe timeout when there is no config to take ``health.timeout`` from.
DEFAULT_PROBE_TIMEOUT = 0.5
_MAX_WORKERS = 16


def probe(addr: tuple[str, int] | None, timeout: float) -> bool | None:
    """One TCP connect: True up, False down, None when there is no address to try."""
    if addr is None:
        return None
    try:
        with socket.create_connection(addr, timeout=timeout):
            return True
    except OSError:
        return False


def probe_many(addresses: Mapping[str, tuple[str, int] | None], timeout: float) -> dict[str, bool | None]:
    """Probe every node in parallel, so a few dead nodes cost one timeout, not one each."""
    if not addresses:
        return {}
    names = list(addresses)
    with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(names))) as pool:
        results = pool.map(lambda n: probe(addresses[n], timeout), names)
        return dict(zip(names, results))
