"""HAProxy 2.6 / 3.2 as a managed process, its environment, runtime API and traffic log."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from devstack.procs import REPO_ROOT, ManagedProcess, ProcessFailed, ToolMissing, free_port, wait_until

HAPROXY_CFG_DIR = REPO_ROOT / "haproxy"
HAPROXY_CFG = HAPROXY_CFG_DIR / "haproxy.cfg"
SPOE_CONF = HAPROXY_CFG_DIR / "spoe-mqtt.conf"
NATIVE_STICK_CFG = HAPROXY_CFG_DIR / "native-stick.cfg"
HAPROXY_VERSIONS = ("2.6", "3.2")

_FIX_HAPROXY = {
    "2.6": "sudo scripts/bootstrap.sh   (installs Debian bookworm's haproxy 2.6: apt-get install -y haproxy)",
    "3.2": "sudo scripts/fetch-haproxy32.sh   (unpacks HAProxy 3.2 from Debian sid into .haproxy/3.2/)",
}


def haproxy_version_of(path: str | Path) -> str:
    """"X.Y" as ``path -v`` reports it; ToolMissing if it does not run or is not HAProxy."""
    try:
        out = subprocess.run([str(path), "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolMissing(f"{path} does not run ({exc})") from None
    m = re.search(r"version (\d+\.\d+)\.", out.splitlines()[0] if out else "")
    if not m:
        raise ToolMissing(f"{path} -v did not report an HAProxy version: {out.strip()[:200]!r}")
    return m.group(1)


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
        found = haproxy_version_of(path)
    except ToolMissing as exc:
        raise ToolMissing(f"{exc}. Fix: {_FIX_HAPROXY[version]}") from None
    if found != version:
        raise ToolMissing(f"{path} is HAProxy {found}, not {version}. Fix: {_FIX_HAPROXY[version]}")
    return path


def find_haproxy(choice: str | None = None) -> tuple[str, str]:
    """(binary, "X.Y") for a user's choice: "3.2", "2.6", a path, or None/"auto" = 3.2 if
    installed, else 2.6. ToolMissing says how to get one."""
    if choice in HAPROXY_VERSIONS:
        return haproxy_binary(choice), choice
    if choice in (None, "auto"):
        for version in reversed(HAPROXY_VERSIONS):
            try:
                return haproxy_binary(version), version
            except ToolMissing:
                continue
        raise ToolMissing(f"no HAProxy found (neither 3.2 nor 2.6). Fix: {_FIX_HAPROXY['2.6']}")
    if not os.access(choice, os.X_OK):
        raise ToolMissing(f"{choice} is not an executable HAProxy binary")
    return choice, haproxy_version_of(choice)


def haproxy_env(
    *,
    mqtt_port: int,
    broker_addrs: Iterable[str],
    spoa_port: int | None = None,
    spoa_addrs: Sequence[str] = (),
    balancer_name: str = "ha1",
    spoe_conf: str | Path = SPOE_CONF,
    agent_check_port: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment variables that haproxy/haproxy.cfg (and native-stick.cfg) read.

    ``broker_addrs``: exactly three "host:port" (node1..node3). The agents: ``spoa_addrs``
    ("host:port", in order) or ``spoa_port`` (one agent on 127.0.0.1); with neither, a free
    port nobody listens on (the agent is then DOWN). The first agent is ``SPOA_ADDR`` (the
    balancer's own), the second ``SPOA_PEER_ADDR`` (haproxy.cfg's backup agent), any after
    them ``SPOA_PEER2_ADDR``, ``SPOA_PEER3_ADDR``... (for configs with more backup lines).
    ``agent_check_port``: where the broker servers' agent-check goes (the agent's
    ``agent_check_listen`` on 127.0.0.1); default a free port nobody listens on, so no agent
    of another test answers (HAProxy then keeps every server as configured).
    The stats socket is added by ``HAProxy`` itself.
    """
    addrs = list(broker_addrs)
    if len(addrs) != 3:
        raise ValueError(f"haproxy.cfg has exactly three servers node1..node3, got {len(addrs)} addresses")
    if spoa_port is not None and spoa_addrs:
        raise ValueError("give spoa_port or spoa_addrs, not both")
    agents = list(spoa_addrs) or [f"127.0.0.1:{spoa_port or free_port()}"]
    env = {
        "MQTT_BIND": f"127.0.0.1:{mqtt_port}",
        "NODE1_ADDR": addrs[0],
        "NODE2_ADDR": addrs[1],
        "NODE3_ADDR": addrs[2],
        "SPOE_CONF": str(spoe_conf),
        "BALANCER_NAME": balancer_name,
        "AGENT_CHECK_ADDR": "127.0.0.1",
        "AGENT_CHECK_PORT": str(agent_check_port or free_port()),
    }
    for i, addr in enumerate(agents):
        env["SPOA_ADDR" if i == 0 else "SPOA_PEER_ADDR" if i == 1 else f"SPOA_PEER{i}_ADDR"] = addr
    env.update(extra or {})
    return env


