"""Real helper processes for the tests: Redis, mosquitto brokers, HAProxy 2.6/3.2, the agent.

No mocks. Every process listens on a free port chosen at run time (never 6379/1883) and
writes its output to a file in its own work directory, so tests can read the logs.
Each class has ``start()``, ``stop()`` (graceful, returns the exit code) and ``kill()``;
the pytest fixtures in ``tests/conftest.py`` stop whatever they started, also on failure,
and an ``atexit`` hook kills anything still running that this module started.
"""

from __future__ import annotations

import atexit
import csv
import io
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG_DIR = REPO_ROOT / "haproxy"
HAPROXY_CFG = HAPROXY_CFG_DIR / "haproxy.cfg"
SPOE_CONF = HAPROXY_CFG_DIR / "spoe-mqtt.conf"
NATIVE_STICK_CFG = HAPROXY_CFG_DIR / "native-stick.cfg"
HAPROXY_VERSIONS = ("2.6", "3.2")

T = TypeVar("T")

class ToolMissing(RuntimeError):
    """A required binary is not installed; the message says how to install it."""

class ProcessFailed(RuntimeError):
    """A helper process failed to start or exited early; the message carries its output."""

# --------------------------------------------------------------------------- helpers

def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_PORT_RNG = random.Random(os.getpid())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``, outside the kernel's ephemeral range.

    Port 0 would hand out an ephemeral port, and the tests' own outgoing connections
    (a thousand at a time in the storm tests) draw from that same range: one of them can
    take the port between this call and the listener's bind. Below the range, only
    another listener can.
    """
    lo, _ = _ephemeral_range()
    top = max(lo - 1, 12000)
    for _ in range(200):
        port = _PORT_RNG.randint(10000, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Raises ``TimeoutError`` (with ``message``, or a callable producing one, e.g. to
    attach a log) if it never does within ``timeout`` seconds. Exceptions raised by the
    predicate propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(text or f"condition not met within {timeout}s: {predicate!r}")
        time.sleep(interval)

def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False

_LIVE: "weakref.WeakSet[ManagedProcess]" = weakref.WeakSet()

@atexit.register
def _kill_leftovers() -> None:  # safety net: only processes this module started
    for proc in list(_LIVE):
        try:
            proc.kill()
        except Exception:
            pass

class ManagedProcess:
    """A child process whose stdout+stderr go to ``self.log_path``."""

    name = "process"

    def __init__(self, workdir: str | Path | None = None) -> None:
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    # subclasses provide argv() and ready()
    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return True

    def env(self) -> dict[str, str] | None:
        return None

    startup_timeout = 10.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, argv: list[str], stderr_path: Path | None = None) -> None:
        out = open(self.log_path, "ab")
        err = open(stderr_path, "ab") if stderr_path else subprocess.STDOUT
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.workdir,
                env=self.env(),
                start_new_session=True,  # a Ctrl-C in pytest does not hit it first
            )
        finally:
            out.close()
            if stderr_path:
                err.close()  # type: ignore[union-attr]
        self.returncode = None
        _LIVE.add(self)

    def start(self) -> "ManagedProcess":
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        self._spawn(self.argv())
        try:
            wait_until(
                lambda: self._check_alive() and self.ready(),
                timeout=self.startup_timeout,
                message=lambda: f"{self.name} not ready within {self.startup_timeout}s:\n{self.log_text()}",
            )
        except BaseException:
            self.kill()
            raise
        return self

    def _check_alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessFailed(
                f"{self.name} exited with {self.proc.returncode}: {' '.join(self.argv())}\n{self.log_text()}"
            )
        return True

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal (SIGTERM by default), wait, SIGKILL if needed. Returns the exit code."""
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.returncode = self.proc.returncode
        self.proc = None
        _LIVE.discard(self)
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL at once (a crash, for outage tests)."""
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.returncode = self.proc.returncode
        self.proc = None
        _LIVE.discard(self)
        return self.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

def _require(binary: str, package: str) -> str:
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/bin/{binary}", f"/usr/sbin/{binary}") if os.access(p, os.X_OK)), None
    )
    if not path:
        raise ToolMissing(
            f"{binary} not found. Install it: `sudo scripts/bootstrap.sh` "
            f"(or: apt-get update && apt-get install -y --no-install-recommends {package})"
        )
    return path

# --------------------------------------------------------------------------- Redis

class RedisServer(ManagedProcess):
    """``redis-server`` on 127.0.0.1:<port>, no persistence. ``start()`` again reuses the port."""

    name = "redis"

    def __init__(self, port: int | None = None, workdir: str | Path | None = None) -> None:
        super().__init__(workdir)
        self.binary = _require("redis-server", "redis-server")
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

# --------------------------------------------------------------------------- mosquitto

class Mosquitto(ManagedProcess):
    """A mosquitto broker on 127.0.0.1:<port>, anonymous, in-memory sessions.

    ``persistence false``: sessions live as long as the process, which is what the
    persistent-session tests need (``stop()``/``start()`` loses them, like a broker crash).
    mosquitto started as root would drop to the ``mosquitto`` user, who cannot reach a
    pytest tmp folder (0700 parents): as root the config says ``user root`` (mosquitto
    then only warns). The broker log is ``broker_log_path`` (stdout is block-buffered
    when it is a file, so it cannot be the log); ``log_text()`` has both.
    """

    name = "mosquitto"
    _CONNECTED = re.compile(r"New client connected from (\S+) as (\S+)")

    def __init__(self, port: int | None = None, workdir: str | Path | None = None, label: str = "") -> None:
        if label:
            self.name = f"mosquitto-{label}"
        super().__init__(workdir)
        self.binary = _require("mosquitto", "mosquitto")
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.label = label
        self.conf_path = self.workdir / "mosquitto.conf"
        self.broker_log_path = self.workdir / "broker.log"
        self.broker_log_path.touch()
        os.chmod(self.workdir, 0o755)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        self.conf_path.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    "persistence false",
                    *(["user root"] if os.geteuid() == 0 else []),
                    f"log_dest file {self.broker_log_path}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    "connection_messages true",
                    "log_timestamp true",
                    "set_tcp_nodelay true",
                    "",
                ]
            )
        )
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

# --------------------------------------------------------------------------- HAProxy

_FIX_HAPROXY = {
    "2.6": "sudo scripts/bootstrap.sh   (installs Debian bookworm's haproxy 2.6: apt-get install -y haproxy)",
    "3.2": "sudo scripts/fetch-haproxy32.sh   (unpacks HAProxy 3.2 from Debian sid into .haproxy/3.2/)",
}

def haproxy_binary(version: str) -> str:
    """Path of the HAProxy binary for ``version`` ("2.6" or "3.2"), checked with ``-v``.

    2.6: ``$HAPROXY26_BIN`` or /usr/sbin/haproxy. 3.2: ``$HAPROXY32_BIN`` or
    ``.haproxy/3.2/haproxy``. Raises ToolMissing with the command that fixes it.
    """
    if version == "2.6":
        path = os.environ.get("HAPROXY26_BIN") or "/usr/sbin/haproxy"
    elif version == "3.2":
        path = os.environ.get("HAPROXY32_BIN") or str(REPO_ROOT / ".haproxy" / "3.2" / "haproxy")
    else:
        raise ValueError(f"unknown HAProxy version {version!r} (expected one of {HAPROXY_VERSIONS})")
    if not os.access(path, os.X_OK):
        raise ToolMissing(f"HAProxy {version} not found at {path}. Fix: {_FIX_HAPROXY[version]}")
    try:
        out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolMissing(f"HAProxy {version} at {path} does not run ({exc}). Fix: {_FIX_HAPROXY[version]}")
    first = out.splitlines()[0] if out else ""
    if f"version {version}." not in first:
        raise ToolMissing(f"{path} is not HAProxy {version} ({first!r}). Fix: {_FIX_HAPROXY[version]}")
    return path

def haproxy_env(
    *,
    mqtt_port: int,
    broker_addrs: Iterable[str],
    spoa_port: int | None = None,
    balancer_name: str = "ha1",
    spoe_conf: str | Path = SPOE_CONF,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment variables that haproxy/haproxy.cfg (and native-stick.cfg) read.

    ``broker_addrs``: exactly three "host:port" (node1..node3). ``spoa_port`` defaults to a
    free port nobody listens on (the agent is then DOWN). The stats socket is added by
    ``HAProxy`` itself.
    """
    addrs = list(broker_addrs)
    if len(addrs) != 3:
        raise ValueError(f"haproxy.cfg has exactly three servers node1..node3, got {len(addrs)} addresses")
    env = {
        "MQTT_BIND": f"127.0.0.1:{mqtt_port}",
        "NODE1_ADDR": addrs[0],
        "NODE2_ADDR": addrs[1],
        "NODE3_ADDR": addrs[2],
        "SPOA_ADDR": f"127.0.0.1:{spoa_port or free_port()}",
        "SPOE_CONF": str(spoe_conf),
        "BALANCER_NAME": balancer_name,
    }
    env.update(extra or {})
    return env

