"""Process management, log reading, MQTT helpers and terminal output for scripts/demo.py.

Self-contained on purpose: the demo is part of the product and must not depend on tests/.
Every helper process runs in its own session (so a Ctrl-C at the terminal reaches only
the demo, which then stops them in order), writes its output to a file in the run
directory, and listens on a port chosen at run time by binding port 0.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO_ROOT / "haproxy" / "haproxy.cfg"
SPOE_CONF = REPO_ROOT / "haproxy" / "spoe-mqtt.conf"
NODES = ("node1", "node2", "node3")

T = TypeVar("T")


class DemoError(Exception):
    """A step's expectation failed, or the stack could not be built. Exit status 1."""


class SetupError(Exception):
    """A required program is missing or unusable. Exit status 2."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM: unwind through every ``finally`` and tear the stack down."""


# --------------------------------------------------------------------------- output


class Out:
    """Headings, explanations, checks and indented command output; colour only on a TTY."""

    def __init__(self, colour: bool | None = None) -> None:
        if colour is None:
            colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self.colour = colour
        enc = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
        self.tick = "✓" if enc.startswith("utf") else "ok"
        self.cross = "✗" if enc.startswith("utf") else "FAIL"

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def bold(self, text: str) -> str:
        return self._c("1", text)

    def dim(self, text: str) -> str:
        return self._c("2", text)

    def green(self, text: str) -> str:
        return self._c("32", text)

    def red(self, text: str) -> str:
        return self._c("31", text)

    def cyan(self, text: str) -> str:
        return self._c("36", text)

    def yellow(self, text: str) -> str:
        return self._c("33", text)

    def print(self, text: str = "") -> None:
        print(text, flush=True)

    def title(self, text: str) -> None:
        bar = "=" * len(text)
        self.print(self.bold(bar))
        self.print(self.bold(text))
        self.print(self.bold(bar))

    def step(self, number: int | str, title: str, *explain: str) -> None:
        self.print()
        self.print(self.bold(self.cyan(f"{number}. {title}")))
        for line in explain:
            self.print("   " + self.dim(line))

    def info(self, text: str) -> None:
        self.print("   " + text)

    def ok(self, text: str) -> None:
        self.print("   " + self.green(self.tick) + " " + text)

    def fail(self, text: str) -> None:
        self.print("   " + self.red(self.cross) + " " + text)

    def command(self, shown: str, output: str) -> None:
        self.print("   " + self.yellow("$ " + shown))
        for line in output.rstrip("\n").splitlines():
            self.print("     " + line)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(h), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        self.print("   " + self.bold("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()))
        for r in rows:
            self.print("   " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def expect(condition: object, what: str, out: Out, detail: str | Callable[[], str] = "") -> None:
    """Print a check mark for a met expectation, or raise DemoError saying what was seen."""
    if condition:
        out.ok(what)
        return
    text = detail() if callable(detail) else detail
    out.fail(what)
    raise DemoError(f"expected: {what}" + (f"\n  observed: {text}" if text else ""))


# --------------------------------------------------------------------------- small helpers


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until truthy; DemoError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = ("\n" + detail()) if detail else ""
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports the OS says are free now (all sockets held until all are chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(f"    | {line}" for line in text[-lines:]) or "    | (empty)"


def rel(path: Path | str) -> str:
    """A path relative to the current directory when it is inside it (shorter to read)."""
    p = Path(path)
    cwd = Path.cwd()
    if cwd == Path(cwd.anchor):  # from "/", "tmp/x" would read like a relative path: keep it absolute
        return str(p)
    try:
        return str(p.relative_to(cwd))
    except ValueError:
        return str(p)


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the demo dies without tearing down (e.g. SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def find_binary(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if not path:
        raise SetupError(f"{name} not found: run `make bootstrap` (it installs the Debian package {package})")
    return path


def haproxy_version(path: str) -> str:
    try:
        res = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"{path} does not run: {exc}") from None
    m = re.search(r"version (\d+\.\d+)\.", res.stdout)
    if not m:
        raise SetupError(f"{path} -v did not report an HAProxy version: {res.stdout.strip()[:200]!r}")
    return m.group(1)


def choose_haproxy(choice: str | None) -> tuple[str, str]:
    """(binary, "X.Y"): "3.2", "2.6", a path, or None = 3.2 if bootstrapped, else the system 2.6."""
    local32 = REPO_ROOT / ".haproxy" / "3.2" / "haproxy"
    if choice in (None, "auto"):
        candidates = [str(local32), "/usr/sbin/haproxy"]
    elif choice == "3.2":
        candidates = [str(local32)]
    elif choice == "2.6":
        candidates = ["/usr/sbin/haproxy"]
    else:
        candidates = [choice]
    for path in candidates:
        if os.access(path, os.X_OK):
            version = haproxy_version(path)
            if choice in ("3.2", "2.6") and version != choice:
                raise SetupError(f"{path} is HAProxy {version}, not {choice}")
            return path, version
    if choice == "3.2":
        raise SetupError(f"HAProxy 3.2 not found at {rel(local32)}: run `make bootstrap`")
    raise SetupError(f"no HAProxy found (tried {', '.join(candidates)}): run `make bootstrap`")


# --------------------------------------------------------------------------- processes


class Proc:
    """One child process; stdout+stderr go to ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.cwd = cwd
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> "Proc":
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.cwd, env=self.env, start_new_session=True, preexec_fn=_pdeathsig,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise DemoError(f"{self.name} exited with status {self.popen.returncode}; its log {rel(self.log)}:\n"
                            f"{tail(self.log)}")
        return True

    def signal(self, sig: int) -> None:
        if self.alive:
            try:
                self.popen.send_signal(sig)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> None:
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def kill(self) -> None:
        """SIGKILL now (a crash)."""
        self.signal(signal.SIGKILL)
        self.wait(5)


def stop_all(procs: Sequence[Proc], timeout: float = 5.0) -> None:
    """SIGTERM everything at once, then wait (SIGKILL whatever is left after ``timeout``)."""
    for p in procs:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(max(0.1, deadline - time.monotonic()))


# --------------------------------------------------------------------------- the stack's parts


@dataclass
class Redis:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def start_redis(workdir: Path, port: int, register: Callable[[Proc], None]) -> Redis:
    binary = find_binary("redis-server", "redis-server")
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--daemonize", "no", "--logfile", "", "--protected-mode", "no"]  # fmt: skip
    r = Redis(Proc("redis", argv, workdir / "redis.log", workdir), port)
    register(r.proc)
    r.proc.start()
    wait_until(lambda: r.proc.check_alive() and r.ping(), 10, f"redis on port {port}",
               detail=lambda: tail(r.proc.log))
    return r


@dataclass
class Broker:
    name: str
    port: int
    workdir: Path
    proc: Proc

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc.start()
        wait_until(lambda: self.proc.check_alive() and port_open(self.port), 10,
                   f"mosquitto {self.name} on port {self.port}", detail=lambda: tail(self.workdir / "broker.log"))


def make_broker(name: str, workdir: Path, port: int) -> Broker:
    """A mosquitto broker with in-memory sessions (they live as long as the process).

    Started as root, mosquitto drops to the ``mosquitto`` user unless told ``user root``;
    that user could not write the broker log in the run directory.
    """
    binary = find_binary("mosquitto", "mosquitto")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        *(["user root"] if os.geteuid() == 0 else []),
        f"log_dest file {workdir / 'broker.log'}",
        "log_type error", "log_type warning", "log_type notice", "log_type information",
        "connection_messages true",
        "log_timestamp true",
        "",
    ]))  # fmt: skip
    proc = Proc(f"mosquitto {name}", [binary, "-c", str(conf)], workdir / "mosquitto.out", workdir)
    return Broker(name, port, workdir, proc)


# One traffic line of the shipped log-format (haproxy/haproxy.cfg).
_LOG_RE = re.compile(
    r"bal=(?P<balancer>\S*) (?P<client>\S+) \[(?P<time>[^\]]*)\] (?P<frontend>\S+) "
    r"(?P<backend>[^/\s]+)/(?P<server>\S+) (?P<timers>\S+) (?P<bytes>\S+) (?P<termination>\S+) "
    r"cid=(?P<cid>\S*) node=(?P<node>\S*) how=(?P<how>\S*) err=(?P<err>\S*) ptime=(?P<ptime>\S*)"
)


@dataclass
class Balancer:
    """One HAProxy (the shipped haproxy.cfg) with its own mqtt-affinity agent."""

    name: str
    workdir: Path
    mqtt_port: int
    spop_port: int
    metrics_port: int
    agent_config: Path
    agent: Proc
    haproxy: Proc
    stats_socket: Path

    # -- HAProxy runtime API ---------------------------------------------------------------

    def runtime(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(str(self.stats_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def server_status(self, backend: str, server: str) -> str | None:
        try:
            text = self.runtime("show stat")
        except OSError:
            return None
        text = text[2:] if text.startswith("# ") else text
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") == backend and row.get("svname") == server:
                return row.get("status")
        return None

    def wait_status(self, backend: str, server: str, status: str, timeout: float = 10.0) -> None:
        wait_until(
            lambda: self.haproxy.check_alive() and (self.server_status(backend, server) or "").startswith(status),
            timeout, f"HAProxy {self.name}: {backend}/{server} to be {status}",
            interval=0.1, detail=lambda: f"it is {self.server_status(backend, server)!r}; log:\n"
            f"{tail(self.haproxy.log)}",
        )

    # -- logs ------------------------------------------------------------------------------

    def traffic(self) -> list[dict[str, str]]:
        """Parsed traffic lines, oldest first. HAProxy logs a connection when it closes."""
        try:
            text = self.haproxy.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [m.groupdict() for m in map(_LOG_RE.search, text.splitlines()) if m]

    def lines_for(self, cid: str) -> list[dict[str, str]]:
        return [d for d in self.traffic() if d["cid"] == cid]

    def wait_line(self, cid: str, seen_before: int, timeout: float = 5.0) -> dict[str, str]:
        """The first log line for ``cid`` after the ``seen_before`` that existed earlier."""

        def new() -> dict[str, str] | None:
            lines = self.lines_for(cid)
            return lines[seen_before] if len(lines) > seen_before else None

        return wait_until(new, timeout, f"HAProxy {self.name} to log the connection of {cid!r}",
                          detail=lambda: tail(self.haproxy.log, 10))

    def agent_says(self, text: str) -> bool:
        try:
            return text in self.agent.log.read_text(errors="replace")
        except FileNotFoundError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
            return resp.read().decode()


def write_agent_config(path: Path, *, spop_port: int, metrics_port: int, redis_url: str,
                       brokers: Sequence[Broker]) -> Path:
    nodes = "\n".join(f'  - {{name: {b.name}, address: "{b.addr}", weight: 1}}' for b in brokers)
    path.write_text(f"""# mqtt-affinity agent for this demo balancer (see config/agent.yaml for every key)
listen: 127.0.0.1:{spop_port}
metrics_listen: 127.0.0.1:{metrics_port}
redis_url: {redis_url}
session_ttl: 3600
state_refresh: 0.2
nodes:
{nodes}
health:
  check: tcp
  interval: 0.3
  timeout: 0.25
  rise: 2
  fall: 2
log_level: info
""")
    return path


def agent_command() -> str:
    here = Path(sys.executable).parent / "mqtt-affinity"
    if here.exists():
        return str(here)
    fallback = REPO_ROOT / ".venv" / "bin" / "mqtt-affinity"
    if fallback.exists():
        return str(fallback)
    raise SetupError("the mqtt-affinity command is missing from the virtualenv: run `make bootstrap`")


def start_balancer(name: str, workdir: Path, *, haproxy_bin: str, redis: Redis, brokers: Sequence[Broker],
                   ports: Sequence[int], sockdir: Path, register: Callable[[Proc], None]) -> Balancer:
    """Agent first (HAProxy's health check of it must find it), then HAProxy."""
    workdir.mkdir(parents=True, exist_ok=True)
    mqtt_port, spop_port, metrics_port = ports
    cfg = write_agent_config(workdir / "agent.yaml", spop_port=spop_port, metrics_port=metrics_port,
                             redis_url=redis.url, brokers=brokers)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agent = Proc(f"agent {name}", [agent_command(), "run", "--config", str(cfg)], workdir / "agent.log",
                 workdir, env)
    register(agent)
    agent.start()
    wait_until(lambda: agent.check_alive() and port_open(spop_port), 15, f"agent {name} on port {spop_port}",
               detail=lambda: tail(agent.log))

    stats_socket = sockdir / f"{name}.sock"
    hap_env = {
        **os.environ,
        "MQTT_BIND": f"127.0.0.1:{mqtt_port}",
        "NODE1_ADDR": brokers[0].addr,
        "NODE2_ADDR": brokers[1].addr,
        "NODE3_ADDR": brokers[2].addr,
        "SPOA_ADDR": f"127.0.0.1:{spop_port}",
        "SPOE_CONF": str(SPOE_CONF),
        "HAPROXY_STATS_SOCKET": str(stats_socket),
        "BALANCER_NAME": name,
    }
    res = subprocess.run([haproxy_bin, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                         env=hap_env, cwd=workdir, timeout=30)
    if res.returncode != 0:
        raise DemoError(f"HAProxy refused {rel(HAPROXY_CFG)} (status {res.returncode}):\n{res.stdout}{res.stderr}")
    haproxy = Proc(f"haproxy {name}", [haproxy_bin, "-db", "-f", str(HAPROXY_CFG)], workdir / "haproxy.log",
                   workdir, hap_env)
    register(haproxy)
    haproxy.start()
    bal = Balancer(name, workdir, mqtt_port, spop_port, metrics_port, cfg, agent, haproxy, stats_socket)

    def ready() -> bool:
        bal.haproxy.check_alive()
        if not stats_socket.exists():
            return False
        try:
            return "Name: HAProxy" in bal.runtime("show info")
        except OSError:
            return False

    wait_until(ready, 10, f"HAProxy {name} runtime socket", detail=lambda: tail(haproxy.log))
    return bal


# --------------------------------------------------------------------------- MQTT clients

import paho.mqtt.client as paho  # noqa: E402  (after the helpers: the error message above is friendlier)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

SESSION_EXPIRY = 300  # seconds, MQTT 5 clients


class Client:
    """A paho client that keeps a session: MQTT 3.1.1 clean-session=0, or MQTT 5 with session expiry."""

    def __init__(self, cid: str, protocol: str) -> None:
        self.cid = cid
        self.protocol = protocol
        self.v5 = protocol == "5"
        kw = {} if self.v5 else {"clean_session": False}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                                  protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311, **kw)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reason: str | None = None
        self.session_present: bool | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.got_message = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    @property
    def label(self) -> str:
        return f"MQTT 5, session expiry {SESSION_EXPIRY}s" if self.v5 else "MQTT 3.1.1, clean-session=0"

    def _on_connect(self, client, userdata, flags, reason_code, props) -> None:  # noqa: ANN001
        self.session_present = bool(flags.session_present)
        self.reason = str(reason_code)
        if not reason_code.is_failure:
            self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.got_message:
            self.messages.append((msg.topic, msg.payload))
            self.got_message.notify_all()

    def connect(self, port: int, timeout: float = 5.0) -> None:
        self.connected.clear()
        self.reason = None
        kw: dict = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY
            kw = {"clean_start": False, "properties": props}
        try:
            self.client.connect("127.0.0.1", port, keepalive=30, **kw)
        except OSError as exc:
            raise DemoError(f"{self.cid}: cannot connect to 127.0.0.1:{port}: {exc}") from None
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.client.loop_stop()
            raise DemoError(f"{self.cid}: no successful CONNACK through port {port} within {timeout:g}s"
                            + (f" (reason: {self.reason})" if self.reason else ""))

    def subscribe(self, topic: str, timeout: float = 5.0) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        if not self.subscribed.wait(timeout):
            raise DemoError(f"{self.cid}: no SUBACK for {topic!r} within {timeout:g}s")

    def wait_messages(self, count: int, timeout: float) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        with self.got_message:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.got_message.wait(left)
            return list(self.messages)

    def disconnect(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def connect_once(port: int, cid: str, protocol: str) -> bool:
    """CONNECT (keeping a session), wait for CONNACK, DISCONNECT; returns session_present."""
    c = Client(cid, protocol)
    c.connect(port)
    c.disconnect()
    return bool(c.session_present)


def publish_direct(port: int, topic: str, payloads: Sequence[bytes]) -> None:
    """QoS 1 publishes straight to one broker, bypassing the balancers."""
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-publisher-{os.getpid()}",
                      protocol=paho.MQTTv311)
    try:
        pub.connect("127.0.0.1", port)
    except OSError as exc:
        raise DemoError(f"publisher: cannot connect to the broker on port {port}: {exc}") from None
    pub.loop_start()
    try:
        for p in payloads:
            info = pub.publish(topic, p, qos=1)
            info.wait_for_publish(5)
            if not info.is_published():
                raise DemoError(f"publisher: {p!r} was not acknowledged by the broker on port {port}")
    finally:
        pub.disconnect()
        pub.loop_stop()
