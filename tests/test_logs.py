"""Log formats and rate limiting (the clock is injected; nothing sleeps)."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
from collections.abc import Iterator

import pytest

from agent.logs import RateLimiter, reset_rate_limits, setup_logging, warn_limited


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root_restored() -> Iterator[None]:
    """setup_logging mutates the root logger; give the next test a clean one."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture
def clean_limits() -> Iterator[None]:
    reset_rate_limits()
    yield
    reset_rate_limits()


def test_json_lines_carry_fields(root_restored: None) -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    log = logging.getLogger("agent.test.json")
    log.warning(
        "broker %s down",
        "node1",
        extra={"fields": {"node": "node1", "peer": ipaddress.ip_address("::1"), "msg": "clash"}},
    )
    log.debug("not shown at info")
    try:
        raise RuntimeError("kaboom")
    except RuntimeError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    first = json.loads(lines[0])
    assert first["level"] == "warning"
    assert first["logger"] == "agent.test.json"
    assert first["msg"] == "broker node1 down"
    assert first["node"] == "node1"
    assert first["peer"] == "::1"  # not JSON-native, rendered with str()
    assert first["msg_"] == "clash"  # a field never overwrites the message
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    second = json.loads(lines[1])  # the traceback stays inside one JSON line
    assert len(lines) == 2
    assert second["msg"] == "failed"
    assert "RuntimeError: kaboom" in second["exc"]


def test_text_format_and_reconfigure(root_restored: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("debug", "json", stream=first)
    setup_logging("warning", "text", stream=second)
    log = logging.getLogger("agent.test.text")
    log.info("dropped at warning level")
    log.error("redis unreachable", extra={"fields": {"url": "redis://:***@r:6379/0", "why": "conn refused"}})
    assert first.getvalue() == ""  # the old handler was replaced, not stacked
    text = second.getvalue()
    assert text.count("\n") == 1
    assert "ERROR" in text and "agent.test.text: redis unreachable" in text
    assert 'url=redis://:***@r:6379/0 why="conn refused"' in text


def test_setup_logging_rejects_unknown_level() -> None:
    with pytest.raises(ValueError):
        setup_logging("verbose", "text")


def test_rate_limit_first_then_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = logging.getLogger("agent.test.rl")
    rl = RateLimiter(clock=clock)
    caplog.set_level(logging.DEBUG, logger="agent.test.rl")

    assert rl.log(log, "redis", "redis down: %s", "refused") is True
    for _ in range(3):
        clock.now += 1
        assert rl.log(log, "redis", "redis down: %s", "refused") is False
    assert [r.getMessage() for r in caplog.records] == ["redis down: refused"]

    clock.now = 1000.0 + 10.0  # exactly one interval after the first line
    assert rl.log(log, "redis", "redis down: %s", "timeout") is True
    last = caplog.records[-1]
    assert last.getMessage() == "redis down: timeout (3 similar suppressed)"
    assert last.fields == {"suppressed": 3}  # type: ignore[attr-defined]

    clock.now += 10.0  # nothing suppressed in between: no count appended
    rl.log(log, "redis", "redis down: %s", "timeout")
    assert caplog.records[-1].getMessage() == "redis down: timeout"
    assert len(caplog.records) == 3


def test_rate_limit_keys_are_independent_and_scoped_per_logger(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    caplog.set_level(logging.DEBUG)
    rl = RateLimiter(clock=clock)
    a, b = logging.getLogger("agent.test.a"), logging.getLogger("agent.test.b")
    assert rl.log(a, "k1", "one", level=logging.ERROR)
    assert rl.log(a, "k2", "two", level=logging.ERROR)
    assert not rl.log(a, "k1", "one again", level=logging.ERROR)
    assert rl.log(b, "k1", "same key, other logger", level=logging.ERROR)
    assert [r.getMessage() for r in caplog.records] == ["one", "two", "same key, other logger"]


def test_rate_limit_keeps_literal_percent_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    caplog.set_level(logging.DEBUG, logger="agent.test.pct")
    log = logging.getLogger("agent.test.pct")
    rl = RateLimiter(clock=clock)
    rl.log(log, "frame", "100% malformed", interval=1.0, level=logging.INFO, fields={"peer": "10.0.0.1"})
    rl.log(log, "frame", "100% malformed", interval=1.0, level=logging.INFO, fields={"peer": "10.0.0.1"})
    clock.now += 1.0
    rl.log(log, "frame", "100% malformed", interval=1.0, level=logging.INFO, fields={"peer": "10.0.0.2"})
    last = caplog.records[-1]
    assert last.getMessage() == "100% malformed (1 similar suppressed)"
    assert last.fields == {"peer": "10.0.0.2", "suppressed": 1}  # type: ignore[attr-defined]


def test_rate_limit_key_table_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    caplog.set_level(logging.DEBUG, logger="agent.test.bound")
    log = logging.getLogger("agent.test.bound")
    rl = RateLimiter(clock=clock, max_keys=2)
    rl.log(log, "a", "a")
    rl.log(log, "b", "b")
    rl.log(log, "c", "c")  # evicts "a", the least recently logged key
    assert not rl.log(log, "c", "c")
    assert rl.log(log, "a", "a")  # forgotten, so logged again
    assert [r.getMessage() for r in caplog.records] == ["a", "b", "c", "a"]


def test_disabled_level_is_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = logging.getLogger("agent.test.lvl")
    caplog.set_level(logging.WARNING, logger="agent.test.lvl")
    rl = RateLimiter(clock=clock)
    assert not rl.log(log, "k", "invisible", level=logging.DEBUG)
    assert rl.log(log, "k", "visible")  # debug calls did not use up the key
    assert caplog.records[-1].getMessage() == "visible"


def test_warn_limited_shared_table(caplog: pytest.LogCaptureFixture, clean_limits: None) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.test.wl")
    log = logging.getLogger("agent.test.wl")

    def caller() -> None:
        warn_limited(log, "bad-frame", "malformed frame from %s", "10.0.0.1", interval=3600)

    caller()
    caller()
    caller()
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "malformed frame from 10.0.0.1"
    assert record.funcName == "caller"  # attributed to the call site, not agent.logs
    reset_rate_limits()
    caller()
    assert len(caplog.records) == 2
    assert warn_limited(log, "other", "x", level=logging.ERROR) is True
    assert caplog.records[-1].levelno == logging.ERROR


def test_rate_limiter_attributes_call_site(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.test.site")
    log = logging.getLogger("agent.test.site")
    rl = RateLimiter(clock=FakeClock())

    def via_log() -> None:
        rl.log(log, "k1", "x")

    via_log()
    assert [r.funcName for r in caplog.records] == ["via_log"]
