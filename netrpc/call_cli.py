"""
``netrpc call``: call a method on a netrpc server and print its result.

The work happens in ``netrpc.blocking``. This module turns options and
environment variables into the client's arguments, each PARAM into a JSON
value, and each kind of failure into its own exit status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netrpc.blocking import DEFAULT_TIMEOUT, Client
from netrpc.certs import PKI
from netrpc.exceptions import (
    CallTimeout,
    ConfigurationError,
    ConnectionFailed,
    NetrpcError,
    RemoteError,
    RemoteProtocolError,
)
from netrpc.passphrase import PASSPHRASE_VARIABLE, unlock_key

# Exit statuses, one per kind of failure, so that scripts can tell them apart.
EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_CONNECTION = 4
EXIT_PROTOCOL = 5

# Environment variables that give defaults for options, so that a shell
# session sets them once.
ENVIRONMENT_DEFAULTS = {
    "server": "NETRPC_SERVER",
    "cert": "NETRPC_CERT",
    "key": "NETRPC_KEY",
    "ca": "NETRPC_CA",
    "pki": "NETRPC_PKI",
    "name": "NETRPC_NAME",
}

DESCRIPTION = """\
Call METHOD on a netrpc server over mutual TLS and print its result as JSON
on standard output. Each PARAM is parsed as JSON when it parses and taken as
a string otherwise, so 6 is a number, '"6"' and six are strings and
'{"a": 1}' is an object. An RPC error goes to standard error with its code
and message.
"""

EPILOG = f"""\
certificate files:
  Give --cert, --key and --ca, or --pki DIR --name NAME for the layout that
  'netrpc certs' makes: DIR/clients/NAME.crt, DIR/clients/NAME.key and
  DIR/server-ca.crt. A file given by itself wins over the --pki layout.

several servers:
  Give --server more than once (or NETRPC_SERVER as HOST:PORT,HOST:PORT).
  The first server is tried first and the others in the order given when
  it cannot be reached, all within --timeout. A call whose connection is
  lost after it was sent is sent again to the next server only with
  --idempotent, because the lost server may have run it.

environment:
  {', '.join(ENVIRONMENT_DEFAULTS.values())}
  give the defaults of --server, --cert, --key, --ca, --pki and --name;
  options on the command line win over them. An encrypted key's passphrase
  comes from --passphrase-file, else {PASSPHRASE_VARIABLE}, else a prompt
  when standard input is a terminal.

batch file (--batch):
  One call per line: a JSON array ["method", param, ...] with positional
  params, or a JSON object {{"method": "name", "params": [...] or {{...}}}}.
  Blank lines and lines starting with # are skipped. The calls go in one
  JSON-RPC batch, and each prints one line in order: {{"result": ...}} or
  {{"error": {{"code": ..., "message": ..., "data": ...}}}}.

exit status:
  {EXIT_OK}  the call succeeded, or the notification was sent
  {EXIT_RPC_ERROR}  the server replied with an RPC error (in a batch: for at least one call)
  {EXIT_USAGE}  usage error: invalid option, missing or unusable file, wrong passphrase
  {EXIT_TIMEOUT}  the call timed out
  {EXIT_CONNECTION}  no server could be reached, the connection was lost, or TLS verification
     failed on either side
  {EXIT_PROTOCOL}  the server's reply broke netstring framing or JSON-RPC 2.0

examples:
  netrpc call --server localhost:8700 --pki certs/dev --name demo multiply 6 7
  netrpc call --server rpc1:8700 --server rpc2:8700 --idempotent system.health
  netrpc call system.listMethods
  netrpc call --params '{{"value": "hi"}}' echo
