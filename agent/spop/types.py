"""SPOP primitive encodings: varints, raw strings and typed data.

These are pure functions over bytes-like objects so they can be unit- and
property-tested in isolation and reused by the frame layer.  Decoders take
``(data, offset)`` and return ``(value, new_offset)`` instead of slicing, which
lets the frame decoder walk one buffer without copying it.  Every malformed
input surfaces as `ProtocolError(Status.INVALID_FRAME)`; encoders reject values
that cannot be represented with `LocalProtocolError`, because handing them one
is a bug in our own code.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from .errors import LocalProtocolError, ProtocolError, Status

__all__ = [
    "DataType",
    "Scope",
    "Typed",
    "MAX_VARINT_BYTES",
    "encode_varint",
    "decode_varint",
    "encode_string",
    "decode_string",
    "encode_typed",
    "decode_typed",
    "decode_typed_with_type",
]


class DataType(IntEnum):
    """Type ids carried in the low nibble of a typed-data type byte."""

    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


class Scope(IntEnum):
    """Variable scopes of set-var / unset-var actions (proc, sess, txn, req, res)."""

    PROCESS = 0
    SESSION = 1
    TRANSACTION = 2
    REQUEST = 3
    RESPONSE = 4


@dataclass(frozen=True, slots=True)
class Typed:
    """Forces the wire type of a value.

    Plain Python values map to one default type (int -> INT64, str -> STRING...);
    wrap a value in `Typed` when HAProxy must see another one, e.g. an UINT32 or
    a STRING built from bytes.
    """

    type: DataType
    #: ``Any``, not ``object``: mypyc (see setup.py) looks the annotation of a dataclass field
    #: up in the module's globals at import, where the builtin ``object`` is not.
    value: Any


#: A varint of a 64-bit value never needs more than 10 bytes; anything longer
#: is garbage and is rejected instead of growing an unbounded Python int.
MAX_VARINT_BYTES: Final = 10

_U64_MAX: Final = (1 << 64) - 1
_U32_MAX: Final = (1 << 32) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_I32_MIN: Final = -(1 << 31)
_I32_MAX: Final = (1 << 31) - 1

_FLAG_TRUE: Final = 0x10

# One-byte varints are by far the most common (ids, lengths of short strings):
# a lookup table turns their encoding into an index.
_SMALL: Final[tuple[bytes, ...]] = tuple(bytes((i,)) for i in range(240))

_T_NULL: Final = b"\x00"
_T_TRUE: Final = bytes((DataType.BOOL | _FLAG_TRUE,))
_T_FALSE: Final = bytes((DataType.BOOL,))


def _invalid(reason: str) -> ProtocolError:
    return ProtocolError(Status.INVALID_FRAME, reason)


def encode_varint(value: int) -> bytes:
    """Encode an unsigned 64-bit integer with HAProxy's "peers" varint scheme."""
    if 0 <= value < 240:
        return _SMALL[value]
    if value < 0 or value > _U64_MAX:
        raise LocalProtocolError(f"varint out of range: {value}")
    out = bytearray(((value | 0xF0) & 0xFF,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value | 0x80) & 0xFF)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode a varint at `offset`; return ``(value, offset_after)``.

    Mirrors HAProxy's decoder: continuation bytes are added *unmasked* at
    growing shifts (the encoder subtracted 128 to compensate).
    """
    try:
        value = data[offset]
    except IndexError:
        raise _invalid("truncated varint") from None
    offset += 1
    if value < 240:
        return value, offset
    shift = 4
    for _ in range(MAX_VARINT_BYTES - 1):
        try:
            byte = data[offset]
        except IndexError:
            raise _invalid("truncated varint") from None
        offset += 1
        value += byte << shift
        if byte < 128:
            if value > _U64_MAX:
                raise _invalid("varint exceeds 64 bits")
            return value, offset
        shift += 7
    raise _invalid(f"varint longer than {MAX_VARINT_BYTES} bytes")


def encode_string(value: str | bytes) -> bytes:
    """Encode an untyped string (varint length + bytes), as used for names.

    Message names, argument names, KV keys and variable names carry no type
    byte on the wire, unlike STRING values.
    """
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    n = len(raw)
    if n < 240:
        return _SMALL[n] + raw
    return encode_varint(n) + raw


def _read_bytes(data: bytes | bytearray | memoryview, offset: int) -> tuple[bytes | bytearray | memoryview, int]:
    n = data[offset] if offset < len(data) else -1
    if 0 <= n < 240:
        offset += 1
    else:
        n, offset = decode_varint(data, offset)
    end = offset + n
    raw = data[offset:end]
    if len(raw) != n:
        raise _invalid("truncated string")
    return raw, end


def decode_string(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[str, int]:
    """Decode an untyped string; bad UTF-8 is kept via surrogateescape, never raised."""
    raw, offset = _read_bytes(data, offset)
    return str(raw, "utf-8", "surrogateescape"), offset


def _encode_int(tid: DataType, value: int) -> bytes:
    return _SMALL[tid] + encode_varint(value & _U64_MAX)


def _forced(tid: DataType, value: object) -> bytes:
    """Encode `value` as exactly `tid`, validating that it fits."""
    try:
        if tid is DataType.NULL:
            if value is not None:
                raise LocalProtocolError("NULL carries no value")
            return _T_NULL
        if tid is DataType.BOOL:
            if not isinstance(value, int) or value not in (0, 1):
                raise LocalProtocolError(f"not a boolean: {value!r}")
            return _T_TRUE if value else _T_FALSE
        if tid in (DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64):
            if not isinstance(value, int) or isinstance(value, bool):
                raise LocalProtocolError(f"{tid.name} needs an int, got {value!r}")
            lo, hi = {
                DataType.INT32: (_I32_MIN, _I32_MAX),
                DataType.UINT32: (0, _U32_MAX),
                DataType.INT64: (_I64_MIN, _I64_MAX),
                DataType.UINT64: (0, _U64_MAX),
            }[tid]
            if not lo <= value <= hi:
                raise LocalProtocolError(f"{value} out of {tid.name} range")
            # HAProxy casts every integer to uint64 before varint-encoding it,
            # so negative values travel as their 64-bit two's complement.
            return _encode_int(tid, value)
        if tid is DataType.IPV4:
            return _SMALL[tid] + ipaddress.IPv4Address(value).packed
        if tid is DataType.IPV6:
            return _SMALL[tid] + ipaddress.IPv6Address(value).packed
        if tid in (DataType.STRING, DataType.BINARY):
            if isinstance(value, str):
                raw = value.encode("utf-8", "surrogateescape")
            elif isinstance(value, (bytes, bytearray, memoryview)):
                raw = bytes(value)
            else:
                raise LocalProtocolError(f"{tid.name} needs str or bytes, got {type(value).__name__}")
            return _SMALL[tid] + encode_varint(len(raw)) + raw
    except ValueError as exc:  # ipaddress rejects the value
        raise LocalProtocolError(str(exc)) from None
    raise LocalProtocolError(f"unknown data type {tid!r}")  # pragma: no cover - DataType is closed


def encode_typed(value: object) -> bytes:
    """Encode a Python value as SPOP typed data (type byte + payload).

    str and bytes are tested first with exact type checks because they are
    what the agent sends on the hot ACK path.
    """
    t = type(value)
    if t is str:
        raw: bytes = value.encode("utf-8", "surrogateescape")  # type: ignore[attr-defined]
        n = len(raw)
        if n < 240:
            return b"\x08" + _SMALL[n] + raw
        return b"\x08" + encode_varint(n) + raw
    if t is bytes:
        n = len(value)  # type: ignore[arg-type]
        if n < 240:
            return b"\x09" + _SMALL[n] + value  # type: ignore[operator]
        return b"\x09" + encode_varint(n) + value  # type: ignore[operator]
    if value is None:
        return _T_NULL
    if t is bool:
        return _T_TRUE if value else _T_FALSE
    if isinstance(value, Typed):
        return _forced(DataType(value.type), value.value)
    if isinstance(value, bool):  # pragma: no cover - bool cannot be subclassed
        return _T_TRUE if value else _T_FALSE
    if isinstance(value, int):
        if _I64_MIN <= value <= _I64_MAX:
            return _encode_int(DataType.INT64, value)
        if _I64_MAX < value <= _U64_MAX:
            return _encode_int(DataType.UINT64, value)
        raise LocalProtocolError(f"integer does not fit in 64 bits: {value}")
    if isinstance(value, ipaddress.IPv4Address):
        return _forced(DataType.IPV4, value)
    if isinstance(value, ipaddress.IPv6Address):
        return _forced(DataType.IPV6, value)
    if isinstance(value, str):
        return _forced(DataType.STRING, value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _forced(DataType.BINARY, value)
    raise LocalProtocolError(f"cannot encode {t.__name__} as SPOP typed data")


def decode_typed_with_type(
    data: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[DataType, object, int]:
    """Decode typed data and also return its wire type.

    The HELLO parser needs the type (max-frame-size must be an integer,
    supported-versions a STRING...), which the plain Python value loses.
    """
    try:
        tbyte = data[offset]
    except IndexError:
        raise _invalid("truncated typed data") from None
    offset += 1
    tid = tbyte & 0x0F
    if tid == 8 or tid == 9:
        raw, offset = _read_bytes(data, offset)
        if tid == 8:
            return DataType.STRING, str(raw, "utf-8", "surrogateescape"), offset
        return DataType.BINARY, bytes(raw), offset
    if tid == 0:
        return DataType.NULL, None, offset
    if tid == 1:
        return DataType.BOOL, bool(tbyte & _FLAG_TRUE), offset
    if tid <= 5:
        u, offset = decode_varint(data, offset)
        if tid == 2:  # INT32
            # HAProxy sends the sign-extended 64-bit form; tolerate the plain
            # 32-bit two's complement too.  Anything else is not an int32.
            if u <= _U32_MAX:
                v = u - (1 << 32) if u > _I32_MAX else u
            elif u >= (1 << 64) + _I32_MIN:
                v = u - (1 << 64)
            else:
                raise _invalid(f"INT32 value out of range: {u}")
            return DataType.INT32, v, offset
        if tid == 3:
            if u > _U32_MAX:
                raise _invalid(f"UINT32 value out of range: {u}")
            return DataType.UINT32, u, offset
        if tid == 4:
            return DataType.INT64, (u - (1 << 64) if u > _I64_MAX else u), offset
        return DataType.UINT64, u, offset
    if tid == 6 or tid == 7:
        size = 4 if tid == 6 else 16
        raw = data[offset : offset + size]
        if len(raw) != size:
            raise _invalid("truncated IP address")
        packed = bytes(raw)
        if tid == 6:
            return DataType.IPV4, ipaddress.IPv4Address(packed), offset + size
        return DataType.IPV6, ipaddress.IPv6Address(packed), offset + size
    raise _invalid(f"unknown data type {tid}")


def decode_typed(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[object, int]:
    """Decode typed data at `offset`; return ``(python_value, offset_after)``."""
    _, value, offset = decode_typed_with_type(data, offset)
    return value, offset