# One traffic line of the shipped log-format (see haproxy/haproxy.cfg).
_LOG_RE = re.compile(
    r"bal=(?P<balancer>\S*) (?P<client_ip>\S+):(?P<client_port>\d+) \[(?P<time>[^\]]*)\] "
    r"(?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+) (?P<timers>\S+) (?P<bytes>\S+) "
    r"(?P<termination>\S+) cid=(?P<cid>\S*) node=(?P<node>\S*) how=(?P<how>\S*) "
    r"err=(?P<err>\S*) ptime=(?P<ptime>\S*)"
)

def parse_log_line(line: str) -> dict[str, str] | None:
    """Fields of one HAProxy traffic log line, or None for other lines.

    Keys: balancer client_ip client_port time frontend backend server timers bytes
    termination cid node how err ptime. HAProxy writes "-" for an unset variable.
    """
    m = _LOG_RE.search(line)
    return m.groupdict() if m else None

class HAProxy(ManagedProcess):
    """HAProxy ``version`` ("2.6" | "3.2") running ``cfg_path`` in the foreground (-db).

    ``env`` is added to the environment (see ``haproxy_env``); ``HAPROXY_STATS_SOCKET`` is
    set to a socket in the work directory, and ``SPOE_CONF`` defaults to the shipped
    spoe-mqtt.conf. The configuration is validated with ``-c`` before starting
    (ProcessFailed carries HAProxy's output). ``log_lines()`` has everything it printed.
    """

    name = "haproxy"

    def __init__(
        self,
        version: str,
        cfg_path: str | Path = HAPROXY_CFG,
        env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
        label: str = "",
    ) -> None:
        if label:
            self.name = f"haproxy-{label}"
        super().__init__(workdir)
        self.version = version
        self.binary = haproxy_binary(version)
        self.cfg_path = Path(cfg_path)
        self.stats_socket = self.workdir / "stats.sock"
        self._env = dict(os.environ)
        self._env.setdefault("SPOE_CONF", str(SPOE_CONF))
        self._env.update(env or {})
        self._env["HAPROXY_STATS_SOCKET"] = str(self.stats_socket)

    def env(self) -> dict[str, str]:
        return self._env

    def check(self) -> str:
        """``haproxy -c``: returns its output, raises ProcessFailed if the config is refused."""
        res = subprocess.run(
            [self.binary, "-c", "-f", str(self.cfg_path)],
            capture_output=True, text=True, env=self._env, cwd=self.workdir, timeout=30,
        )  # fmt: skip
        output = res.stdout + res.stderr
        if res.returncode != 0:
            raise ProcessFailed(f"HAProxy {self.version} refused {self.cfg_path} (rc={res.returncode}):\n{output}")
        return output

    def argv(self) -> list[str]:
        return [self.binary, "-db", "-f", str(self.cfg_path)]

    def start(self) -> "HAProxy":
        self.check()
        if self.stats_socket.exists():
            self.stats_socket.unlink()
        super().start()
        return self

    def ready(self) -> bool:
        if not self.stats_socket.exists():
            return False
        try:
            self.runtime("show info")
            return True
        except OSError:
            return False

    def runtime(self, command: str, timeout: float = 5.0) -> str:
        """Send one runtime API command over the stats socket; returns the reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.stats_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` as one dict per row (keys: pxname, svname, status, scur, ...)."""
        text = self.runtime("show stat")
        if text.startswith("# "):
            text = text[2:]
        return [dict(row) for row in csv.DictReader(io.StringIO(text)) if row.get("pxname")]

    def server_status(self, backend: str, server: str) -> str | None:
        for row in self.stats():
            if row["pxname"] == backend and row["svname"] == server:
                return row["status"]
        return None

    def wait_server_status(self, backend: str, server: str, status: str = "UP", timeout: float = 10.0) -> str:
        """Poll until ``backend/server`` has exactly ``status`` (e.g. "UP", "DOWN", "MAINT")."""
        return wait_until(
            lambda: self.server_status(backend, server) == status and status,
            timeout=timeout,
            interval=0.1,
            message=lambda: f"{backend}/{server} is {self.server_status(backend, server)!r}, "
            f"not {status!r} after {timeout}s\n{self.log_text()[-4000:]}",
        )

    def traffic_log(self) -> list[dict[str, str]]:
        """Parsed traffic lines (see ``parse_log_line``), oldest first."""
        return [d for d in map(parse_log_line, self.log_lines()) if d]

    def wait_log(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 10.0) -> dict[str, str]:
        """Poll the traffic log until a line satisfies ``predicate``; return it.

        HAProxy logs a TCP connection when it ends: close the client first.
        """
        def find() -> dict[str, str] | None:
            return next((d for d in self.traffic_log() if predicate(d)), None)

        return wait_until(find, timeout=timeout, interval=0.05,
                          message=lambda: f"no matching log line in {timeout}s:\n{self.log_text()[-4000:]}")