"""


class UsageError(ConfigurationError):
    """The command line, or a file it names, is invalid."""


@dataclass(frozen=True)
class Settings:
    """Connection settings, resolved from options and the environment."""

    host: str
    port: int
    failover: tuple[tuple[str, int], ...]
    cert: Path
    key: Path
    ca: Path
    server_name: str | None
    timeout: float
    passphrase_file: Path | None
    idempotent: bool = False


def register(subparsers: Any) -> None:
    """Add the ``call`` subcommand to the ``netrpc`` parser."""
    parser = subparsers.add_parser(
        "call",
        help="call a method on a netrpc server and print its result",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        action="append",
        help="address of the server; repeat it to add failover servers, tried in order "
        "[env NETRPC_SERVER, comma-separated]",
    )
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="DNS name or IP address the server's certificate must carry [default: HOST]",
    )

    parser.add_argument("--cert", metavar="FILE", help="client certificate, PEM [env NETRPC_CERT]")
    parser.add_argument("--key", metavar="FILE", help="client private key, PEM [env NETRPC_KEY]")
    parser.add_argument(
        "--ca", metavar="FILE", help="server CA certificate, the only CA trusted [env NETRPC_CA]"
    )
    parser.add_argument(
        "--pki", metavar="DIR", help="PKI directory made by 'netrpc certs' [env NETRPC_PKI]"
    )
    parser.add_argument(
        "--name", metavar="NAME", help="client name in the --pki directory [env NETRPC_NAME]"
    )
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="file holding the client key's passphrase, mode 0600 or stricter",
    )

    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        help="deadline of the whole call, connecting included [default: %(default)g]",
    )
    parser.add_argument(
        "--notify",
        action="store_true",
        help="send a notification: the server runs METHOD and sends no reply",
    )
    parser.add_argument(
        "--idempotent",
        action="store_true",
        help="the call may run twice: after a lost connection, send it again to the next server",
    )
    parser.add_argument(
        "--params",
        metavar="JSON",
        help="all params as one JSON object (named params) or array, instead of PARAMs",
    )
    parser.add_argument(
        "--batch",
        metavar="FILE",
        help="send the calls listed in FILE (- for standard input) as one batch",
    )

    parser.add_argument("method", metavar="METHOD", nargs="?", help="name of the method to call")
    parser.add_argument("params_list", metavar="PARAM", nargs="*", help="positional param")
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    """Make the call that ``arguments`` describe, print the outcome, return the exit status."""
    try:
        settings = resolve_settings(arguments, os.environ)
        if arguments.batch is not None:
            return _run_batch(arguments, settings)
        return _run_single(arguments, settings)
    except NetrpcError as error:
        _print_error(str(error))
        return exit_status_for(error)


def exit_status_for(error: NetrpcError) -> int:
    """Return the documented exit status for ``error``."""
    if isinstance(error, RemoteError):
        return EXIT_RPC_ERROR
    if isinstance(error, CallTimeout):
        return EXIT_TIMEOUT
    if isinstance(error, ConnectionFailed):
        return EXIT_CONNECTION
    if isinstance(error, RemoteProtocolError):
        return EXIT_PROTOCOL
    return EXIT_USAGE


# --- Options ---------------------------------------------------------------


def resolve_settings(arguments: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """
    Combine options and environment variables into ``Settings``.

    The command line wins over the environment. On each side a file given
    by itself wins over the one the PKI layout names.
    """
    (host, port), *failover = _servers(arguments, environ)
    cert, key, ca = _certificate_files(arguments, environ)
    passphrase_file = None if arguments.passphrase_file is None else Path(arguments.passphrase_file)
    return Settings(
        host,
        port,
        tuple(failover),
        cert,
        key,
        ca,
        arguments.server_name,
        arguments.timeout,
        passphrase_file,
        arguments.idempotent,
    )


def _servers(arguments: argparse.Namespace, environ: Mapping[str, str]) -> list[tuple[str, int]]:
    """Return the servers of the --server options, else of NETRPC_SERVER, the primary first."""
    texts = arguments.server or environ.get(ENVIRONMENT_DEFAULTS["server"], "").split(",")
    texts = [text.strip() for text in texts if text.strip()]
    if not texts:
        raise UsageError(
            "no server given; pass --server HOST:PORT or set NETRPC_SERVER"
        )
    return [parse_server(text) for text in texts]


def parse_server(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[ADDRESS]:PORT`` for IPv6) into host and port."""
    host, separator, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(
            f"server {text!r} is invalid; give HOST:PORT with a port from 1 to 65535, "
            "such as localhost:8700 or [::1]:8700"
        )
    return host, int(port_text)


def _option(arguments: argparse.Namespace, environ: Mapping[str, str], name: str) -> str | None:
    value = getattr(arguments, name)
    if value:
        return str(value)
    return environ.get(ENVIRONMENT_DEFAULTS[name]) or None


