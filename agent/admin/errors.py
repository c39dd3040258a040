"""Expected failures -> exit status and one line on stderr, in one place.

Every ``mqtt-affinity`` command, the agent's ``run`` included, ends an expected failure
through :func:`failure`: the status comes from :class:`agent.model.ExitCode`, the message is
one line and never holds the Redis password. Anything :func:`failure` does not know is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
from urllib.parse import unquote, urlsplit

import redis

from agent.config import ConfigError
from agent.endpoint import EndpointError, redact_url
from agent.model import ExitCode

__all__ = ["PROG", "CommandError", "failure", "report"]

PROG = "mqtt-affinity"


class CommandError(Exception):
    """An expected failure a command detected itself: ``status`` and a one-line message."""

    def __init__(self, status: ExitCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = one_line(message)


def one_line(text: str) -> str:
    return " ".join(text.split())


def scrub(text: str, url: str | None) -> str:
    """Remove the URL's password from an error text, in case a library echoed it."""
    if not url:
        return text
    try:
        pw = urlsplit(url).password
    except ValueError:
        pw = None
    if pw:
        text = text.replace(pw, "***").replace(unquote(pw), "***")
    return text


def failure(exc: BaseException, url: str | None = None) -> tuple[ExitCode, str] | None:
    """The exit status and stderr line for an expected failure; None for anything else.

    ``url`` is the Redis URL in use, if any: it is named (redacted) in Redis errors.
    """
    shown = redact_url(url) if url else "?"
    if isinstance(exc, CommandError):
        return exc.status, exc.message
    if isinstance(exc, ConfigError):
        return ExitCode.USAGE, one_line(f"config error: {exc}")
    if isinstance(exc, EndpointError):
        return ExitCode.USAGE, one_line(f"invalid Redis URL {shown}: {scrub(str(exc), url)}")
    # AuthenticationError is a ConnectionError: Redis is there, but not for us.
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return ExitCode.NOT_FOUND, one_line(f"cannot reach Redis at {shown}: {scrub(str(exc), url)}")
    if isinstance(exc, redis.RedisError):
        return ExitCode.NOT_FOUND, one_line(f"Redis error at {shown}: {scrub(str(exc), url)}")
    return None


def report(status: ExitCode, message: str) -> int:
    """Print ``mqtt-affinity: <message>`` on stderr; the status to exit with."""
    print(f"{PROG}: {message}", file=sys.stderr)
    return int(status)
