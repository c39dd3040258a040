"""``redis-server`` as a managed process.

A stack takes a ``redis_url``, not a RedisServer: this class is one way to get that URL. A
Sentinel group (a primary, a replica, three ``redis-server --sentinel``) or a Cluster would be
other classes here, each offering a ``url`` the agents can use.
"""

from __future__ import annotations

import socket
from pathlib import Path

from devstack.procs import ManagedProcess, free_port, require_binary


class RedisServer(ManagedProcess):
    """``redis-server`` on 127.0.0.1:<port>, no persistence. ``start()`` again reuses the port."""

    name = "redis"

    def __init__(self, port: int | None = None, workdir: str | Path | None = None) -> None:
        super().__init__(workdir)
        self.binary = require_binary("redis-server", "redis-server")
        self.port = port or free_port()
        self.host = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", self.host,
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--daemonize", "no", "--logfile", "", "--protected-mode", "no",
        ]  # fmt: skip

    def ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False
