"""``workers`` > 1: a supervisor and N agent processes sharing one SPOP port.

One agent process is one asyncio event loop: it uses one core. A balancer host with spare cores
can run ``workers: N``: ``mqtt-affinity run`` then starts this supervisor, which starts N
workers, each ``python -m agent run --config FILE --worker-index I --worker-http SOCK
--worker-config COPY`` (the normal agent, :class:`agent.app.App`, in a process of its own, with
the interpreter and the agent package the supervisor runs). Every worker binds the SPOP port and
the agent-check port with SO_REUSEPORT, so the kernel spreads HAProxy's new connections over
them; a connection stays with the worker that accepted it.

The supervisor owns ``metrics_listen``. Each worker serves its own HTTP endpoint on a unix
socket in a private folder (mode 0700, removed at exit), and the supervisor asks them:

- ``/metrics``: every worker's, merged (:func:`agent.metrics.merge_expositions`): counters,
  histograms and per-process gauges (SPOP connections, cache entries) summed series by series;
  gauges of shared state (node health, Redis, sessions, ...) from the first worker that has
  them. The counters of a worker that died are kept (its last scrape), so a sum never goes
  back when a worker is restarted. Plus ``mqtt_affinity_workers_running`` and
  ``mqtt_affinity_worker_restarts``.
- ``/readyz``: 200 when every worker is ready (and all have answered once since the start);
  503 names those that are not.
- ``/healthz``: 200 while the supervisor runs and at least one worker answers its own.

Signals: SIGTERM and SIGINT are passed to every worker (each drains for ``drain_period``, then
stops as a single agent does; a second signal ends the drains) and the supervisor exits once
all have: 0 when every worker stopped cleanly. SIGHUP: the supervisor re-reads the config (its
log settings; ``workers`` itself is restart-only) and passes SIGHUP to every worker, each of
which reloads as a single agent does. Workers run in their own process group (a terminal's
Ctrl-C reaches the supervisor only, which passes it on once) and stop by themselves, without a
drain, if the supervisor dies (then they also empty and remove its private folder).

A worker that exits unexpectedly is started again after a back-off (0.5 s, doubling up to 30 s;
back to 0.5 s once a worker has run for a minute). A worker that fails while the supervisor
starts stops everything: the supervisor exits with that worker's code (1: could not start, 2:
bad config). A worker started again later starts from a copy of the config the supervisor
started with (in the private folder), then reloads the file as it is now if that differs: the
restart-only keys (``listen``, ``redis_url``, ...) stay those of its siblings, the rest follows
the file, as after a SIGHUP.

What must happen once per host runs in worker 0 only (see :class:`agent.app.App`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

import agent
from agent.config import Config, ConfigError, load_config
from agent.http import HttpEndpoint
from agent.logs import set_process_fields, setup_logging
from agent.metrics import SUMMED_TYPES, merge_expositions, render_families
from agent.model import ExitCode

__all__ = ["Supervisor", "WorkerRole", "http_get", "supervise"]

log = logging.getLogger("mqtt_affinity.workers")

#: Seconds a worker may take from its start to answering its /healthz.
START_TIMEOUT = 30.0
#: Seconds the supervisor waits for one worker's HTTP answer.
ASK_TIMEOUT = 2.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: A worker that ran this long before it died is restarted after BACKOFF_FIRST again.
STABLE_AFTER = 60.0


@dataclass(frozen=True)
class WorkerRole:
    """What makes an agent process a worker: its index (0 runs the once-per-host work), the
    unix socket of its HTTP endpoint, and the copy of the config the supervisor started with."""

    index: int
    http_path: str
    start_config: str


async def http_get(path: str, target: str, timeout: float = ASK_TIMEOUT) -> tuple[int, bytes]:
    """GET ``target`` from the HTTP endpoint on unix socket ``path``: (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()  # one response per connection, then the endpoint closes
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {head[:40]!r}")
    return int(parts[1]), body


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


def _check_port(addr: tuple[str, int], key: str) -> None:
    """Fail now, with the key's name, if the workers could not bind ``addr`` (another process
    holds it without SO_REUSEPORT, or as another user)."""
    host, port = addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OSError(f"{key} {host}:{port}: {exc.strerror or exc}") from None


class _Worker:
    def __init__(self, index: int, http_path: str) -> None:
        self.role = WorkerRole(index, http_path, os.path.join(os.path.dirname(http_path), "config-at-start.yaml"))
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.backoff = BACKOFF_FIRST
        #: How its last process ended once the supervisor stopped (None: stopped cleanly or was
        #: not running).
        self.exit_code: int | None = None
        #: Its last /metrics body (used while it does not answer; its counters are kept when it dies).
        self.last_metrics: str | None = None

    @property
    def index(self) -> int:
        return self.role.index

    @property
    def pid(self) -> int | None:
        """The pid of its process while that runs."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        return self.proc.pid


class Supervisor:
    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = Path(os.path.abspath(config_path))
        self._dir = tempfile.mkdtemp(prefix="mqtt-affinity-workers-")  # mode 0700
        self.workers = [_Worker(i, os.path.join(self._dir, f"worker-{i}.sock")) for i in range(config.workers)]
        # What every worker starts from, also one started again after the file was edited.
        shutil.copyfile(self.config_path, self.workers[0].role.start_config)
        self.http: HttpEndpoint | None = None
        if config.metrics_listen is not None:
            host, port = config.metrics_listen
            self.http = HttpEndpoint(host, port, self.render_metrics, self.ready, healthy=self.healthy)
        self.restarts = 0
        # The workers import the very agent package this supervisor runs: run from a source
        # checkout, its folder goes first on their path (`python -m agent` would otherwise look
        # in their working folder first). An installed package is found as it is.
        self._env = dict(os.environ)
        package_root = str(Path(agent.__file__).resolve().parents[1])
        installed = {str(Path(p).resolve()) for p in (*site.getsitepackages(), site.getusersitepackages())}
        if package_root not in installed:
            self._env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, self._env.get("PYTHONPATH")) if p)
        self._stopping = asyncio.Event()
        self._started = False  # every worker answered once
        #: Counters and histograms of the workers that died (their last scrape), Prometheus text.
        self._retired = ""

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            try:
                _check_port(self.config.listen, "listen")
                if self.config.agent_check_listen is not None:
                    _check_port(self.config.agent_check_listen, "agent_check_listen")
                if self.http is not None:
                    await self.http.start()
            except OSError as exc:
                log.error("cannot start: %s", exc)
                return ExitCode.NOT_FOUND
            failed = await self._start_all()
            if failed is not None:
                return failed
            self._started = True
            log.info("workers: %d on spop %s:%d (pids %s), http %s", len(self.workers), *self.config.listen,
                     ",".join(str(w.pid) for w in self.workers),
                     f"{self.http.host}:{self.http.port}" if self.http else "off")
            await asyncio.gather(*(self._watch(w) for w in self.workers))
            bad = [w for w in self.workers if w.exit_code not in (None, 0)]
            for w in bad:
                assert w.exit_code is not None
                log.error("worker %d stopped with %s", w.index, _describe(w.exit_code))
            log.info("stopped: %d workers", len(self.workers))
            return ExitCode.NOT_FOUND if bad else ExitCode.OK
        finally:
            if self.http is not None:
                await self.http.stop()
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _start_all(self) -> int | None:
        """Start every worker and wait until each answers; the exit code if one could not start."""
        for w in self.workers:
            await self._spawn(w)
        results = await asyncio.gather(*(self._wait_started(w) for w in self.workers))
        failed = [(w, rc) for w, rc in zip(self.workers, results) if rc is not None]
        if not failed:
            return None
        w, rc = failed[0]
        log.error("worker %d could not start (%s): stopping the others", w.index, _describe(rc))
        self._stopping.set()
        await asyncio.gather(*(self._stop_now(other) for other in self.workers))
        return rc if rc in (ExitCode.NOT_FOUND, ExitCode.USAGE) else ExitCode.NOT_FOUND

    @staticmethod
    async def _stop_now(w: _Worker) -> None:
        """Stop ``w`` without a drain: SIGTERM again until it is gone (a signal sent while the
        same one is still pending is merged with it, so the one that ends the drain must come
        later)."""
        while w.proc is not None and w.proc.returncode is None:
            try:
                w.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(w.proc.wait(), 0.2)
            except TimeoutError:
                pass

    async def _spawn(self, w: _Worker) -> None:
        try:
            os.unlink(w.role.http_path)
        except FileNotFoundError:
            pass
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", "--config", str(self.config_path),
            "--worker-index", str(w.index), "--worker-http", w.role.http_path,
            "--worker-config", w.role.start_config,
            stdin=subprocess.DEVNULL, process_group=0, env=self._env,
        )
        w.started = time.monotonic()
        if self._stopping.is_set():  # a stop came while it was being started
            w.proc.send_signal(signal.SIGTERM)

    async def _wait_started(self, w: _Worker) -> int | None:
        """None once the worker answers its /healthz (or a stop was asked); else its exit code."""
        assert w.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while w.proc.returncode is None and not self._stopping.is_set():
            try:
                status, _ = await http_get(w.role.http_path, "/healthz", timeout=0.5)
                if status == 200:
                    return None
            except (OSError, TimeoutError, ValueError):
                pass
            if time.monotonic() > deadline:
                log.error("worker %d (pid %d) did not answer within %gs", w.index, w.proc.pid, START_TIMEOUT)
                w.proc.kill()
                await w.proc.wait()
                return ExitCode.NOT_FOUND
            await asyncio.sleep(0.05)
        if w.proc.returncode is not None and not self._stopping.is_set():
            return w.proc.returncode
        return None

    async def _watch(self, w: _Worker) -> None:
        """Restart ``w`` whenever it exits, until the supervisor stops."""
        while True:
            assert w.proc is not None
            rc = await w.proc.wait()
            if self._stopping.is_set():
                w.exit_code = rc
                return
            self._retire(w)
            if time.monotonic() - w.started >= STABLE_AFTER:
                w.backoff = BACKOFF_FIRST
            log.error("worker %d (pid %d) exited with %s; starting it again in %gs",
                      w.index, w.proc.pid, _describe(rc), w.backoff)
            try:
                await asyncio.wait_for(self._stopping.wait(), w.backoff)
                return  # stopped meanwhile: nothing left to stop
            except TimeoutError:
                pass
            w.backoff = min(w.backoff * 2, BACKOFF_MAX)
            self.restarts += 1
            await self._spawn(w)
            log.info("worker %d started again (pid %d)", w.index, w.proc.pid)

    def _signal_all(self, sig: signal.Signals) -> int:
        sent = 0
        for w in self.workers:
            if w.pid is not None and w.proc is not None:
                try:
                    w.proc.send_signal(sig)
                    sent += 1
                except ProcessLookupError:
                    pass
        return sent

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: passed to every worker (the first starts their drain, the next ends it)."""
        again = self._stopping.is_set()
        self._stopping.set()
        sent = self._signal_all(signal.SIGTERM)
        log.info("%s: SIGTERM passed to %d workers", "stop again (ends the drain)" if again else "stopping", sent)

    def reload(self) -> None:
        """SIGHUP: the supervisor's own settings, then every worker reloads its own."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        if new.workers != self.config.workers:
            log.warning("reload: workers changed (%d to %d); it takes effect at the next restart",
                        self.config.workers, new.workers)
        setup_logging(new.log_level, new.log_format)
        # Only the log settings apply here; the rest is the workers' (metrics_listen is restart-only).
        self.config = dataclasses.replace(self.config, log_level=new.log_level, log_format=new.log_format)
        log.info("reload: SIGHUP passed to %d workers", self._signal_all(signal.SIGHUP))

    # -- the HTTP endpoint -----------------------------------------------------------

    async def _ask(self, w: _Worker, target: str) -> tuple[int, str] | None:
        if w.pid is None:
            return None
        try:
            status, body = await http_get(w.role.http_path, target)
        except (OSError, TimeoutError, ValueError):
            return None
        return status, body.decode("utf-8", "replace")

    async def ready(self) -> tuple[bool, str]:
        """Ready when every worker is."""
        if self._stopping.is_set():
            return False, "draining: shutting down"
        if not self._started:
            return False, "starting the workers"
        answers = await asyncio.gather(*(self._ask(w, "/readyz") for w in self.workers))
        not_ready = [
            f"worker {w.index}: " + ("not running" if a is None else a[1].strip())
            for w, a in zip(self.workers, answers) if a is None or a[0] != 200
        ]
        if not_ready:
            return False, "; ".join(not_ready)
        return True, f"ready: {len(self.workers)} workers"

    async def healthy(self) -> tuple[bool, str]:
        """Healthy while at least one worker answers its own /healthz."""
        answers = await asyncio.gather(*(self._ask(w, "/healthz") for w in self.workers))
        up = sum(1 for a in answers if a is not None and a[0] == 200)
        if up == 0:
            return False, f"no worker answers (of {len(self.workers)})"
        return True, f"ok: {up} of {len(self.workers)} workers"

    async def render_metrics(self) -> bytes:
        answers = await asyncio.gather(*(self._ask(w, "/metrics") for w in self.workers))
        texts = []
        for w, a in zip(self.workers, answers):
            if a is not None and a[0] == 200:
                w.last_metrics = a[1]
            if w.last_metrics is not None:  # one that does not answer now: its last numbers
                texts.append(w.last_metrics)
        families = merge_expositions([*texts, self._retired])
        return render_families([*families, *self._own_metrics()])

    def _retire(self, w: _Worker) -> None:
        """Keep the counters of a worker that died, so that the sums never go back."""
        if w.last_metrics is None:
            return
        kept = [f for f in merge_expositions([self._retired, w.last_metrics]) if f.type in SUMMED_TYPES]
        self._retired = render_families(kept).decode()
        w.last_metrics = None

    def _own_metrics(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("mqtt_affinity_workers_running", "Agent worker processes running (workers > 1)",
                                value=sum(1 for w in self.workers if w.pid is not None))
        yield CounterMetricFamily("mqtt_affinity_worker_restarts",
                                  "Worker processes started again after they exited unexpectedly",
                                  value=self.restarts)


def supervise(config_path: Path, config: Config) -> int:
    """``mqtt-affinity run`` with ``workers`` > 1."""
    setup_logging(config.log_level, config.log_format)
    set_process_fields(process="supervisor", pid=os.getpid())  # "worker" stays an integer field
    try:
        return asyncio.run(Supervisor(config, config_path).run())
    except OSError as exc:  # e.g. no private folder, or a worker process that cannot be started
        log.error("cannot start: %s", exc)
        return ExitCode.NOT_FOUND
