"""Shared pytest fixtures: real Redis, mosquitto, HAProxy (2.6 and 3.2) and agent processes.

Fixtures (all stop what they started at teardown, also when the test fails):

- ``redis_server`` -> RedisServer (function scope; ``.url``, ``.port``, ``.stop()``,
  ``.start()`` again on the same port, ``.kill()``). ``redis_server_session``: one shared
  for the session; do not stop it (FLUSHALL it if you need a clean database).
- ``brokers`` -> list of three Mosquitto (``.port``, ``.addr``, ``.stop()/.kill()/.start()``,
  ``.connected_client_ids()``, ``.log_lines()``), in node1..node3 order.
- ``haproxy_version`` -> "2.6" | "3.2": parametrises every test that uses it (directly or
  through ``haproxy_factory``). A missing binary FAILS the test with the command that
  fixes it, unless MQTT_AFFINITY_ALLOW_SKIP=1 (then it is skipped).
- ``haproxy_factory(cfg_path=HAPROXY_CFG, env=None, *, version=None, label="") -> HAProxy``:
  validates (-c), starts and waits for the stats socket. ``version`` defaults to the
  ``haproxy_version`` parameter. Build ``env`` with ``haproxy_env(mqtt_port=..., broker_addrs=...,
  spoa_port=..., balancer_name=...)``.
- ``agent_factory(config_path, env=None, *, extra_args=()) -> AgentProcess`` (started; call
  ``.wait_listening(port)``).
- ``tmp_workdir(name) -> Path``: a fresh subfolder of ``tmp_path`` for a process.
- ``stack`` -> devstack ``Stack``: ``redis_server``, ``brokers`` and two balancers ha1, ha2
  (HAProxy ``haproxy_version`` + its own agent each). ``stack_factory(balancers=2) -> Stack``
  builds one with another number of balancers (``agent_overrides=`` top-level keys for every
  agent's YAML, e.g. ``{"owner_down_grace": 0}``). Closed (HAProxy and agents stopped) at teardown.

The classes and helpers are the ``devstack`` package (shared with bench/ and scripts/demo.py).
Tests that use any of these process fixtures, or carry the ``haproxy`` marker, are marked
``integration`` automatically: ``make test-unit`` runs ``-m "not integration"``. A test that
starts processes by hand (through devstack directly) should be marked
``@pytest.mark.integration`` itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

# `tests` has no __init__.py: make `devstack` and `tests.support` importable under plain
# `pytest` too (python -m pytest already has the repo root on sys.path).
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# The suite runs the pure-Python source of agent/. MQTT_AFFINITY_COMPILED=DIR runs it against
# a mypyc build in DIR instead (a copy of agent/ with the compiled modules next to their source,
# as tests/test_compiled.py makes one): DIR goes first on sys.path, before anything imports agent.
_COMPILED_DIR = os.environ.get("MQTT_AFFINITY_COMPILED")
if _COMPILED_DIR:
    sys.path.insert(0, os.path.abspath(_COMPILED_DIR))
    if "agent" in sys.modules:
        raise RuntimeError(
            f"MQTT_AFFINITY_COMPILED: agent was imported before conftest, from {sys.modules['agent'].__file__}"
        )
else:
    # A compiled module left in the source tree (mypyc or `setup.py build_ext --inplace` run by
    # hand) would be imported instead of its .py, by the suite and by the editable install.
    _stray = sorted(str(p.relative_to(_REPO_ROOT)) for p in Path(_REPO_ROOT, "agent").rglob("*.so"))
    if _stray:
        raise RuntimeError(
            f"compiled modules in the source tree would shadow agent/'s Python source: {', '.join(_stray)}; "
            "remove them (make clean)"
        )

from devstack import (  # noqa: E402
    HAPROXY_CFG,
    HAPROXY_VERSIONS,
    AgentProcess,
    HAProxy,
    Mosquitto,
    RedisServer,
    Stack,
    ToolMissing,
    haproxy_binary,
)

if _COMPILED_DIR:
    import agent.placement

    if not (agent.placement.__file__ or "").endswith(".so"):
        raise RuntimeError(f"MQTT_AFFINITY_COMPILED={_COMPILED_DIR}: agent.placement is {agent.placement.__file__}")


def pytest_report_header(config) -> str:
    import agent.placement

    kind = f"compiled ({_COMPILED_DIR})" if _COMPILED_DIR else "pure Python"
    return f"agent: {kind}, {Path(agent.placement.__file__ or '?').parent}"


PROCESS_FIXTURES = frozenset(
    {
        "redis_server", "redis_server_session", "brokers", "haproxy_version", "haproxy_factory", "agent_factory",
        "stack", "stack_factory",
    }
)  # fmt: skip


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "integration: starts real processes (Redis, mosquitto, HAProxy, agent)")
    config.addinivalue_line("markers", "haproxy: needs real HAProxy binaries")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())) or item.get_closest_marker("haproxy"):
            item.add_marker(pytest.mark.integration)


def _allow_skip() -> bool:
    return os.environ.get("MQTT_AFFINITY_ALLOW_SKIP") == "1"


def _missing(exc: ToolMissing) -> None:
    """A missing tool fails the test (CI must not go green without it) unless skips are allowed."""
    if _allow_skip():
        pytest.skip(str(exc))
    pytest.fail(f"{exc}\n(set MQTT_AFFINITY_ALLOW_SKIP=1 to skip instead)", pytrace=False)


@pytest.fixture
def tmp_workdir(tmp_path: Path) -> Callable[[str], Path]:
    counter = {"n": 0}

    def make(name: str) -> Path:
        counter["n"] += 1
        d = tmp_path / f"{counter['n']:02d}-{name}"
        d.mkdir(parents=True)
        os.chmod(d, 0o755)  # mosquitto may drop to its own user
        return d

    return make


# --------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_server(tmp_workdir) -> Iterator[RedisServer]:
    try:
        server = RedisServer(workdir=tmp_workdir("redis"))
    except ToolMissing as exc:
        _missing(exc)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory) -> Iterator[RedisServer]:
    try:
        server = RedisServer(workdir=tmp_path_factory.mktemp("redis-session"))
    except ToolMissing as exc:
        _missing(exc)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --------------------------------------------------------------------------- brokers


@pytest.fixture
def brokers(tmp_workdir) -> Iterator[list[Mosquitto]]:
    started: list[Mosquitto] = []
    try:
        for i in (1, 2, 3):
            try:
                b = Mosquitto(workdir=tmp_workdir(f"node{i}"), label=f"node{i}")
            except ToolMissing as exc:
                _missing(exc)
            started.append(b)
            b.start()
        yield started
    finally:
        for b in started:
            b.kill()


# --------------------------------------------------------------------------- HAProxy


@pytest.fixture(params=HAPROXY_VERSIONS)
def haproxy_version(request) -> str:
    version = request.param
    try:
        haproxy_binary(version)
    except ToolMissing as exc:
        _missing(exc)
    return version


@pytest.fixture
def haproxy_factory(haproxy_version, tmp_workdir) -> Iterator[Callable[..., HAProxy]]:
    started: list[HAProxy] = []

    def start(
        cfg_path: str | Path = HAPROXY_CFG,
        env: Mapping[str, str] | None = None,
        *,
        version: str | None = None,
        label: str = "",
    ) -> HAProxy:
        v = version or haproxy_version
        ha = HAProxy(v, cfg_path, env, workdir=tmp_workdir(f"haproxy{v}-{label or len(started)}"), label=label)
        started.append(ha)
        ha.start()
        return ha

    try:
        yield start
    finally:
        for ha in started:
            ha.stop(timeout=5)


# --------------------------------------------------------------------------- agent


@pytest.fixture
def agent_factory(tmp_workdir) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(config_path: str | Path, env: Mapping[str, str] | None = None, *, extra_args=()) -> AgentProcess:
        agent = AgentProcess(config_path, env, workdir=tmp_workdir("agent"), extra_args=extra_args)
        started.append(agent)
        return agent.start()

    try:
        yield start
    finally:
        for agent in started:
            agent.stop(timeout=10)


# --------------------------------------------------------------------------- the whole product


@pytest.fixture
def stack_factory(tmp_workdir, redis_server, brokers, haproxy_version) -> Iterator[Callable[..., Stack]]:
    """``make(balancers=2, agent_overrides=None) -> Stack`` on ``redis_server`` and ``brokers``, every
    HAProxy seeing its brokers and its agent UP. Each stack is closed at teardown (its HAProxy and agents)."""
    stacks: list[Stack] = []

    def make(balancers: int = 2, agent_overrides: Mapping[str, object] | None = None) -> Stack:
        s = Stack(haproxy_version, workdir=tmp_workdir, redis=redis_server, brokers=brokers,
                  agent_overrides=agent_overrides)
        stacks.append(s)
        return s.start(balancers=balancers)

    try:
        yield make
    finally:
        for s in stacks:
            s.close()


@pytest.fixture
def stack(stack_factory) -> Stack:
    """Redis, three brokers, and two balancers (HAProxy + its own agent) sharing that Redis."""
    return stack_factory(2)
