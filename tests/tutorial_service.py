"""
A service file in the style of the original txJSON-RPC tutorial: it imports
``txjsonrpc``, the original package's name, and subclasses its netstring
``JSONRPC`` class. netrpc must load it without any edit.
"""

from txjsonrpc.netstring import jsonrpc


class Example(jsonrpc.JSONRPC):
    """Arithmetic published the txJSON-RPC way, as jsonrpc_ methods."""

    def jsonrpc_echo(self, value):
        """Send ``value`` back unchanged."""
        return value

    def jsonrpc_add(self, a, b):
        """Add two numbers."""
        return a + b
