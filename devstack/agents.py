"""The mqtt-affinity agent as a managed process, and the YAML it reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from devstack.procs import REPO_ROOT, ManagedProcess, ToolMissing, port_open, wait_until

#: What every generated agent config says unless overridden: fast health checks and state
#: refresh, so a test sees a broker go down or an operator change within a second; no
#: SIGTERM drain (a stack stops its balancers before its agents, so a drain would only add
#: seconds to every teardown: scenarios that restart an agent under load pass
#: ``overrides={"drain_period": None}`` to get the agent's default).
AGENT_DEFAULTS: dict[str, object] = {
    "session_ttl": 3600,
    "redis_timeout": 0.25,
    "state_refresh": 0.2,
    "health": {"check": "tcp", "interval": 0.3, "timeout": 0.25, "rise": 2, "fall": 2},
    "drain_period": 0,
    "log_level": "info",
    # Scenarios of a dead broker expect its clients to move at once; the restart-grace
    # scenarios set their own.
    "owner_down_grace": 0,
    # Session counts within a scenario (the product default is 300 s; a sweep pass over every
    # bucket costs the sweeping agent about 0.2 s of CPU).
    "sweep_interval": 30,
}


def agent_command() -> str:
    """The ``mqtt-affinity`` console script of the project virtualenv (ToolMissing if absent)."""
    for path in (Path(sys.executable).parent / "mqtt-affinity", REPO_ROOT / ".venv" / "bin" / "mqtt-affinity"):
        if path.exists():
            return str(path)
    raise ToolMissing("the mqtt-affinity command is missing from the virtualenv: run `make bootstrap`")


def _scalar(value: object) -> str:
    if isinstance(value, str):
        return value if value.replace("-", "").replace("_", "").isalnum() else json.dumps(value)
    return json.dumps(value)


def _flow(mapping: Mapping[str, object]) -> str:
    return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in mapping.items()) + "}"


def _render(key: str, value: object) -> list[str]:
    """One top-level key: a str is YAML text as it is, a mapping or list is written in block
    style (list items that are mappings as one flow mapping per line), anything else as JSON."""
    if isinstance(value, str):
        return [f"{key}: {value}"]
    if isinstance(value, Mapping):
        return [f"{key}:", *(f"  {k}: {_scalar(v)}" for k, v in value.items())]
    if isinstance(value, (list, tuple)):
        return [f"{key}:", *(f"  - {_flow(v) if isinstance(v, Mapping) else _scalar(v)}" for v in value)]
    return [f"{key}: {json.dumps(value)}"]


def write_agent_config(
    path: str | Path,
    *,
    spop_port: int,
    metrics_port: int,
    redis_url: str,
    nodes: Sequence[tuple[str, str]],
    overrides: Mapping[str, object] | None = None,
) -> Path:
    """Write an agent YAML listening on 127.0.0.1 and return its path.

    ``nodes``: (name, "host:port") in order, each written as one line
    ``  - {name: node1, address: "127.0.0.1:P", weight: 1}``. Then ``AGENT_DEFAULTS``.
    ``overrides`` replaces or adds top-level keys (``None`` removes one): a str value is
    YAML text as it is, e.g. ``{"redis_pool_size": "128"}``; mappings and lists are written
    in block style, other values as JSON.
    """
    path = Path(path)
    keys: dict[str, object] = {
        "listen": f"127.0.0.1:{spop_port}",
        "metrics_listen": f"127.0.0.1:{metrics_port}",
        "redis_url": redis_url,
        "nodes": [{"name": name, "address": addr, "weight": 1} for name, addr in nodes],
        **AGENT_DEFAULTS,
    }
    for key, value in (overrides or {}).items():
        if value is None:
            keys.pop(key, None)
        else:
            keys[key] = value
    lines = ["# mqtt-affinity agent written by devstack (config/agent.yaml documents every key)"]
    for key, value in keys.items():
        lines += _render(key, value)
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess(ManagedProcess):
    """``mqtt-affinity run --config FILE``; stderr -> ``stderr_path``, stdout -> ``log_path``.

    ``start()`` only checks that it did not die at once; use ``wait_listening()``.
    ``spop_port``/``metrics_port``, when given, are where its config makes it listen (the
    Stack gives them): ``addr`` is then its SPOP address and ``metrics_text()`` works.
    ``reconfigure(**keys)`` rewrites top-level keys of its YAML and reloads it (SIGHUP).
    """

    name = "agent"
    startup_timeout = 0.2

    def __init__(
        self,
        config_path: str | Path,
        env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
        extra_args: Iterable[str] = (),
        *,
        label: str = "",
        spop_port: int | None = None,
        metrics_port: int | None = None,
        agent_check_port: int | None = None,
        haproxy_socket: str | Path | None = None,
    ) -> None:
        if label:
            self.name = f"agent-{label}"
        super().__init__(workdir)
        self.label = label
        self.config_path = Path(config_path)
        self.stderr_path = self.workdir / f"{self.name}.stderr"
        self.extra_args = list(extra_args)
        self.spop_port = spop_port
        self.metrics_port = metrics_port
        #: Its agent-check listener (``agent_check_listen``), and the HAProxy runtime API socket
        #: it is configured with (``haproxy_socket``): the balancer it serves uses both.
        self.agent_check_port = agent_check_port
        self.haproxy_socket = Path(haproxy_socket) if haproxy_socket else None
        self._env = dict(os.environ)
        self._env.setdefault("PYTHONUNBUFFERED", "1")
        self._env.update(env or {})

    @property
    def addr(self) -> str:
        if self.spop_port is None:
            raise ValueError(f"{self.name}: SPOP port unknown")
        return f"127.0.0.1:{self.spop_port}"

    def env(self) -> dict[str, str]:
        return self._env

    def argv(self) -> list[str]:
        return [agent_command(), "run", "--config", str(self.config_path), *self.extra_args]

    def start(self) -> AgentProcess:
        if self.running:
            raise RuntimeError(f"agent already running (pid {self.pid})")
        self._spawn(self.argv(), stderr_path=self.stderr_path)
        return self

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:  # stdout and stderr, for failure messages
        out = super().log_text()
        return out + ("\n--- stderr ---\n" + self.stderr_text() if self.stderr_text() else "")

    def wait_listening(self, port: int | None = None, host: str = "127.0.0.1", timeout: float = 15.0) -> AgentProcess:
        """Poll until ``host:port`` (default: its SPOP port) accepts TCP; ProcessFailed if it exits first."""
        port = port or self.spop_port
        if port is None:
            raise ValueError(f"{self.name}: which port? (no spop_port given)")
        wait_until(
            lambda: self.check_alive() and port_open(port, host),
            timeout=timeout,
            interval=0.05,
            message=lambda: f"{self.name} not listening on {host}:{port} after {timeout}s\n{self.log_text()}",
        )
        return self

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the agent to exit by itself (e.g. a config error); returns its exit code."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"agent still running after {timeout}s\n{self.log_text()}") from None
        rc = self._reaped()
        assert rc is not None
        return rc

    def reconfigure(self, timeout: float = 10.0, **keys: object) -> None:
        """Set top-level keys of its YAML (None removes one), SIGHUP it and wait until it logs
        the reload (ProcessFailed if it exits; TimeoutError if it never reloads)."""
        import yaml

        data = yaml.safe_load(self.config_path.read_text())
        for key, value in keys.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        before = self.stderr_text().count("reloaded ")
        self.send_signal(signal.SIGHUP)
        wait_until(lambda: self.check_alive() and self.stderr_text().count("reloaded ") > before, timeout=timeout,
                   message=lambda: f"{self.name} did not reload within {timeout}s\n{self.log_text()[-3000:]}")

    def metrics_text(self, timeout: float = 2.0) -> str:
        """The body of its /metrics (OSError if it does not answer)."""
        if self.metrics_port is None:
            raise ValueError(f"{self.name}: metrics port unknown")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=timeout) as resp:
            return resp.read().decode()
