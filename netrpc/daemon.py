"""
The ``securerpc`` twistd plugin: options, service assembly and the start-up
checks that turn every configuration mistake into one line and a non-zero
exit status.
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, NoReturn

from twisted.python import usage

from netrpc.audit import LOG_DESTINATION
from netrpc.config import (
    DEFAULT_EXPIRY_WARNING_DAYS,
    DEFAULT_LISTEN,
    Limits,
    Settings,
    merge_settings,
    read_config_file,
)
from netrpc.exceptions import ConfigurationError
from netrpc.systemd import under_journal

_LIMIT_HELP = {
    "max_message_size": "Maximum size of one message, in bytes.",
    "max_batch_length": "Maximum number of requests in one batch.",
    "max_in_flight": "Maximum calls running at once on one connection; "
    "beyond it the server stops reading from that connection.",
    "max_connections": "Maximum open connections; further ones are closed at once.",
    "handshake_timeout": "Seconds a peer has to finish the TLS handshake.",
    "idle_timeout": "Seconds a connection may stay without any call before it is closed.",
    "call_timeout": "Seconds one call may run before it fails with a timeout error.",
    "max_unsent_bytes": "Maximum reply bytes waiting for a slow reader, per connection; "
    "beyond it the connection is closed.",
    "shutdown_grace": "Seconds calls in flight get to finish after SIGTERM.",
}


def _limit_options() -> list[list[Any]]:
    defaults = Limits()
    options = []
    for item in fields(Limits):
        flag = item.name.replace("_", "-")
        text = f"{_LIMIT_HELP[item.name]} [default: {getattr(defaults, item.name)}]"
        options.append([flag, None, None, text])
    return options


class Options(usage.Options):
    """Command-line options of ``twistd securerpc``."""

    synopsis = "[options]"
    longdesc = (
        "Serve JSON-RPC 2.0 over netstrings, always inside mutual TLS. Every option "
        "has a key of the same name in the --config file (with _ for -); the command "
        "line wins over the file."
    )

    optParameters = [
        ["config", "c", None, "TOML config file to read settings from."],
        [
            "pki",
            None,
            None,
            "Folder made by 'netrpc certs init': fills privateKey, certKey, caCerts "
            "and crl of every mtls: endpoint that leaves them out.",
        ],
        ["passphrase-file", None, None, "File holding the server private key's passphrase."],
        ["user", None, None, "User to switch to after binding, required when started as root."],
        ["group", None, None, "Group to switch to [default: the user's primary group]."],
        ["instance", None, None, "Instance name shown in logs and by system.health."],
        [
            "workers",
            None,
            None,
            "Start this many worker processes that share the listening sockets; this "
            "process supervises them (command line only, see docs/scaling.md).",
            int,
        ],
        [
            "audit-log",
            None,
            None,
            "Write one audit line per call to this file, or to the daemon's own log "
            "(the journal under systemd) when given 'log'.",
        ],
        [
            "expiry-warning-days",
            None,
            None,
            "Warn when the server certificate, the client CA or the CRL expires within "
            f"this many days; checked at start, at reload and daily [default: {DEFAULT_EXPIRY_WARNING_DAYS}]",
        ],
        [
            "metrics-listen",
            None,
            None,
            "Serve the counters in Prometheus text format on this local-only endpoint: "
            "tcp:PORT:interface=127.0.0.1 or unix:PATH (needs prometheus_client).",
        ],
        *_limit_options(),
    ]

    optFlags = [
        ["audit-json", None, "Write audit lines as JSON objects instead of key=value text."],
        [
            "audit-params",
            None,
            "Include params, results and error details in audit lines; they may contain secrets.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["methods"] = []

    def parseOptions(self, options: Any = None) -> None:
        # --workers starts each worker with the same options.
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, repeatable [default: mtls:port=8700:interface=127.0.0.1]."""
        self["listen"].append(description)

    def opt_methods(self, service: str) -> None:
        """Service to expose, repeatable: package.module or package.module:ClassName [default: netrpc.demo]."""
        self["methods"].append(service)

    def overrides(self) -> dict[str, Any]:
        """Return the settings given on the command line, keyed as in the config file."""
        values: dict[str, Any] = {}
        for key in ("pki", "passphrase-file", "user", "group", "instance", "metrics-listen"):
            values[key.replace("-", "_")] = self[key]
        values["expiry_warning_days"] = self["expiry-warning-days"]
        values["audit"] = self._audit_overrides() or None
        for item in fields(Limits):
            values[item.name] = self[item.name.replace("_", "-")]
        values["listen"] = self["listen"] or None
        values["methods"] = self["methods"] or None
        return values

    def _audit_overrides(self) -> dict[str, Any]:
        # Any audit option turns the audit log on, to the daemon's log
        # unless --audit-log names a file.
        table: dict[str, Any] = {}
        destination = self["audit-log"]
        if destination:
            table["destination"] = (
                destination if destination == LOG_DESTINATION else str(Path(destination).absolute())
            )
        if self["audit-json"]:
            table["format"] = "json"
        if self["audit-params"]:
            table["include_params"] = True
        return table


def load_settings(options: Options) -> Settings:
    """Merge the config file named by ``--config`` with the command line."""
    file_values: dict[str, Any] = {}
    source = file_source = "the command line"
    if options["config"]:
        file_values = read_config_file(Path(options["config"]))
        file_source = f"config file {options['config']!r}"
        source = f"{file_source} or the command line"

    settings = merge_settings(file_values, options.overrides(), source, file_source)
    if not settings.listen:
        settings = replace(settings, listen=(DEFAULT_LISTEN,))
    if not settings.methods:
        settings = replace(settings, methods=("netrpc.demo",))
    from netrpc.workers import worker_settings

    return worker_settings(settings, os.environ)


def exit_with_error(error: Exception) -> NoReturn:
    """Leave twistd with one line on stderr and exit status 1."""
    from netrpc.workers import worker_name

    # Once twistd's logging has started, sys.stderr feeds the log; the
    # message belongs on the terminal or the journal stream the process got.
    stream = sys.__stderr__ or sys.stderr
    # The "<3>" prefix gives the line journald's error priority, not info.
    priority = "<3>" if under_journal(stream.fileno()) else ""
    # Workers of one --workers parent share its standard error.
    name = worker_name(os.environ)
    program = "securerpc" if name is None else f"securerpc {name}"
    print(f"{priority}{program}: error: {error}", file=stream, flush=True)
    raise SystemExit(1)


def makeService(options: Options) -> Any:
    """Build the daemon's service from its options; twistd calls this."""
    from netrpc.server import build_service
    from netrpc.workers import build_pool, is_worker, watch_parent

    try:
        settings = load_settings(options)
        if options["workers"] is not None and not is_worker(os.environ):
            return build_pool(
                settings, options["workers"], arguments=options.arguments, twistd_options=options.parent
            )
        service = build_service(
            settings, twistd_options=options.parent, reread_settings=lambda: load_settings(options)
        )
        watch_parent(service, settings)
        return service
    except ConfigurationError as error:
        exit_with_error(error)