# --------------------------------------------------------------------------- the agent

def agent_command() -> str:
    """The ``mqtt-affinity`` console script of the project virtualenv."""
    here = Path(sys.executable).parent / "mqtt-affinity"
    if here.exists():
        return str(here)
    return str(REPO_ROOT / ".venv" / "bin" / "mqtt-affinity")

class AgentProcess(ManagedProcess):
    """``mqtt-affinity run --config FILE``; stderr -> ``stderr_path``, stdout -> ``log_path``.

    ``start()`` only checks that it did not die at once; use ``wait_listening(port)``.
    """

    name = "agent"
    startup_timeout = 0.2

    def __init__(
        self,
        config_path: str | Path,
        env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.config_path = Path(config_path)
        self.stderr_path = self.workdir / "agent.stderr"
        self.extra_args = list(extra_args)
        self._env = dict(os.environ)
        self._env.setdefault("PYTHONUNBUFFERED", "1")
        self._env.update(env or {})

    def env(self) -> dict[str, str]:
        return self._env

    def argv(self) -> list[str]:
        return [agent_command(), "run", "--config", str(self.config_path), *self.extra_args]

    def start(self) -> "AgentProcess":
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

    def wait_listening(self, port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> "AgentProcess":
        """Poll until ``host:port`` accepts TCP; ProcessFailed if the agent exits first."""
        wait_until(
            lambda: self._check_alive() and port_open(port, host),
            timeout=timeout,
            interval=0.05,
            message=lambda: f"agent not listening on {host}:{port} after {timeout}s\n{self.log_text()}",
        )
        return self

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the agent to exit by itself (e.g. a config error); returns its exit code."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"agent still running after {timeout}s\n{self.log_text()}")
        self.returncode = rc
        self.proc = None
        _LIVE.discard(self)
        return rc

__all__ = [
    "AgentProcess", "HAPROXY_CFG", "HAPROXY_VERSIONS", "HAProxy", "ManagedProcess", "MiniSpoa", "Mosquitto",
    "NATIVE_STICK_CFG", "ProcessFailed", "REPO_ROOT", "RedisServer", "SPOE_CONF", "ToolMissing",
    "agent_command", "free_port", "haproxy_binary", "haproxy_env", "parse_log_line", "port_open",
    "wait_until",
]  # fmt: skip


class MiniSpoa(ManagedProcess):
    """tests/support/mini_spoa.py as a process: a tiny SPOP peer for config tests only."""

    name = "mini-spoa"

    def __init__(self, node: str, port: int | None = None, workdir: str | Path | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.node = node
        self.record_path = self.workdir / "notify.jsonl"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "tests.support.mini_spoa", "--port", str(self.port),
                "--node", self.node, "--record", str(self.record_path)]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def ready(self) -> bool:
        return port_open(self.port)

    def messages(self) -> list[dict]:
        import json

        try:
            return [json.loads(line) for line in self.record_path.read_text().splitlines() if line]
        except FileNotFoundError:
            return []
