"""A do-nothing agent on the product's own SPOP server: the middle path of the benchmarks.

``agent.server.SpopServer`` (the asyncio transport and the sans-IO codec the real agent runs)
with a dispatcher that answers every message with the same two set-vars, ``node`` = a fixed
node and ``how`` = "hit": no parsing of the CONNECT fields, no decision, no Redis, no
metrics, no health checks. With ``--node node1,node2,node3`` the node is picked by a hash of
the client id, so the clients spread over the brokers (still sticky). What it costs over the
C floor (``bench/floor_spoa.c``) is the price of Python + asyncio + the codec; what the real
agent costs over it is the decision.

    .venv/bin/python bench/null_agent.py --port 12345 [--node node2] [--cpu 0]

Prints "listening on HOST:PORT" once it accepts connections; SIGTERM stops it (in-flight
NOTIFYs are answered, then AGENT-DISCONNECT, as the real agent does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import zlib
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agent.model import DEFAULT_MAX_FRAME_SIZE
from agent.server import SpopServer
from agent.spop import Action, Message, Scope, SetVar


class NullDispatcher:
    """Two constant set-var actions per message (the objects are shared, as the real agent does).

    With several nodes, the node is picked by a CRC-32 of the client id (one dict lookup and a C
    hash: still next to nothing), so the clients spread over the brokers as the real agent's do."""

    def __init__(self, nodes: list[str], how: str = "hit") -> None:
        self.answers: list[list[Action]] = [
            [SetVar(Scope.TRANSACTION, "node", node), SetVar(Scope.TRANSACTION, "how", how)] for node in nodes]
        self.actions = self.answers[0]
        self.spread = len(nodes) > 1

    def start(self, message: Message, reply: Callable[[list[Action]], None]) -> None:
        """Answered at once, from the read path: the server's own cost, and nothing else."""
        if self.spread:
            cid = message.get("client_id")
            if isinstance(cid, bytes):
                reply(self.answers[zlib.crc32(cid) % len(self.answers)])
                return
        reply(self.actions)

    def on_error(self, message: Message, exc: BaseException) -> list[Action]:
        return self.actions


async def serve(host: str, port: int, node: str, max_in_flight: int) -> None:
    server = SpopServer(NullDispatcher(node.split(",")), host, port, max_in_flight=max_in_flight,
                        max_frame_size=DEFAULT_MAX_FRAME_SIZE)
    await server.start()
    print(f"listening on {host}:{server.port} (node {node})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown(grace=2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--node", default="node2",
                    help="the node every ACK names (default node2); several, comma-separated: picked by a hash of "
                         "the client id")
    ap.add_argument("--max-in-flight", type=int, default=64, help="as the agent's max_in_flight (default 64)")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    asyncio.run(serve(args.host, args.port, args.node, args.max_in_flight))


if __name__ == "__main__":
    main()
