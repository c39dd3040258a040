"""The ``mqtt-affinity`` command.

Exit status is part of the contract (:class:`agent.model.ExitCode`): 0 success, 1 the thing
asked about does not exist (or the agent could not start), 2 bad usage or a bad config, each
with one line on stderr that says what is wrong (:func:`agent.admin.errors.failure`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from agent import __version__, admin
from agent.admin.errors import failure, report
from agent.config import ConfigError
from agent.model import ExitCode


def _build() -> str:
    """Whether this install runs the hot modules compiled with mypyc (setup.py) or as Python."""
    from agent.spop import frames

    return "pure Python" if (frames.__file__ or "").endswith(".py") else "hot path compiled with mypyc"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, status 2
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqtt-affinity", description="Sticky MQTT sessions for HAProxy, decided in Redis.")
    parser.add_argument("--version", action="version", version=f"mqtt-affinity {__version__} ({_build()})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the SPOE agent in the foreground")
    run.add_argument("--config", required=True, type=Path, help="agent YAML config")
    # Set by the supervisor of `workers` > 1 for each worker it starts (agent/workers.py).
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--worker-http", default=None, help=argparse.SUPPRESS)
    run.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    admin.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        from agent.app import run
        from agent.workers import WorkerRole

        worker = None
        role = (args.worker_index, args.worker_http, args.worker_config)
        if any(v is not None for v in role):
            if args.worker_index is None or args.worker_http is None or args.worker_config is None:
                parser.error("--worker-index, --worker-http and --worker-config go together")
            worker = WorkerRole(args.worker_index, args.worker_http, args.worker_config)
        try:
            return run(args.config, worker)
        except ConfigError as exc:
            known = failure(exc)  # status 2, one line
            assert known is not None
            return report(*known)
        except KeyboardInterrupt:
            return ExitCode.OK
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
