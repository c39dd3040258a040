"""Process lifecycle: ``ManagedProcess``, free ports, polling, the safety nets.

Every helper process listens on a port chosen at run time (``free_port``, never a well-known
one) and writes its output to a file in its own work directory, so callers can read its log.
Each has ``start()``, ``stop()`` (graceful, returns the exit code) and ``kill()`` (a crash).
Two safety nets stop what this module started if the caller does not: an ``atexit`` hook (a
normal interpreter exit, an uncaught exception) and, per process, ``die_with_parent`` (Linux
``PR_SET_PDEATHSIG``: the child gets SIGTERM when the thread that started it dies, even by
SIGKILL).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


class DevstackError(RuntimeError):
    """Base class of the errors this package raises on purpose."""


class ToolMissing(DevstackError):
    """A required binary is not installed; the message says how to install it."""


class ProcessFailed(DevstackError):
    """A helper process failed to start or exited early; the message carries its output."""


# --------------------------------------------------------------------------- ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_PORT_RNG = random.Random(os.getpid())
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``, outside the kernel's ephemeral range.

    Port 0 would hand out an ephemeral port, and the callers' own outgoing connections
    (a thousand at a time in the storm tests) draw from that same range: one of them can
    take the port between this call and the listener's bind. Below the range, only
    another listener can. A port is not handed out twice by one process (until most of
    the range has been), so the ports of one stack never collide with each other.
    """
    lo, _ = _ephemeral_range()
    top = max(lo - 1, 12000)
    if len(_HANDED_OUT) > (top - 10000) // 2:
        _HANDED_OUT.clear()
    for _ in range(200):
        port = _PORT_RNG.randint(10000, top)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


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


def require_binary(binary: str, package: str) -> str:
    """Path of ``binary`` (PATH, /usr/bin, /usr/sbin); ToolMissing says how to install ``package``."""
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/bin/{binary}", f"/usr/sbin/{binary}") if os.access(p, os.X_OK)), None
    )
    if not path:
        raise ToolMissing(
            f"{binary} not found. Install it: `sudo scripts/bootstrap.sh` "
            f"(or: apt-get update && apt-get install -y --no-install-recommends {package})"
        )
    return path


# --------------------------------------------------------------------------- processes

_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:  # safety net: only processes this module started
    for proc in list(_LIVE):
        try:
            proc.kill()
        except Exception:
            pass


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ManagedProcess:
    """A child process whose stdout+stderr go to ``self.log_path`` in ``self.workdir``.

    Subclasses provide ``argv()`` and ``ready()`` (polled by ``start()`` for up to
    ``startup_timeout`` seconds), optionally ``env()``. The child runs in its own session, so
    a Ctrl-C at the terminal reaches only the caller, which then stops it in order.
    ``die_with_parent`` (an attribute, default False) adds PR_SET_PDEATHSIG: set it only when
    ``start()`` is called from a thread that lives as long as the process should.
    """

    name = "process"
    startup_timeout = 10.0
    die_with_parent = False

    def __init__(self, workdir: str | Path | None = None) -> None:
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return True

    def env(self) -> dict[str, str] | None:
        return None

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
                start_new_session=True,  # a Ctrl-C in the terminal does not hit it first
                preexec_fn=_pdeathsig if self.die_with_parent else None,
            )
        finally:
            out.close()
            if stderr_path:
                err.close()  # type: ignore[union-attr]
        self.returncode = None
        _LIVE.add(self)

    def start(self) -> ManagedProcess:
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        self._spawn(self.argv())
        try:
            wait_until(
                lambda: self.check_alive() and self.ready(),
                timeout=self.startup_timeout,
                message=lambda: f"{self.name} not ready within {self.startup_timeout}s:\n{self.log_text()}",
            )
        except BaseException:
            self.kill()
            raise
        return self

    def check_alive(self) -> bool:
        """True while it runs (or was never started); ProcessFailed with its log once it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessFailed(
                f"{self.name} exited with {self.proc.returncode}: {' '.join(self.argv())}\n{self.log_text()}"
            )
        return True


    def send_signal(self, sig: int) -> None:
        """Send ``sig`` if it runs; do not wait."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait_stopped(self, timeout: float = 10.0) -> int | None:
        """Wait for it to exit, SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return self.returncode
        try:
            self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self._reaped()

    def _reaped(self) -> int | None:
        assert self.proc is not None
        self.returncode = self.proc.returncode
        self.proc = None
        _LIVE.discard(self)
        return self.returncode

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal (SIGTERM by default), wait, SIGKILL if needed. Returns the exit code."""
        self.send_signal(sig)
        return self.wait_stopped(timeout)

    def kill(self) -> int | None:
        """SIGKILL at once (a crash, for outage tests)."""
        self.send_signal(signal.SIGKILL)
        return self.wait_stopped(10.0)

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


def stop_all(procs: Iterable[ManagedProcess], timeout: float = 10.0) -> None:
    """SIGTERM every running process at once, then wait for each (SIGKILL what is left after ``timeout``)."""
    procs = [p for p in procs if p.proc is not None]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait_stopped(deadline - time.monotonic())
