"""A small asyncio client of HAProxy's runtime API (the stats socket), for active evacuation.

One connection per call, in HAProxy's non-interactive mode: send one line (several commands
may be joined with ``;``), read until HAProxy closes. What the agent needs of it:

- ``show stat``: client connections per broker server (``scur``) of the MQTT backend;
- ``show sess``: the streams of that backend on one server (their ids);
- ``shutdown session <id>``: close one of them (HAProxy logs it with termination flag ``K``).

The socket must be at ``level admin`` for ``shutdown session`` (the shipped haproxy.cfg's is).
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.streams import close_writer

__all__ = ["RuntimeAPI", "RuntimeAPIError", "Stream", "parse_sessions", "parse_stat"]

#: Bytes read at most per answer: ``show sess`` for a few hundred thousand streams.
MAX_ANSWER = 256 * 1024 * 1024
#: Stream ids per ``shutdown session`` line (HAProxy reads a command line of up to its bufsize).
SHUTDOWN_BATCH = 100

# "0x55d0c0a4e000: proto=tcpv4 src=127.0.0.1:40000 fe=fe_mqtt be=be_mqtt srv=node2 ts=00 ..."
_SESS_RE = re.compile(r"^(0x[0-9a-fA-F]+): proto=\S+ .*?\bbe=(\S+) srv=(\S+)")


class RuntimeAPIError(Exception):
    """The runtime API could not be reached, or did not answer as expected."""


@dataclass(frozen=True, slots=True)
class Stream:
    """One line of ``show sess``."""

    id: str
    backend: str
    server: str


def parse_stat(text: str, backend: str) -> dict[str, int]:
    """``show stat`` CSV -> current sessions (``scur``) per server of ``backend``."""
    if text.startswith("# "):
        text = text[2:]
    out: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") != backend or row.get("svname") in (None, "FRONTEND", "BACKEND"):
            continue
        try:
            out[row["svname"]] = int(row.get("scur") or 0)
        except ValueError:
            continue
    if not out and "pxname" not in text[:200]:
        raise RuntimeAPIError(f"not a show stat answer: {text[:120]!r}")
    return out


def parse_sessions(text: str) -> list[Stream]:
    """``show sess`` -> the streams that have a backend and a server."""
    out = []
    for line in text.splitlines():
        m = _SESS_RE.match(line)
        if m:
            out.append(Stream(m.group(1), m.group(2), m.group(3)))
    return out


class RuntimeAPI:
    """``target``: a unix socket path, or (host, port) of a TCP stats socket."""

    def __init__(self, target: str | tuple[str, int], timeout: float = 2.0) -> None:
        self.target = target
        self.timeout = timeout

    def __repr__(self) -> str:
        t = self.target
        return f"RuntimeAPI({t if isinstance(t, str) else f'{t[0]}:{t[1]}'})"

    async def command(self, line: str) -> str:
        """Send one command line; HAProxy's whole answer. RuntimeAPIError on any failure."""
        if "\n" in line:
            raise ValueError("one line only")
        try:
            async with asyncio.timeout(self.timeout):
                if isinstance(self.target, str):
                    reader, writer = await asyncio.open_unix_connection(self.target)
                else:
                    reader, writer = await asyncio.open_connection(*self.target)
                chunks: list[bytes] = []
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    total = 0
                    while data := await reader.read(65536):
                        chunks.append(data)
                        total += len(data)
                        if total > MAX_ANSWER:
                            raise RuntimeAPIError(f"{self!r}: answer to {line[:40]!r} over {MAX_ANSWER} bytes")
                finally:
                    await close_writer(writer)
        except TimeoutError:
            raise RuntimeAPIError(f"{self!r}: no answer within {self.timeout:g}s to {line[:40]!r}") from None
        except OSError as exc:
            raise RuntimeAPIError(f"{self!r}: {exc.strerror or exc}") from None
        return b"".join(chunks).decode("utf-8", "replace")

    async def identity(self) -> str:
        """``<node>:<pid>`` from ``show info``: which HAProxy process this is (redundant agents of
        one balancer read the same one)."""
        info = {}
        for line in (await self.command("show info")).splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
        if "Pid" not in info:
            raise RuntimeAPIError(f"{self!r}: not a show info answer")
        return f"{info.get('node') or info.get('Node') or 'haproxy'}:{info['Pid']}"

    async def server_connections(self, backend: str) -> dict[str, int]:
        """Client connections per server of ``backend`` right now."""
        text = await self.command("show stat")
        if "Unknown command" in text[:200]:
            raise RuntimeAPIError(f"{self!r}: show stat refused: {text.strip()[:120]}")
        return parse_stat(text, backend)

    async def sessions(self, backend: str, server: str) -> list[str]:
        """Ids of the streams of ``backend`` on ``server``, as ``show sess`` lists them."""
        text = await self.command("show sess")
        return [s.id for s in parse_sessions(text) if s.backend == backend and s.server == server]

    async def shutdown(self, ids: Sequence[str]) -> int:
        """``shutdown session`` each id; how many HAProxy accepted (an id gone meanwhile is not)."""
        done = 0
        for batch in _chunks(ids, SHUTDOWN_BATCH):
            text = await self.command(";".join(f"shutdown session {i}" for i in batch))
            if "Permission denied" in text:
                raise RuntimeAPIError(f"{self!r}: shutdown session needs a stats socket at level admin")
            # Silence means success; each failure prints one line ("No such session (id=...)").
            failed = sum(1 for line in text.splitlines() if line.strip())
            done += max(0, len(batch) - failed)
        return done


def _chunks(items: Sequence[str], n: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
