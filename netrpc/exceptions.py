"""
The errors netrpc raises, grouped by whose fault they are.

- ``ConfigurationError``: local input is wrong (a missing file, a bad option,
  a key that does not match its certificate). Startup code turns these into a
  one-line message and a non-zero exit status.
- ``RemoteProtocolError``: the peer sent bytes that break the framing or the
  JSON-RPC 2.0 envelope.
- ``RPCError``: a valid JSON-RPC error object. Methods raise it to send their
  own code, message and data; clients raise ``RemoteError`` when a reply
  carries one.
- ``CallTimeout``, ``ConnectionFailed`` and ``TLSVerificationError``: a call
  did not get a reply, for the reason the class names. ``OutcomeUnknown``, a
  ``ConnectionFailed``, means the call was sent before the connection broke.
- ``TooManyCallsInFlight``: a client's own bound on calls in flight rejected
  a call before sending it.
"""

from __future__ import annotations

import json
from typing import Any


class NetrpcError(Exception):
    """Base class of every error that netrpc raises on purpose."""


class ConfigurationError(NetrpcError):
    """Local input (a file, an option, a passphrase) is invalid or missing."""


class PassphraseError(ConfigurationError):
    """A private key could not be decrypted with the passphrase given."""


class RemoteProtocolError(NetrpcError):
    """The peer sent data that breaks netstring framing or JSON-RPC 2.0."""


class RPCError(NetrpcError):
    """
    A JSON-RPC 2.0 error object: ``code``, ``message`` and optional ``data``.

    A method raises it to send that error to its caller instead of the
    generic internal error. ``data`` must be JSON-serializable.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(code, message, data)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        text = f"{self.message} (code {self.code})"
        if self.data is not None:
            # JSON, as the data came over the wire, not Python's repr of it.
            text += f": {json.dumps(self.data, default=repr)}"
        return text


class RemoteError(RPCError):
    """The server replied to a call with a JSON-RPC error object."""


class CallTimeout(NetrpcError):
    """A call got no reply before its deadline."""


class ConnectionFailed(NetrpcError):
    """The connection to the server could not be made, or was lost mid-call."""


class TLSVerificationError(ConnectionFailed):
    """
    The TLS handshake failed because a certificate was rejected.

    ``reason`` is a short plain phrase such as "unknown CA", "name mismatch"
    or "expired".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TooManyCallsInFlight(NetrpcError):
    """
    A client rejected a call at once because its maximum number of calls in
    flight was reached and it was configured to fail rather than wait.
    """


class OutcomeUnknown(ConnectionFailed):
    """
    The connection was lost after a call was sent and before its reply
    arrived, so the server may or may not have run it.
    """
