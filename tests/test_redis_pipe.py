"""The pipelined Redis connection: RESP framing, in-order replies, failures, against real redis-server."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import redis

from agent.endpoint import RedisEndpoint
from agent.redis_pipe import NoScriptError, PipelinedRedis, RedisBackpressure, RedisReplyError, encode_command
from devstack import RedisServer, free_port, wait_until

# Busy-waits 200 ms inside Redis (single threaded): everything queued behind it is late.
SLOW_200MS = (
    "EVAL",
    "local t=redis.call('TIME') while true do local n=redis.call('TIME') "
    "if (n[1]-t[1])*1000000+(n[2]-t[2]) > 200000 then return 'slow' end end",
    0,
)


def test_encode_command_is_resp_bulk_array():
    assert encode_command(("SET", b"k\r\n\x00", 5)) == b"*3\r\n$3\r\nSET\r\n$4\r\nk\r\n\x00\r\n$1\r\n5\r\n"


def pipe(url: str, **kw) -> PipelinedRedis:
    """The decision connection for a URL, as the store builds it (redis-py parses the URL)."""
    return PipelinedRedis(RedisEndpoint.parse(url).pipe_target(), **kw)


def test_many_in_flight_replies_match_their_requests(redis_server):
    async def go():
        p = pipe(redis_server.url)
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
        p = pipe(redis_server.url)
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
            p = pipe(server.url)
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
            p = pipe(f"redis://:p%40ss@127.0.0.1:{port}/5")
            await p.connect()
            assert await p.execute("GET", "where") == b"db5"
            await p.close()
            bad = pipe(f"redis://:wrong@127.0.0.1:{port}/5")
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


def test_timeouts_with_no_reply_at_all_drop_the_connection(redis_server):
    """Requests time out and nothing came back since they were sent: the connection is treated as
    stalled and dropped (the engine then falls back and its probe reconnects)."""

    async def go():
        p = pipe(redis_server.url)
        await p.connect()
        slow = p.execute(*SLOW_200MS)
        late = [p.execute("ECHO", b"x%d" % i, timeout=0.05) for i in range(5)]
        for fut in late:
            with pytest.raises(TimeoutError):
                await fut
        with pytest.raises(redis.exceptions.ConnectionError):
            await slow
        assert not p.connected
        await p.connect()
        assert await p.execute("ECHO", "fresh", timeout=1.0) == b"fresh"
        await p.close()

    asyncio.run(go())


def test_timeouts_while_replies_flow_keep_the_connection():
    """Slow but answering (a peer that sends one reply every 30 ms): the late requests time out,
    the connection stays, and the replies that still arrive for them are skipped in place."""

    async def go():
        async def slow_redis(reader, writer):
            buf = b""
            while True:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                buf += chunk
                while b"ECHO\r\n" in buf:  # one inline-parsed ECHO <x> per request
                    _head, _, rest = buf.partition(b"ECHO\r\n")
                    size_line, _, rest = rest.partition(b"\r\n")
                    n = int(size_line[1:])
                    payload, buf = rest[:n], rest[n + 2:]
                    await asyncio.sleep(0.03)
                    writer.write(b"$%d\r\n%s\r\n" % (len(payload), payload))

        server = await asyncio.start_server(slow_redis, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        p = pipe(f"redis://127.0.0.1:{port}/0")
        await p.connect()
        futs = [p.execute("ECHO", b"q%d" % i, timeout=0.1) for i in range(8)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        answered = [r for r in results if not isinstance(r, TimeoutError)]
        assert answered == [b"q%d" % i for i in range(len(answered))] and 1 <= len(answered) < 8
        assert all(isinstance(r, TimeoutError) for r in results[len(answered):])
        assert p.connected
        # The skipped replies drain first; this one still gets its own.
        assert await p.execute("ECHO", b"after", timeout=2.0) == b"after"
        await p.close()
        server.close()
        await server.wait_closed()

    asyncio.run(go())


def test_nothing_runs_before_auth_and_select(tmp_path):
    """A request made while the connection is still authenticating fails fast; it never runs on db 0."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", "pw", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        sync = redis.Redis(port=port, password="pw")
        wait_until(lambda: _pings(sync))

        async def go():
            p = pipe(f"redis://:pw@127.0.0.1:{port}/5")
            connecting = asyncio.ensure_future(p.connect())
            early = []
            while not connecting.done():
                early.append(p.execute("SET", "early", "x"))
                await asyncio.sleep(0)
            await connecting
            results = await asyncio.gather(*early, return_exceptions=True)
            refused = [r for r in results if isinstance(r, redis.exceptions.ConnectionError)]
            assert refused, "the handshake window was never exercised"
            # Anything not refused ran after AUTH and SELECT, so on db 5.
            assert all(r == b"OK" for r in results if r not in refused)
            assert b"db=5" in await p.execute("CLIENT", "INFO")
            await p.close()

        asyncio.run(go())
        assert sync.get("early") is None  # db 0 untouched
    finally:
        proc.kill()
        proc.wait()


def test_a_connection_that_stops_answering_is_replaced():
    """A peer that accepts and never replies: the timed-out connection is dropped, not fed forever."""

    async def go():
        accepted = []

        async def silent(reader, writer):
            accepted.append(writer)
            await reader.read()  # swallow everything, answer nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        p = pipe(f"redis://127.0.0.1:{port}/0")
        await p.connect()
        for _ in range(3):
            futs = [p.execute("PING", timeout=0.05) for _ in range(100)]
            results = await asyncio.gather(*futs, return_exceptions=True)
            # The first to expire time out; dropping the stalled connection fails the rest.
            assert isinstance(results[0], TimeoutError)
            assert all(isinstance(r, (TimeoutError, redis.exceptions.ConnectionError)) for r in results)
            assert not p.connected and len(p._waiting) == 0
            await p.connect()  # a fresh connection each time
        assert len(accepted) == 4  # the first connection and three replacements
        await p.close()
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()

    asyncio.run(go())


def test_noscript_is_its_own_exception_class(redis_server):
    async def go():
        p = pipe(redis_server.url)
        await p.connect()
        with pytest.raises(NoScriptError):
            await p.execute("EVALSHA", "0" * 40, 0)
        with pytest.raises(RedisReplyError) as other:
            await p.execute("NOSUCHCOMMAND")
        assert not isinstance(other.value, NoScriptError)
        await p.close()

    asyncio.run(go())


def test_a_redis_that_does_not_read_bounds_what_we_queue():
    """Write backpressure: past MAX_UNSENT, new commands fail at once (as timeouts) instead of growing memory."""
    from agent import redis_pipe

    async def go():
        blocked = asyncio.Event()

        async def deaf(reader, writer):
            await blocked.wait()  # never reads: the kernel buffers fill, then asyncio pauses our writes
            writer.close()

        server = await asyncio.start_server(deaf, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        p = pipe(f"redis://127.0.0.1:{port}/0")
        await p.connect()
        big = b"x" * 65536
        futs = []
        refused = None
        for _ in range(2000):  # up to 128 MiB if nothing pushed back
            f = p.execute("SET", "k", big)
            futs.append(f)
            if f.done() and isinstance(f.exception(), RedisBackpressure):
                refused = f.exception()
                break
            await asyncio.sleep(0)
        assert refused is not None, "never pushed back"
        assert p._unsent <= redis_pipe.MAX_UNSENT + len(big) + 64
        assert isinstance(refused, TimeoutError)  # the breaker counts it as a timeout, not an outage
        await p.close()
        for f in futs:
            if not f.done():
                f.cancel()
        blocked.set()
        server.close()
        await server.wait_closed()

    asyncio.run(go())
