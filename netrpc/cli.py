"""
The ``netrpc`` command: ``netrpc certs ...`` and ``netrpc call ...``.

Each subcommand lives in its own module, which adds its parser with
``register(subparsers)`` and sets ``handler`` to a function that takes the
parsed arguments and returns an exit status. Errors the user can fix arrive
here as ``NetrpcError`` and leave as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from netrpc import __version__, call_cli, certs_cli
from netrpc.exceptions import NetrpcError

# Exit status for an error in the user's input (argparse uses 2 as well).
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="netrpc",
        description="JSON-RPC 2.0 over netstrings in mutual TLS: "
        "certificate tool and command-line client.",
    )
    parser.add_argument("--version", action="version", version=f"netrpc {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    certs_cli.register(subparsers)
    call_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``netrpc`` command and return its exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)

    try:
        status: int = arguments.handler(arguments)
    except NetrpcError as error:
        print(f"netrpc: error: {error}", file=sys.stderr)
        return getattr(error, "exit_status", 1)
    except KeyboardInterrupt:
        print("netrpc: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
