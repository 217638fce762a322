"""Register the ``mtls:`` server and client endpoint parsers with Twisted."""

from netrpc.endpoints import MutualTLSClientParser, MutualTLSServerParser

mtlsServerParser = MutualTLSServerParser()
mtlsClientParser = MutualTLSClientParser()
