"""Terminal output and checks for scripts/demo.py: what the demo shows and how it judges it.

The processes, the stack and the MQTT clients are the ``devstack`` package (shared with the
tests and the benchmarks); this module only prints and checks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from devstack import wait_until

T = TypeVar("T")


class DemoError(Exception):
    """A step's expectation failed, or the stack could not be built. Exit status 1."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM: unwind through every ``finally`` and tear the stack down."""


# --------------------------------------------------------------------------- output


class Out:
    """Headings, explanations, checks and indented command output; colour only on a TTY."""

    def __init__(self, colour: bool | None = None) -> None:
        if colour is None:
            colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self.colour = colour
        enc = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
        self.tick = "✓" if enc.startswith("utf") else "ok"
        self.cross = "✗" if enc.startswith("utf") else "FAIL"

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def bold(self, text: str) -> str:
        return self._c("1", text)

    def dim(self, text: str) -> str:
        return self._c("2", text)

    def green(self, text: str) -> str:
        return self._c("32", text)

    def red(self, text: str) -> str:
        return self._c("31", text)

    def cyan(self, text: str) -> str:
        return self._c("36", text)

    def yellow(self, text: str) -> str:
        return self._c("33", text)

    def print(self, text: str = "") -> None:
        print(text, flush=True)

    def title(self, text: str) -> None:
        bar = "=" * len(text)
        self.print(self.bold(bar))
        self.print(self.bold(text))
        self.print(self.bold(bar))

    def step(self, number: int | str, title: str, *explain: str) -> None:
        self.print()
        self.print(self.bold(self.cyan(f"{number}. {title}")))
        for line in explain:
            self.print("   " + self.dim(line))

    def info(self, text: str) -> None:
        self.print("   " + text)

    def ok(self, text: str) -> None:
        self.print("   " + self.green(self.tick) + " " + text)

    def fail(self, text: str) -> None:
        self.print("   " + self.red(self.cross) + " " + text)

    def command(self, shown: str, output: str) -> None:
        self.print("   " + self.yellow("$ " + shown))
        for line in output.rstrip("\n").splitlines():
            self.print("     " + line)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(h), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        self.print("   " + self.bold("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()))
        for r in rows:
            self.print("   " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def expect(condition: object, what: str, out: Out, detail: str | Callable[[], str] = "") -> None:
    """Print a check mark for a met expectation, or raise DemoError saying what was seen."""
    if condition:
        out.ok(what)
        return
    text = detail() if callable(detail) else detail
    out.fail(what)
    raise DemoError(f"expected: {what}" + (f"\n  observed: {text}" if text else ""))


# --------------------------------------------------------------------------- small helpers


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until truthy; DemoError naming ``what`` after ``timeout`` seconds."""
    try:
        return wait_until(predicate, timeout=timeout, interval=interval)
    except TimeoutError:
        extra = ("\n" + detail()) if detail else ""
        raise DemoError(f"timed out after {timeout:g}s waiting for {what}{extra}") from None


def tail(text: str, lines: int = 25) -> str:
    """The last ``lines`` lines of a log, indented."""
    return "\n".join(f"    | {line}" for line in text.splitlines()[-lines:]) or "    | (empty)"


def rel(path: Path | str) -> str:
    """A path relative to the current directory when it is inside it (shorter to read)."""
    p = Path(path)
    cwd = Path.cwd()
    if cwd == Path(cwd.anchor):  # from "/", "tmp/x" would read like a relative path: keep it absolute
        return str(p)
    try:
        return str(p.relative_to(cwd))
    except ValueError:
        return str(p)
