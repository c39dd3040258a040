"""A mosquitto broker as a managed process."""

from __future__ import annotations

import os
import re
from pathlib import Path

from devstack.procs import ManagedProcess, free_port, port_open, require_binary


class Mosquitto(ManagedProcess):
    """A mosquitto broker on 127.0.0.1:<port>, anonymous.

    ``persistence=False`` (the default): sessions live as long as the process, so
    ``stop()``/``start()`` loses them, like a broker crash. ``persistence=True``: mosquitto
    keeps its sessions in ``persistence_dir`` (one folder per broker), saves them on SIGTERM
    (``stop()``) and reads them back on ``start()``; ``kill()`` loses what was not saved yet.

    mosquitto started as root would drop to the ``mosquitto`` user, who cannot reach a
    pytest tmp folder (0700 parents): as root the config says ``user root`` (mosquitto
    then only warns). The broker log is ``broker_log_path`` (stdout is block-buffered
    when it is a file, so it cannot be the log); ``log_text()`` has both.
    """

    name = "mosquitto"
    _CONNECTED = re.compile(r"New client connected from (\S+) as (\S+)")

    def __init__(
        self,
        port: int | None = None,
        workdir: str | Path | None = None,
        label: str = "",
        *,
        persistence: bool = False,
    ) -> None:
        if label:
            self.name = f"mosquitto-{label}"
        super().__init__(workdir)
        self.binary = require_binary("mosquitto", "mosquitto")
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.label = label
        self.persistence = persistence
        self.persistence_dir = self.workdir / "persistence"
        self.conf_path = self.workdir / "mosquitto.conf"
        self.broker_log_path = self.workdir / "broker.log"
        self.broker_log_path.touch()
        os.chmod(self.workdir, 0o755)
        if persistence:
            self.persistence_dir.mkdir(exist_ok=True)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def persistence_file(self) -> Path:
        """Where mosquitto saves its sessions (exists after the first save)."""
        return self.persistence_dir / "mosquitto.db"

    def config_lines(self) -> list[str]:
        if self.persistence:
            store = [
                "persistence true",
                f"persistence_location {self.persistence_dir}/",
                f"persistence_file {self.persistence_file.name}",
            ]
        else:
            store = ["persistence false"]
        return [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            *store,
            *(["user root"] if os.geteuid() == 0 else []),
            f"log_dest file {self.broker_log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "set_tcp_nodelay true",
        ]

    def argv(self) -> list[str]:
        self.conf_path.write_text("\n".join(self.config_lines()) + "\n")
        return [self.binary, "-c", str(self.conf_path)]

    def ready(self) -> bool:
        return port_open(self.port, self.host)

    def log_text(self) -> str:
        try:
            broker = self.broker_log_path.read_text(errors="replace")
        except FileNotFoundError:
            broker = ""
        return broker + super().log_text()

    def connected_client_ids(self) -> list[str]:
        """Client ids of every CONNECT this broker accepted, in order (from its log)."""
        return [m.group(2) for m in map(self._CONNECTED.search, self.log_lines()) if m]
