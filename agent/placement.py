"""Weighted rendezvous (highest-random-weight) hashing for choosing a client's broker.

Why HRW: every HAProxy balancer runs its own agent, and when Redis cannot be reached each
agent still has to send a client to the *same* broker as its peers, with nothing but the node
list to go on. HRW gives that with no shared state, and when a node disappears only the
clients it owned move (each to its own runner-up), instead of reshuffling everybody.

Determinism across machines and Python versions is the whole point, so:

* the hash is BLAKE2b (``hashlib``), never ``hash()`` (randomised per process);
* the client id is first reduced to a 16-byte BLAKE2b digest (so a 64 KiB id is hashed once,
  not once per node), then each node scores ``blake2b(len(name) || name || digest)``; the
  length prefix keeps ``("ab", "c…")`` and ``("a", "bc…")`` apart;
* ``u`` in the open interval (0, 1) comes from the top 52 bits of that hash plus one half,
  which is exactly representable in a double, so ``ln(u)`` is never 0 or -inf;
* score = ``-weight / ln(u)`` (the standard weighted HRW: node i wins a key with probability
  ``w_i / sum(w)``); weight <= 0 or non-finite means the node is never chosen;
* exact score ties go to the lexicographically smallest name, and the input order of the
  node list never matters.

Node names are expected to be unique; a duplicated name is scored once per occurrence, with
the same hash, so the larger of its weights is what effectively counts.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence

__all__ = ["choose", "rank", "score"]

_DIGEST = 16
_SCORE_BYTES = 8
# 2**52: the numerator (h >> 12) + 0.5 needs at most 53 significant bits -> exact in a float.
_SCALE = float(1 << 52)


@functools.lru_cache(maxsize=4096)
def _name_prefix(name: str) -> bytes:
    """Length-prefixed UTF-8 name; cached because the node list is tiny and hashed per CONNECT."""
    raw = name.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def _key_digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=_DIGEST).digest()


def _score(digest: bytes, name: str, weight: float) -> float:
    h = int.from_bytes(
        hashlib.blake2b(_name_prefix(name) + digest, digest_size=_SCORE_BYTES).digest(), "big"
    )
    u = ((h >> 12) + 0.5) / _SCALE  # strictly inside (0, 1)
    return -weight / math.log(u)


def _eligible(weight: float) -> bool:
    return weight > 0.0 and math.isfinite(weight)


def score(key: bytes, name: str, weight: float) -> float:
    """The HRW score of one node for one key (exposed for tests and debugging tools)."""
    if not _eligible(weight):
        return 0.0
    return _score(_key_digest(key), name, weight)


def choose(key: bytes, nodes: Sequence[tuple[str, float]]) -> str | None:
    """The node that owns ``key``; None when no node has a positive weight."""
    digest = _key_digest(key)
    best_name: str | None = None
    best_score = 0.0
    for name, weight in nodes:
        if not _eligible(weight):
            continue
        s = _score(digest, name, weight)
        if best_name is None or s > best_score or (s == best_score and name < best_name):
            best_name, best_score = name, s
    return best_name


def rank(key: bytes, nodes: Sequence[tuple[str, float]]) -> list[str]:
    """All eligible nodes, best first: ``rank(k, n)[0] == choose(k, n)``; zero-weight nodes omitted."""
    digest = _key_digest(key)
    scored = [(-_score(digest, name, w), name) for name, w in nodes if _eligible(w)]
    scored.sort()
    out: list[str] = []
    seen: set[str] = set()
    for _, name in scored:
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out
