"""
netrpc: JSON-RPC 2.0 over netstrings, always inside mutual TLS.
"""

from netrpc.exceptions import (
    CallTimeout,
    ConfigurationError,
    ConnectionFailed,
    NetrpcError,
    OutcomeUnknown,
    PassphraseError,
    RemoteError,
    RemoteProtocolError,
    RPCError,
    TLSVerificationError,
    TooManyCallsInFlight,
)

__version__ = "0.1.0"

__all__ = [
    "CallTimeout",
    "ConfigurationError",
    "ConnectionFailed",
    "NetrpcError",
    "OutcomeUnknown",
    "PassphraseError",
    "RPCError",
    "RemoteError",
    "RemoteProtocolError",
    "TLSVerificationError",
    "TooManyCallsInFlight",
    "__version__",
]
