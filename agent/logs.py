"""Logging set-up and rate limiting for the agent.

The agent is a long-lived daemon in the connect path: its failure modes
(Redis unreachable, a broker flapping, a peer sending malformed SPOP frames)
repeat thousands of times per second. Logging every occurrence would fill
disks and hide the first, useful, message, so repeated conditions go through
one helper, :class:`RateLimiter` (and :func:`warn_limited`, its shared
instance): the first occurrence per key is logged, then at most one line per
interval carrying the number of repeats suppressed in between.

Structured context is passed as ``extra={"fields": {...}}``; the JSON
format emits those fields as top-level keys, the text format appends them
as ``key=value``.

With ``workers`` > 1 every record also says which process wrote it: :func:`set_process_fields`
adds ``worker`` (the worker's index, always an integer) and ``pid`` to each line, in both
formats; the supervisor's own lines carry ``process=supervisor`` instead of ``worker``. A
single-process agent (``workers: 1``) logs exactly as before, without them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

__all__ = [
    "JsonFormatter",
    "RateLimiter",
    "TextFormatter",
    "reset_rate_limits",
    "set_process_fields",
    "setup_logging",
    "warn_limited",
]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Keys the JSON formatter owns; colliding extra fields get a trailing "_"
# rather than silently replacing the message or timestamp.
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})


def _timestamp(record: logging.LogRecord) -> str:
    dt = datetime.fromtimestamp(record.created, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


#: Fields of every record of this process (see set_process_fields); empty in a single agent.
_process_fields: dict[str, Any] = {}


def set_process_fields(**fields: Any) -> None:
    """Fields every record of this process carries from now on (``worker=1, pid=4242``)."""
    _process_fields.clear()
    _process_fields.update(fields)


def _fields_of(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    own = fields if isinstance(fields, Mapping) else {}
    if _process_fields:
        return {**_process_fields, **own}
    return own


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers that parse structure."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields_of(record).items():
            key = str(key)
            obj[key + "_" if key in _RESERVED else key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        # default=str: a field that happens to be an IP address or a Path
        # must never turn a log call into an exception.
        return json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":"))


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """Human-readable single line (plus traceback), fields as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = _fields_of(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def setup_logging(
    level: str, fmt: Literal["text", "json"], stream: TextIO | None = None
) -> None:
    """Route all logging to stderr (or ``stream``) in the configured format.

    Safe to call again on a SIGHUP reload: it replaces the handler it
    installed before instead of stacking a second one, and leaves handlers
    installed by others (e.g. pytest's capture) alone.
    """
    try:
        numeric = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}") from None
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    elif fmt == "text":
        formatter = TextFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r}; expected 'text' or 'json'")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mqtt_affinity", False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._mqtt_affinity = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(numeric)


class _Entry:
    __slots__ = ("last", "suppressed")

    def __init__(self, last: float) -> None:
        self.last = last
        self.suppressed = 0


class RateLimiter:
    """Log a recurring condition once per interval per key: the project's one rate-limited logger.

    ``key`` names the *condition* (``"redis-down"``, ``"protocol-error-4"``), not the message
    text, so messages that differ only in details collapse; keys are scoped per logger name.
    At most ``max_keys`` keys are remembered (least recently logged evicted), so keys derived
    from peer data cannot grow memory without bound. ``clock`` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 4096) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        # The agent is asyncio, but redis-py and the interpreter may log from threads.
        self._lock = threading.Lock()

    def log(
        self,
        logger: logging.Logger,
        key: str,
        msg: str,
        *args: object,
        interval: float = 10.0,
        level: int = logging.WARNING,
        fields: Mapping[str, Any] | None = None,
        exc_info: Any = None,
    ) -> bool:
        """Log unless suppressed; returns whether a line was emitted."""
        return self._emit(logger, level, key, msg, args, interval, fields, exc_info, stacklevel=3)

    def _emit(
        self,
        logger: logging.Logger,
        level: int,
        key: str,
        msg: str,
        args: tuple[object, ...],
        interval: float,
        fields: Mapping[str, Any] | None,
        exc_info: Any,
        *,
        stacklevel: int,
    ) -> bool:
        if not logger.isEnabledFor(level):
            return False
        now = self.clock()
        full_key = (logger.name, key)
        with self._lock:
            entry = self._entries.get(full_key)
            if entry is None:
                self._entries[full_key] = _Entry(now)
                if len(self._entries) > self.max_keys:
                    self._entries.popitem(last=False)
                suppressed = 0
            elif now - entry.last >= interval:
                suppressed = entry.suppressed
                entry.last = now
                entry.suppressed = 0
                self._entries.move_to_end(full_key)
            else:
                entry.suppressed += 1
                return False
        extra_fields = dict(fields) if fields else {}
        if suppressed:
            if not args:
                # Adding args switches on %-formatting; keep literal % intact.
                msg = msg.replace("%", "%%")
            msg = msg + " (%d similar suppressed)"
            args = (*args, suppressed)
            extra_fields["suppressed"] = suppressed
        # stacklevel attributes the record (funcName, lineno) to the code that hit the
        # condition rather than to this module.
        logger.log(
            level, msg, *args, extra={"fields": extra_fields} if extra_fields else None,
            exc_info=exc_info, stacklevel=stacklevel,
        )
        return True

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()


_default = RateLimiter()


def warn_limited(
    logger: logging.Logger,
    key: str,
    msg: str,
    *args: object,
    interval: float = 10.0,
    level: int = logging.WARNING,
    fields: Mapping[str, Any] | None = None,
    exc_info: Any = None,
) -> bool:
    """The process-wide :class:`RateLimiter`. Returns whether a line was emitted."""
    # Frames: _emit(1) <- warn_limited(2) <- caller(3).
    return _default._emit(logger, level, key, msg, args, interval, fields, exc_info, stacklevel=3)


def reset_rate_limits() -> None:
    """Forget all keys of :func:`warn_limited` (tests)."""
    _default.reset()
