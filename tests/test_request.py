"""SPOE args -> ConnectRequest, and the MQTT session-lifetime rules."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.request import NEVER_EXPIRES, ConnectRequest, parse_connect


def test_parse_typical_mqtt5_connect() -> None:
    req = parse_connect(
        [
            ("client_id", b"sensor-17"),
            ("username", b"alice"),
            ("src", ipaddress.ip_address("10.0.0.7")),
            ("proto_ver", b"5"),
            ("flags", b"194"),
            ("sess_expiry", b"300"),
            ("balancer", "ha1"),
        ]
    )
    assert req == ConnectRequest(
        client_id=b"sensor-17",
        username=b"alice",
        src=ipaddress.ip_address("10.0.0.7"),
        proto_ver=5,
        flags=194,
        sess_expiry=300,
        balancer="ha1",
    )


def test_nulls_and_missing() -> None:
    req = parse_connect([("client_id", None), ("proto_ver", None), ("flags", None), ("sess_expiry", None)])
    assert req == ConnectRequest(client_id=None)
    assert parse_connect([]) == ConnectRequest(client_id=None)


def test_empty_client_id_is_none() -> None:
    assert parse_connect([("client_id", b"")]).client_id is None
    assert parse_connect([("client_id", "")]).client_id is None


def test_client_id_is_raw_bytes_up_to_65535() -> None:
    cid = bytes(range(256)) * 255 + b"\x00" * 255  # 65535 bytes, NULs, non-UTF-8
    assert len(cid) == 65535
    assert parse_connect([("client_id", cid)]).client_id == cid
    assert parse_connect([("client_id", cid + b"x")]).client_id is None  # impossible in MQTT
    assert parse_connect([("client_id", bytearray(b"ab"))]).client_id == b"ab"
    assert parse_connect([("client_id", "ü")]).client_id == "ü".encode()
    assert parse_connect([("client_id", 12)]).client_id is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"5", 5), ("4", 4), (4, 4), (b" 3 ", 3), (b"", None), (b"x", None), (b"-1", None),
        (b"+5", None), (b"1_0", None), ("٣", None), (b"256", None), (True, None), (3.0, None),
        (b"9" * 50, None), (None, None),
    ],
)  # fmt: skip
def test_liberal_numbers(value: object, expected: int | None) -> None:
    assert parse_connect([("proto_ver", value)]).proto_ver == expected


def test_sess_expiry_range() -> None:
    assert parse_connect([("sess_expiry", b"4294967295")]).sess_expiry == NEVER_EXPIRES
    assert parse_connect([("sess_expiry", b"4294967296")]).sess_expiry is None


def test_first_occurrence_wins_and_unknown_ignored() -> None:
    req = parse_connect([("x", 1), ("client_id", b"a"), ("client_id", b"b"), ("flags", b"2"), ("flags", b"0")])
    assert req.client_id == b"a" and req.flags == 2


def test_src_and_balancer_types() -> None:
    assert parse_connect([("src", ipaddress.ip_address("::1"))]).source == "::1"
    assert parse_connect([("src", ipaddress.ip_address("10.0.0.7"))]).source == "10.0.0.7"
    assert parse_connect([("src", "192.0.2.1")]).source == "192.0.2.1"
    assert parse_connect([("src", b"192.0.2.2")]).source == "192.0.2.2"
    assert parse_connect([("src", 7)]).source is None
    assert parse_connect([]).source is None
    assert parse_connect([("balancer", b"ha2")]).balancer == "ha2"
    assert parse_connect([("balancer", 7)]).balancer is None


@pytest.mark.parametrize(
    ("proto", "flags", "expiry", "persistent"),
    [
        (4, 0x02, None, False),  # 3.1.1 clean session
        (4, 0x00, None, True),  # 3.1.1 persistent
        (3, 0xC2, None, False),  # 3.1 clean, with user/password bits
        (3, 0xC0, None, True),
        (4, None, None, True),  # flags unknown -> safe side
        (5, 0x02, 300, True),  # clean start + expiry: a new session that outlives the connection
        (5, 0x00, 0, False),  # expiry 0: session ends with the connection
        (5, 0x00, None, False),  # absent property = 0 (MQTT 5 3.1.2.11.2)
        (5, 0x02, NEVER_EXPIRES, True),
        (None, None, None, True),  # nothing known -> sticky
        (None, 0x02, None, True),  # unknown protocol: do not trust the bit
        (6, 0x02, None, True),
    ],
)
def test_persistent(proto: int | None, flags: int | None, expiry: int | None, persistent: bool) -> None:
    req = ConnectRequest(client_id=b"c", proto_ver=proto, flags=flags, sess_expiry=expiry)
    assert req.persistent is persistent


def test_record_ttl() -> None:
    assert ConnectRequest(b"c", proto_ver=4, flags=0).record_ttl(86400) == 86400
    assert ConnectRequest(b"c", proto_ver=5, sess_expiry=300).record_ttl(86400) == 86400
    assert ConnectRequest(b"c", proto_ver=5, sess_expiry=200_000).record_ttl(86400) == 200_000
    assert ConnectRequest(b"c", proto_ver=5, sess_expiry=NEVER_EXPIRES).record_ttl(86400) is None
    assert ConnectRequest(b"c", proto_ver=5, sess_expiry=None).record_ttl(60) == 60
    # the MQTT 3 protocol has no expiry field; a stray value is ignored
    assert ConnectRequest(b"c", proto_ver=4, sess_expiry=NEVER_EXPIRES).record_ttl(60) == 60


values = st.one_of(
    st.none(), st.binary(max_size=40), st.text(max_size=40), st.integers(), st.floats(), st.booleans(),
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)), st.lists(st.integers(), max_size=3),
)  # fmt: skip
names = st.sampled_from(["client_id", "username", "src", "proto_ver", "flags", "sess_expiry", "balancer", "other"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(names, values), max_size=12))
def test_never_raises(args: list[tuple[str, object]]) -> None:
    req = parse_connect(args)
    assert req.client_id is None or (isinstance(req.client_id, bytes) and req.client_id)
    for n in (req.proto_ver, req.flags):
        assert n is None or 0 <= n <= 255
    assert req.sess_expiry is None or 0 <= req.sess_expiry <= NEVER_EXPIRES
    assert isinstance(req.persistent, bool)
    ttl = req.record_ttl(100)
    assert ttl is None or ttl >= 100