# One traffic line of the shipped log-format (see haproxy/haproxy.cfg).
_LOG_RE = re.compile(
    r"bal=(?P<balancer>\S*) (?P<client_ip>\S+):(?P<client_port>\d+) \[(?P<time>[^\]]*)\] "
    r"(?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+) (?P<timers>\S+) (?P<bytes>\S+) "
    r"(?P<termination>\S+) cid=(?P<cid>\S*) node=(?P<node>\S*) how=(?P<how>\S*) "
    r"err=(?P<err>\S*) ptime=(?P<ptime>\S*)(?: err1=(?P<err1>\S*))?(?: err2=(?P<err2>\S*))?"
)


def parse_log_line(line: str) -> dict[str, str] | None:
    """Fields of one HAProxy traffic log line, or None for other lines.

    Keys: balancer client_ip client_port time frontend backend server timers bytes
    termination cid node how err ptime err1 err2 (the errors of agent calls that were asked
    again; None in a log-format without them). HAProxy writes "-" for an unset variable.
    """
    m = _LOG_RE.search(line)
    return m.groupdict() if m else None


# AF_UNIX paths are limited to 108 bytes (including the terminating NUL), and HAProxy 3.2
# refuses a stats socket path past 97 (it appends a suffix while binding): keep a margin.
_MAX_SOCKET_PATH = 90


class HAProxy(ManagedProcess):
    """HAProxy ``version`` ("2.6" | "3.2") running ``cfg_path`` in the foreground (-db).

    ``env`` is added to the environment (see ``haproxy_env``); ``HAPROXY_STATS_SOCKET`` is
    set to a socket in the work directory (in a short temporary folder if that path is too
    long for AF_UNIX; or ``stats_socket``, e.g. a path an agent was configured with), and
    ``SPOE_CONF`` defaults to the shipped spoe-mqtt.conf. ``binary``
    overrides the binary ``haproxy_binary(version)`` finds. The configuration is validated
    with ``-c`` before starting (ProcessFailed carries HAProxy's output). ``log_lines()`` has
    everything it printed.
    """

    name = "haproxy"

    def __init__(
        self,
        version: str,
        cfg_path: str | Path = HAPROXY_CFG,
        env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
        label: str = "",
        *,
        binary: str | None = None,
        stats_socket: str | Path | None = None,
    ) -> None:
        if label:
            self.name = f"haproxy-{label}"
        super().__init__(workdir)
        self.version = version
        self.binary = binary or haproxy_binary(version)
        self.cfg_path = Path(cfg_path)
        self.stats_socket = Path(stats_socket) if stats_socket else self.workdir / "stats.sock"
        self._socket_dir: Path | None = None
        if stats_socket is None and len(str(self.stats_socket)) > _MAX_SOCKET_PATH:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="devstack-haproxy-"))
            self.stats_socket = self._socket_dir / "stats.sock"
        self._env = dict(os.environ)
        self._env.setdefault("SPOE_CONF", str(SPOE_CONF))
        self._env.update(env or {})
        self._env["HAPROXY_STATS_SOCKET"] = str(self.stats_socket)

    def env(self) -> dict[str, str]:
        return self._env

    @property
    def port(self) -> int | None:
        """The MQTT port (from MQTT_BIND), if the environment has one."""
        bind = self._env.get("MQTT_BIND", "")
        return int(bind.rsplit(":", 1)[1]) if ":" in bind else None

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

    def start(self) -> HAProxy:
        self.check()
        if self.stats_socket.exists():
            self.stats_socket.unlink()
        super().start()
        return self

    def wait_stopped(self, timeout: float = 10.0) -> int | None:
        rc = super().wait_stopped(timeout)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        return rc

    def ready(self) -> bool:
        if not self.stats_socket.exists():
            return False
        try:
            self.runtime("show info")
            return True
        except OSError:
            return False

    # -- runtime API ------------------------------------------------------------------------

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

    def info(self) -> dict[str, str]:
        """``show info`` as a dict (Version, Uptime_sec, DroppedLogs, ...)."""
        out = {}
        for line in self.runtime("show info").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out

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

    def servers(self, backend: str) -> list[str]:
        """Server names of ``backend`` (empty if there is no such backend)."""
        return [row["svname"] for row in self.stats()
                if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")]  # fmt: skip

    def wait_server_status(self, backend: str, server: str, status: str = "UP", timeout: float = 10.0) -> str:
        """Poll until ``backend/server`` has exactly ``status`` (e.g. "UP", "DOWN", "MAINT").

        ProcessFailed at once if HAProxy exits meanwhile.
        """
        return wait_until(
            lambda: self.check_alive() and self.server_status(backend, server) == status and status,
            timeout=timeout,
            interval=0.1,
            message=lambda: f"{self.name}: {backend}/{server} is {self.server_status(backend, server)!r}, "
            f"not {status!r} after {timeout}s\n{self.log_text()[-4000:]}",
        )

    # -- traffic log --------------------------------------------------------------------------

    def traffic_log(self) -> list[dict[str, str]]:
        """Parsed traffic lines (see ``parse_log_line``), oldest first."""
        return [d for d in map(parse_log_line, self.log_lines()) if d]

    def wait_log(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float = 10.0
    ) -> dict[str, str]:
        """Poll the traffic log until a line satisfies ``predicate``; return it.

        HAProxy logs a TCP connection when it ends: close the client first.
        """

        def find() -> dict[str, str] | None:
            return next((d for d in self.traffic_log() if predicate(d)), None)

        return wait_until(find, timeout=timeout, interval=0.05,
                          message=lambda: f"no matching log line in {timeout}s:\n{self.log_text()[-4000:]}")