def _certificate_files(
    arguments: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[Path, Path, Path]:
    """
    Find the certificate, key and server CA files. In order: the file
    option, the PKI layout when --pki or --name is on the command line, the
    file's environment variable, then the PKI layout from the environment.
    """
    layout = _pki_files(_option(arguments, environ, "pki"), _option(arguments, environ, "name"))
    layout_on_command_line = bool(arguments.pki or arguments.name)

    found: list[Path] = []
    for index, name in enumerate(("cert", "key", "ca")):
        from_layout = layout[index] if layout else None
        candidates = (
            getattr(arguments, name),
            from_layout if layout_on_command_line else None,
            environ.get(ENVIRONMENT_DEFAULTS[name]) or None,
            from_layout,
        )
        path = next((candidate for candidate in candidates if candidate), None)
        if path is None:
            raise UsageError(
                f"no --{name} file given; pass --cert, --key and --ca, or --pki DIR "
                "--name NAME for a directory made by 'netrpc certs'"
            )
        if path is from_layout and not from_layout.exists():
            directory = _option(arguments, environ, "pki")
            client = _option(arguments, environ, "name")
            raise UsageError(
                f"{str(from_layout)!r} is missing, so PKI {directory!r} has no complete "
                f"client {client!r}; issue one with 'netrpc certs issue {directory} {client}'"
            )
        found.append(Path(path))
    return found[0], found[1], found[2]


def _pki_files(directory: str | None, name: str | None) -> tuple[Path, Path, Path] | None:
    """Return the client's files in the PKI layout, or None without a PKI directory and name."""
    if directory is None and name is None:
        return None
    if directory is None:
        raise UsageError("--name needs --pki DIR (or NETRPC_PKI) as well; give both, or neither")
    if name is None:
        raise UsageError("--pki needs --name NAME (or NETRPC_NAME) as well; give both, or neither")
    pki = PKI(directory)
    return pki.client_cert(name), pki.client_key(name), pki.server_ca_cert


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; give a positive number of seconds")
    return seconds


# --- Params ----------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a double-precision float")
    return value


# Python's json accepts NaN and Infinity and turns 1e999 into infinity;
# none of them can be sent, so such a PARAM stays a string.
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_param(text: str) -> Any:
    """Return ``text`` parsed as JSON when it parses, else ``text`` itself."""
    try:
        return _STRICT_JSON.decode(text)
    except ValueError:
        return text


def _params_from(arguments: argparse.Namespace) -> list[Any] | dict[str, Any]:
    if arguments.params is None:
        return [parse_param(text) for text in arguments.params_list]
    if arguments.params_list:
        raise UsageError("give params either as PARAMs or with --params, not both")
    try:
        params = _STRICT_JSON.decode(arguments.params)
    except ValueError as error:
        raise UsageError(f"--params {arguments.params!r} is not valid JSON: {error}") from None
    if not isinstance(params, (dict, list)):
        raise UsageError(
            f"--params {arguments.params!r} is invalid; give a JSON object for named "
            "params or an array for positional ones"
        )
    return params


# --- Running ---------------------------------------------------------------


def _client(settings: Settings) -> Client:
    passphrase = unlock_key(
        settings.key, passphrase_file=settings.passphrase_file, hint="pass --passphrase-file FILE"
    )
    return Client(
        settings.host,
        settings.port,
        failover=settings.failover,
        # A single command tries the servers in the order given, rather than
        # starting at a random one to spread many clients across them.
        random=lambda: 0.0,
        cert=settings.cert,
        key=settings.key,
        ca=settings.ca,
        server_name=settings.server_name,
        timeout=settings.timeout,
        passphrase=passphrase,
    )


def _run_single(arguments: argparse.Namespace, settings: Settings) -> int:
    if arguments.method is None:
        raise UsageError("no METHOD given; name the method to call, or pass --batch FILE")
    params = _params_from(arguments)
    if arguments.notify and settings.idempotent:
        raise UsageError("--idempotent cannot be combined with --notify, which gets no reply to wait for")

    with _client(settings) as client:
        if arguments.notify:
            client.send_notification(arguments.method, params)
            return EXIT_OK
        try:
            result = client.request(arguments.method, params, idempotent=settings.idempotent)
        except RemoteError as error:
            _print_error(f"{arguments.method!r} failed: {error}")
            return EXIT_RPC_ERROR
    print(json.dumps(result))
    return EXIT_OK


def _run_batch(arguments: argparse.Namespace, settings: Settings) -> int:
    if arguments.method is not None or arguments.params is not None:
        raise UsageError("--batch takes its calls from the file; give no METHOD, PARAM or --params")
    if arguments.notify:
        raise UsageError("--notify cannot be combined with --batch")
    numbered_calls = read_batch(arguments.batch)

    with _client(settings) as client:
        values = client.batch(
            [call for _, call in numbered_calls], idempotent=settings.idempotent
        )
    for value in values:
        if isinstance(value, RemoteProtocolError):
            raise value

    status = EXIT_OK
    for (line_number, (method, _)), value in zip(numbered_calls, values):
        if isinstance(value, RemoteError):
            _print_error(f"line {line_number}: {method!r} failed: {value}")
            print(json.dumps({"error": _error_object(value)}))
            status = EXIT_RPC_ERROR
        else:
            print(json.dumps({"result": value}))
    return status


def _error_object(error: RemoteError) -> dict[str, Any]:
    fields: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        fields["data"] = error.data
    return fields


Call = tuple[str, list[Any] | dict[str, Any] | None]


def read_batch(source: str) -> list[tuple[int, Call]]:
    """Read the calls of a batch file (``-`` for standard input), each with its line number."""
    text = sys.stdin.read() if source == "-" else _read_text(Path(source))
    calls = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            calls.append((number, parse_batch_line(stripped, f"{source}, line {number}")))
    if not calls:
        raise UsageError(f"batch file {source!r} lists no calls; write one call per line")
    return calls


def parse_batch_line(text: str, where: str) -> Call:
    """Parse one line of a batch file into ``(method, params)``."""
    try:
        value = _STRICT_JSON.decode(text)
    except ValueError as error:
        raise UsageError(f"{where} is not valid JSON: {error}") from None

    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0], value[1:]
    if isinstance(value, dict) and isinstance(value.get("method"), str):
        params = value.get("params")
        valid_params = params is None or isinstance(params, (list, dict))
        if set(value) <= {"method", "params"} and valid_params:
            return value["method"], params
    raise UsageError(
        f"{where} is invalid; write [\"method\", param, ...] or "
        '{"method": "name", "params": [...] or {...}}'
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"batch file {str(path)!r} is missing; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read batch file {str(path)!r}: {error}") from None


def _print_error(message: str) -> None:
    print(f"netrpc call: error: {message}", file=sys.stderr)
