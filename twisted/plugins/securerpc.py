"""The ``securerpc`` twistd plugin; the work happens in ``netrpc.daemon``."""

from twisted.application.service import ServiceMaker

securerpc = ServiceMaker(
    "securerpc",
    "netrpc.daemon",
    "JSON-RPC 2.0 over netstrings in mutual TLS",
    "securerpc",
)
