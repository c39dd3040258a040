"""asyncio stream helpers shared by the agent's small TCP clients and servers (broker probes,
agent-check, the HAProxy runtime API)."""

from __future__ import annotations

import asyncio

__all__ = ["close_writer"]


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close the connection and wait until it is gone; a peer that already reset it is no error
    (whatever the connection was for is decided by then)."""
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
