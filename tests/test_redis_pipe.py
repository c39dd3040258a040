"""The pipelined Redis connection: RESP framing, in-order replies, failures, against real redis-server."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import redis

from agent.redis_pipe import PipelinedRedis, RedisReplyError, encode_command, parse_redis_url
from tests.support.procs import RedisServer, free_port, wait_until


# Busy-waits 200 ms inside Redis (single threaded): everything queued behind it is late.
SLOW_200MS = (
    "EVAL",
    "local t=redis.call('TIME') while true do local n=redis.call('TIME') "
    "if (n[1]-t[1])*1000000+(n[2]-t[2]) > 200000 then return 'slow' end end",
    0,
)


def test_encode_command_is_resp_bulk_array():
    assert encode_command(("SET", b"k\r\n\x00", 5)) == b"*3\r\n$3\r\nSET\r\n$4\r\nk\r\n\x00\r\n$1\r\n5\r\n"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:7000/3", {"host": "127.0.0.1", "port": 7000, "db": 3, "password": None, "tls": False}),
        ("redis://:s%40cret@h:1/0", {"host": "h", "port": 1, "db": 0, "password": "s@cret", "username": None}),
        ("rediss://u:p@h", {"host": "h", "port": 6379, "tls": True, "username": "u", "password": "p"}),
        ("unix:///run/redis.sock?db=2", {"path": "/run/redis.sock", "db": 2}),
        ("redis://h:2/?password=x", {"password": "x"}),
    ],
)
def test_parse_redis_url(url, expected):
    opts = parse_redis_url(url)
    assert {k: opts[k] for k in expected} == expected


def test_parse_redis_url_rejects_unknown_scheme():
    with pytest.raises(ValueError):
        parse_redis_url("http://h:1")


def test_many_in_flight_replies_match_their_requests(redis_server):
    async def go():
        p = PipelinedRedis(redis_server.url)
        await p.connect()
        results = await asyncio.gather(*(p.execute("ECHO", b"v%d" % i) for i in range(2000)))
        assert results == [b"v%d" % i for i in range(2000)]
        with pytest.raises(RedisReplyError, match="WRONGTYPE"):
            await p.execute("SET", "k", "1")
            await p.execute("LPUSH", "k", "x")
        # An error reply does not desynchronise the stream.
        assert await p.execute("GET", "k") == b"1"
        await p.close()

    asyncio.run(go())


def test_timed_out_caller_does_not_shift_later_replies(redis_server):
    async def go():
        p = PipelinedRedis(redis_server.url)
        await p.connect()
        slow = p.execute(*SLOW_200MS)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await slow
        assert await p.execute("ECHO", "after") == b"after"
        await p.close()

    asyncio.run(go())


def test_connection_loss_fails_in_flight_and_reconnect_works(tmp_path):
    server = RedisServer(workdir=tmp_path).start()
    try:
        async def go():
            p = PipelinedRedis(server.url)
            await p.connect()
            blocked = p.execute("BLPOP", "never", 0)
            server.kill()
            with pytest.raises(redis.exceptions.ConnectionError):
                await blocked
            assert not p.connected
            with pytest.raises(redis.exceptions.ConnectionError):
                await p.execute("PING")
            with pytest.raises(redis.exceptions.ConnectionError):
                await p.connect()
            server.start()
            await p.connect()
            assert await p.execute("PING") == b"PONG"
            await p.close()

        asyncio.run(go())
    finally:
        server.kill()


def test_password_and_database_from_url(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", "p@ss", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        sync = redis.Redis(port=port, password="p@ss", db=5)
        wait_until(lambda: _pings(sync))
        sync.set("where", "db5")

        async def go():
            p = PipelinedRedis(f"redis://:p%40ss@127.0.0.1:{port}/5")
            await p.connect()
            assert await p.execute("GET", "where") == b"db5"
            await p.close()
            bad = PipelinedRedis(f"redis://:wrong@127.0.0.1:{port}/5")
            with pytest.raises(redis.exceptions.ConnectionError):
                await bad.connect()

        asyncio.run(go())
    finally:
        proc.kill()
        proc.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def test_execute_timeout_fails_only_the_late_requests(redis_server):
    async def go():
        p = PipelinedRedis(redis_server.url)
        await p.connect()
        slow = p.execute(*SLOW_200MS)
        late = [p.execute("ECHO", b"x%d" % i, timeout=0.05) for i in range(5)]
        for fut in late:
            with pytest.raises(TimeoutError):
                await fut
        assert await slow == b"slow"
        # Their replies were skipped in place: later requests still match.
        assert await p.execute("ECHO", "fresh", timeout=1.0) == b"fresh"
        await p.close()

    asyncio.run(go())
