"""Active evacuation's parts: the shared token bucket (agent/lua/evict.lua) against a real Redis,
the runtime API answers as HAProxy 2.6 and 3.2 print them, and which nodes are evacuated."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from agent.evacuate import burst_for, evacuation_targets, evict_script
from agent.haproxy_api import Stream, parse_sessions, parse_stat
from agent.model import Keys
from agent.rules import Eligibility

# `show sess` lines as HAProxy 2.6.12 and 3.2.26 print them (trimmed after the fields read).
SHOW_SESS = """\
0x56488e249c70: proto=tcpv4 src=127.0.0.1:35236 fe=fe_mqtt be=be_mqtt srv=node3 ts=00 epoch=0 age=1s calls=4 rate=2
0x56488e3d7310: proto=? ts=00 epoch=0 age=1s calls=5 rate=4 cpu=0 lat=0 rq[f=80c020h,i=0,an=00h,rx=,wx=,ax=]
0x56488e3dce60: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 epoch=0 age=0s calls=1 rate=0
0x7f32a4b3ac00: proto=tcpv4 src=127.0.0.1:44342 fe=fe_mqtt be=be_mqtt srv=node2 as=0 ts=00 epoch=0x0 age=0s calls=2
0x7f32a4e26800: proto=tcpv6 src=[::1]:44326 fe=fe_mqtt be=be_other srv=node2 ts=00 epoch=0 age=0s calls=2 rate=0

"""

SHOW_STAT = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,status
fe_mqtt,FRONTEND,,,7,9,4000,20,OPEN
be_mqtt,node1,0,0,0,1,,3,UP
be_mqtt,node2,0,0,5,5,,9,DRAIN (agent)
be_mqtt,node3,0,0,2,2,,4,MAINT
be_mqtt,BACKEND,0,0,7,9,400,20,UP
be_spoa,spoa1,0,0,1,2,,5,UP
"""


def test_parse_show_sess_and_show_stat() -> None:
    assert parse_sessions(SHOW_SESS) == [
        Stream("0x56488e249c70", "be_mqtt", "node3"),
        Stream("0x56488e3dce60", "<NONE>", "<none>"),
        Stream("0x7f32a4b3ac00", "be_mqtt", "node2"),
        Stream("0x7f32a4e26800", "be_other", "node2"),
    ]
    assert parse_stat(SHOW_STAT, "be_mqtt") == {"node1": 0, "node2": 5, "node3": 2}
    assert parse_stat(SHOW_STAT, "be_nothing") == {}


def test_evacuation_targets_need_somewhere_to_go() -> None:
    elig = Eligibility(placeable=(("node1", 1.0), ("node3", 1.0)), usable=frozenset({"node1", "node2", "node3"}),
                       evacuating={"node2": 50})
    assert evacuation_targets(elig) == {"node2": 50}
    # Everything evacuates or drains: the placeable set fell back to the usable nodes, the
    # evacuating node among them; its clients could only come back, so nothing is closed...
    alone = Eligibility(placeable=(("node2", 1.0),), usable=frozenset({"node2"}), evacuating={"node2": 50})
    assert evacuation_targets(alone) == {}
    # ... and a rate of 0 closes nothing.
    assert evacuation_targets(Eligibility(placeable=(("node1", 1.0),), usable=frozenset({"node1", "node2"}),
                                          evacuating={"node2": 0})) == {}
    assert [burst_for(r) for r in (1, 5, 6, 100, 1000)] == [1, 1, 2, 20, 200]


def test_token_bucket_is_shared_and_holds_the_rate(redis_server) -> None:
    """Four takers (two agents' worth, twice over) ask as fast as they can for 2 s: together they
    get at most burst + rate x elapsed, by Redis's clock. After an idle spell the bucket holds
    exactly its burst; unused tokens can be given back."""
    rate, burst = 50, burst_for(50)
    key = Keys().evict("node2")

    async def main() -> tuple[int, float, int, int, int]:
        r = Redis.from_url(redis_server.url)
        take = r.register_script(evict_script())
        granted = 0
        stop = time.monotonic() + 2.0

        async def taker() -> None:
            nonlocal granted
            while time.monotonic() < stop:
                granted += int(await take(keys=[key], args=[rate, burst, 3]))
                await asyncio.sleep(0.01)

        t0 = await r.time()
        await asyncio.gather(*(taker() for _ in range(4)))
        t1 = await r.time()
        elapsed = (t1[0] + t1[1] / 1e6) - (t0[0] + t0[1] / 1e6)
        await asyncio.sleep(2 * burst / rate)  # long enough to refill twice over
        full = int(await take(keys=[key], args=[rate, burst, 3 * burst]))
        # A refund: tokens given back are there again for the next taker.
        await r.hset(key, "tokens", "0")
        await take(keys=[key], args=[rate, burst, -5])
        back = int(await take(keys=[key], args=[rate, burst, 5]))
        ttl = await r.ttl(key)
        await r.aclose()
        return granted, elapsed, full, back, ttl

    granted, elapsed, full, back, ttl = asyncio.run(main())
    assert 0 < granted <= burst + rate * elapsed, (granted, elapsed)
    assert full == burst
    assert back == 5 and 0 < ttl <= 60
