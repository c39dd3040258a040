"""Varints, raw strings and typed data of the SPOP codec."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.spop import DataType, LocalProtocolError, ProtocolError, Status, Typed
from agent.spop.types import (
    decode_string,
    decode_typed,
    decode_typed_with_type,
    decode_varint,
    encode_string,
    encode_typed,
    encode_varint,
)

U64 = (1 << 64) - 1

# Expected bytes computed by hand from the SPOE.txt table / HAProxy encoder.
VARINT_VECTORS = [
    (0, "00"),
    (1, "01"),
    (239, "ef"),
    (240, "f000"),
    (2287, "ff7f"),
    (2288, "f08000"),
    (264431, "ffff7f"),
    (264432, "f0808000"),
    (2**32 - 1, "fff0fefe7e"),
    (2**64 - 1, "fff0fefefefefefefe0e"),
]


@pytest.mark.parametrize(("value", "hexbytes"), VARINT_VECTORS)
def test_varint_vectors(value: int, hexbytes: str) -> None:
    assert encode_varint(value).hex() == hexbytes
    assert decode_varint(bytes.fromhex(hexbytes)) == (value, len(hexbytes) // 2)


@pytest.mark.parametrize(
    ("value", "size"),
    [(239, 1), (240, 2), (2287, 2), (2288, 3), (264431, 3), (264432, 4), (33818863, 4), (33818864, 5)],
)
def test_varint_length_boundaries(value: int, size: int) -> None:
    assert len(encode_varint(value)) == size


def test_varint_decode_at_offset_and_trailing_bytes() -> None:
    data = b"\xaa" + encode_varint(2288) + b"\x01"
    assert decode_varint(data, 1) == (2288, 4)


@given(st.integers(min_value=0, max_value=U64))
@settings(max_examples=200)
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) <= 10
    assert decode_varint(encoded) == (value, len(encoded))
    # Every continuation byte has its high bit set, the last one does not.
    if len(encoded) > 1:
        assert encoded[0] >= 0xF0
        assert all(b >= 0x80 for b in encoded[1:-1]) and encoded[-1] < 0x80


@pytest.mark.parametrize("value", [-1, 2**64])
def test_varint_encode_out_of_range(value: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_varint(value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xf0",  # continuation announced, nothing follows
        b"\xf0\x80",
        b"\xff" + b"\xff" * 9,  # 10 bytes, all continuations
        b"\xff" + b"\xff" * 20,  # longer than 10 bytes
        b"\xff" + b"\xfe" * 8 + b"\x7f",  # 10 bytes but above 2**64-1
    ],
)
def test_varint_decode_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_varint(data)
    assert info.value.status is Status.INVALID_FRAME


def test_raw_string_round_trip_and_bad_utf8() -> None:
    assert encode_string("node") == b"\x04node"
    assert decode_string(b"\x04node") == ("node", 5)
    long = "x" * 300
    assert decode_string(encode_string(long)) == (long, 2 + 300)
    # Invalid UTF-8 never raises; surrogateescape keeps the bytes recoverable.
    text, _ = decode_string(b"\x02\xff\xfe")
    assert text.encode("utf-8", "surrogateescape") == b"\xff\xfe"
    with pytest.raises(ProtocolError):
        decode_string(b"\x05abc")


TYPED_VECTORS: list[tuple[object, str, object]] = [
    (None, "00", None),
    (True, "11", True),
    (False, "01", False),
    (5, "0405", 5),
    (-1, "04fff0fefefefefefefe0e", -1),
    (2**63, "05f0f1fefefefefefefe06", 2**63),
    (Typed(DataType.INT32, -1), "02fff0fefefefefefefe0e", -1),
    (Typed(DataType.INT32, 7), "0207", 7),
    (Typed(DataType.UINT32, 16380), "03fcf006", 16380),
    (Typed(DataType.UINT64, 3), "0503", 3),
    (ipaddress.IPv4Address("10.0.0.1"), "060a000001", ipaddress.IPv4Address("10.0.0.1")),
    (
        ipaddress.IPv6Address("2001:db8::1"),
        "0720010db8000000000000000000000001",
        ipaddress.IPv6Address("2001:db8::1"),
    ),
    ("node2", "08056e6f646532", "node2"),
    (b"\x00\x01", "09020001", b"\x00\x01"),
    (Typed(DataType.STRING, b"ab"), "08026162", "ab"),
    (Typed(DataType.BINARY, "ab"), "09026162", b"ab"),
]


@pytest.mark.parametrize(("value", "hexbytes", "decoded"), TYPED_VECTORS)
def test_typed_vectors(value: object, hexbytes: str, decoded: object) -> None:
    assert encode_typed(value).hex() == hexbytes
    assert decode_typed(bytes.fromhex(hexbytes)) == (decoded, len(hexbytes) // 2)


def test_decode_keeps_wire_type() -> None:
    assert decode_typed_with_type(bytes.fromhex("03fcf006"))[:2] == (DataType.UINT32, 16380)
    assert decode_typed_with_type(b"\x11")[:2] == (DataType.BOOL, True)


def test_bool_true_flag_is_high_nibble_and_other_flags_ignored() -> None:
    assert decode_typed(b"\x11") == (True, 1)
    assert decode_typed(b"\x21") == (False, 1)  # only 0x10 means true
    assert decode_typed(b"\xf8\x01a") == ("a", 3)  # flags on a STRING are ignored


@pytest.mark.parametrize(
    ("tid", "value"),
    [
        (DataType.INT32, -(2**31)),
        (DataType.INT32, 2**31 - 1),
        (DataType.INT64, -(2**63)),
        (DataType.INT64, -42),
    ],
)
def test_signed_negative_and_extremes(tid: DataType, value: int) -> None:
    encoded = encode_typed(Typed(tid, value))
    # HAProxy casts to uint64: negatives are the 64-bit two's complement.
    assert decode_varint(encoded, 1)[0] == value & ((1 << 64) - 1)
    assert decode_typed_with_type(encoded) == (tid, value, len(encoded))


def test_int32_accepts_32bit_twos_complement() -> None:
    encoded = b"\x02" + encode_varint(0xFFFFFFFE)
    assert decode_typed(encoded)[0] == -2


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x0a",  # type 10 is reserved
        b"\x0f",
        b"\x02" + encode_varint(2**40),  # not an int32 in either form
        b"\x03" + encode_varint(2**32),  # UINT32 too big
        b"\x06\x01\x02\x03",  # truncated IPv4
        b"\x07" + b"\x00" * 15,  # truncated IPv6
        b"\x08\x05abc",  # truncated string
        b"\x09",  # missing length
        b"\x04\xf0",  # truncated varint
    ],
)
def test_typed_decode_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_typed(data)
    assert info.value.status is Status.INVALID_FRAME


@pytest.mark.parametrize(
    "value",
    [
        2**64,
        -(2**63) - 1,
        object(),
        1.5,
        Typed(DataType.INT32, 2**31),
        Typed(DataType.UINT32, -1),
        Typed(DataType.UINT64, 2**64),
        Typed(DataType.INT64, "1"),
        Typed(DataType.NULL, 1),
        Typed(DataType.BOOL, 2),
        Typed(DataType.IPV4, "not an ip"),
        Typed(DataType.STRING, 3),
    ],
)
def test_typed_encode_rejects(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_typed(value)


def test_long_string_uses_multibyte_length() -> None:
    value = "é" * 200  # 400 bytes of UTF-8
    encoded = encode_typed(value)
    assert encoded[:3] == b"\x08" + encode_varint(400)
    assert decode_typed(encoded) == (value, len(encoded))


_ips = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)) | st.builds(
    ipaddress.IPv6Address, st.integers(0, 2**128 - 1)
)
plain_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=U64)
    | st.text()
    | st.binary()
    | _ips
)


@given(plain_values)
@settings(max_examples=300)
def test_typed_round_trip(value: object) -> None:
    encoded = encode_typed(value)
    decoded, offset = decode_typed(encoded + b"trailing")
    assert offset == len(encoded)
    assert decoded == value and type(decoded) is type(value)


@given(
    st.sampled_from([DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64]).flatmap(
        lambda t: st.tuples(
            st.just(t),
            {
                DataType.INT32: st.integers(-(2**31), 2**31 - 1),
                DataType.UINT32: st.integers(0, 2**32 - 1),
                DataType.INT64: st.integers(-(2**63), 2**63 - 1),
                DataType.UINT64: st.integers(0, U64),
            }[t],
        )
    )
)
@settings(max_examples=200)
def test_forced_int_round_trip(case: tuple[DataType, int]) -> None:
    tid, value = case
    encoded = encode_typed(Typed(tid, value))
    assert decode_typed_with_type(encoded) == (tid, value, len(encoded))


@given(st.binary(max_size=64))
@settings(max_examples=200)
def test_surrogateescape_string_round_trip(raw: bytes) -> None:
    encoded = encode_typed(Typed(DataType.STRING, raw))
    text, _ = decode_typed(encoded)
    assert isinstance(text, str)
    assert encode_typed(text) == encoded
