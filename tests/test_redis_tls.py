"""Redis over TLS against a real ``redis-server --tls-port``, with certificates made by openssl here.

Every client (decisions, background work, the CLI's client) takes the TLS options from the one
URL; a wrong CA is a clear error, the agent falls back, and /readyz says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.app import App
from agent.config import Config, NodeConfig
from agent.core import Core
from agent.endpoint import RedisEndpoint
from agent.model import How, Keys
from agent.request import ConnectRequest
from devstack import free_port, records

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _signed(d: Path, name: str, ca: str, cn: str, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)
    extra: list[str] = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", *extra, cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "server", "ca", "localhost", "DNS:localhost,IP:127.0.0.1")
    _signed(d, "client", "ca", "mqtt-affinity-agent")
    return d


@pytest.fixture(scope="module")
def tls_port(certs: Path) -> Iterator[int]:
    port = free_port()
    log = certs / "redis.log"
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
         "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes",
         "--save", "", "--appendonly", "no", "--dir", str(certs), "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while "Ready to accept connections" not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"redis-server with TLS did not start:\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.05)
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()


def url(port: int, certs: Path, *, ca: str = "ca", client: bool = True, db: int = 2) -> str:
    u = f"rediss://localhost:{port}/{db}?ssl_ca_certs={certs / (ca + '.crt')}"
    if client:
        u += f"&ssl_certfile={certs / 'client.crt'}&ssl_keyfile={certs / 'client.key'}"
    return u


def config(redis_url: str, **kw: object) -> Config:
    nodes = (NodeConfig("n1", "127.0.0.1", free_port()), NodeConfig("n2", "127.0.0.1", free_port()))
    return Config(nodes=nodes, redis_url=redis_url, redis_timeout=1.0, metrics_listen=None, **kw)  # type: ignore[arg-type]


def decide_once(cfg: Config) -> tuple[object, str | None]:
    async def go() -> tuple[object, str | None]:
        core = Core.build(cfg, lambda: frozenset({"n1", "n2"}))
        await core.start()
        try:
            d = await core.engine.decide(ConnectRequest(b"tls-client", proto_ver=4, flags=0))
            return d, core.breaker.reason
        finally:
            await core.stop()

    return asyncio.run(go())


def test_every_client_uses_tls_with_ca_and_client_certificate(tls_port: int, certs: Path) -> None:
    u = url(tls_port, certs)
    d, _ = decide_once(config(u))
    assert d.how == How.ASSIGNED and d.source == "redis"  # type: ignore[attr-defined]
    # The CLI's client, from the same URL: same TLS options, same database.
    sync = RedisEndpoint.parse(u).sync_client()
    assert records.owner(sync, b"tls-client").node == d.node  # type: ignore[attr-defined,union-attr]
    assert sync.client_info()["db"] == 2
    sync.hset(Keys().node_state, "n1", "drain")

    async def overrides() -> object:
        core = Core.build(config(u), lambda: frozenset({"n1", "n2"}))
        try:
            assert await core.refresher.refresh()  # the background pool over TLS
            return core.refresher.overrides.states
        finally:
            await core.stop()

    assert asyncio.run(overrides()) == {"n1": "drain"}
    sync.flushdb()
    sync.close()


def test_a_wrong_ca_is_a_clear_error_and_decisions_fall_back(tls_port: int, certs: Path) -> None:
    d, reason = decide_once(config(url(tls_port, certs, ca="other-ca")))
    assert d.how == How.FALLBACK and d.node in ("n1", "n2")  # type: ignore[attr-defined]
    assert reason is not None and "certificate verify failed" in reason


def test_no_client_certificate_is_refused_by_the_server(tls_port: int, certs: Path) -> None:
    d, reason = decide_once(config(url(tls_port, certs, client=False)))
    assert d.how == How.FALLBACK  # type: ignore[attr-defined]
    assert reason is not None


def test_readyz_says_why_redis_is_unreachable(tls_port: int, certs: Path) -> None:
    metrics_port = free_port()
    cfg = config(url(tls_port, certs, ca="other-ca"))
    cfg = dataclasses.replace(cfg, metrics_listen=("127.0.0.1", metrics_port), listen=("127.0.0.1", 0))

    async def go() -> tuple[int, str]:
        app = App(cfg)
        await app.start()
        try:
            def get() -> tuple[int, str]:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as r:
                        return r.status, r.read().decode()
                except urllib.error.HTTPError as e:
                    return e.code, e.read().decode()

            return await asyncio.to_thread(get)
        finally:
            await app.stop()

    status, body = asyncio.run(go())
    assert status == 503
    assert "redis: unreachable" in body and "certificate verify failed" in body
