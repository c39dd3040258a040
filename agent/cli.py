"""The ``mqtt-affinity`` command.

Exit status is part of the contract: 0 success, 1 the thing asked about does
not exist (or the agent could not start), 2 bad usage or a bad config, each
with one line on stderr that says what is wrong.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import ConfigError

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqtt-affinity", description="Sticky MQTT sessions for HAProxy, decided in Redis.")
    parser.add_argument("--version", action="version", version=f"mqtt-affinity {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the SPOE agent in the foreground")
    run.add_argument("--config", required=True, type=Path, help="agent YAML config")
    try:
        from agent import admin
    except ImportError:  # pragma: no cover - admin commands ship with the package
        admin = None  # type: ignore[assignment]
    if admin is not None:
        admin.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        from agent.app import run

        try:
            return run(args.config)
        except ConfigError as exc:
            print(f"mqtt-affinity: config error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            return EXIT_OK
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
