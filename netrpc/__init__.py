"""
netrpc: JSON-RPC 2.0 over netstrings, always inside mutual TLS.
"""

from netrpc.exceptions import (
    CallTimeout,
    ConfigurationError,
    ConnectionFailed,
    NetrpcError,
    PassphraseError,
    RemoteError,
    RemoteProtocolError,
    RPCError,
    TLSVerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "CallTimeout",
    "ConfigurationError",
    "ConnectionFailed",
    "NetrpcError",
    "PassphraseError",
    "RPCError",
    "RemoteError",
    "RemoteProtocolError",
    "TLSVerificationError",
    "__version__",
]
