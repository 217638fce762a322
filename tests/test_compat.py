"""Tests for running service files written for the original txJSON-RPC."""

from __future__ import annotations

import pytest_twisted

from netrpc.methods import build_registry


@pytest_twisted.inlineCallbacks
def test_tutorial_class_runs_unchanged():
    """A class importing ``txjsonrpc.netstring`` loads, and its jsonrpc_ methods return results."""
    registry = build_registry(["tests.tutorial_service:Example"])

    assert "add" in registry.method_names()
    result = yield registry.call("add", [2, 3])
    assert result == 5
    result = yield registry.call("echo", {"value": "hi"})
    assert result == "hi"


def test_alias_maps_to_maintained_release():
    import txjsonrpc.netstring.jsonrpc as aliased
    import txjsonrpc_ng.netstring.jsonrpc as maintained

    assert aliased is maintained
