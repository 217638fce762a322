"""Tests for netrpc.methods: loading services and running calls."""

from __future__ import annotations

import itertools
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from txjsonrpc_ng.jsonrpclib import Fault

from netrpc import jsonrpc
from netrpc.exceptions import ConfigurationError, RPCError
from netrpc.identity import PeerIdentity
from netrpc.methods import (
    MethodRegistry,
    as_rpc_error,
    blocking,
    build_registry,
    detached_threadpool,
    pass_caller,
)

_module_numbers = itertools.count()


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Return a function that writes a module with the given source and returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"service_{next(_module_numbers)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def result_of(deferred: Deferred[Any]) -> Any:
    """Return the result of a Deferred that has already fired, raising its failure."""
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def exception_of(deferred: Deferred[Any]) -> BaseException:
    """Return the exception a fired Deferred failed with, consuming the failure."""
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome and isinstance(outcome[0], Failure), f"expected a failure, got {outcome!r}"
    return outcome[0].value  # type: ignore[no-any-return]


def rpc_error_of(deferred: Deferred[Any]) -> RPCError:
    with pytest.raises(RPCError) as caught:
        result_of(deferred)
    return caught.value


TUTORIAL_SERVICE = """
    from txjsonrpc_ng.netstring import jsonrpc


    class Math(jsonrpc.JSONRPC):
        def jsonrpc_mul(self, a, b):
            return a * b


    class Example(jsonrpc.JSONRPC):
        \"\"\"An example object to be published.\"\"\"

        def __init__(self):
            jsonrpc.JSONRPC.__init__(self)
            self.putSubHandler("math", Math())

        def jsonrpc_echo(self, x):
            \"\"\"Return all passed args.\"\"\"
            return x

        def jsonrpc_add(self, a, b):
            \"\"\"Return sum of arguments.\"\"\"
            return a + b

        def jsonrpc_fail(self):
            raise jsonrpc.jsonrpclib.Fault(123, "The fault message")
"""


def test_default_is_demo() -> None:
    registry = build_registry()
    assert registry.method_names() == [
        "echo",
        "multiply",
        "sleep",
        "system.listMethods",
        "system.methodHelp",
        "system.methodSignature",
        "whoami",
    ]
    assert len(registry) == 7


def test_module_with_all(write_module: Any) -> None:
    name = write_module(
        """
        __all__ = ["shown", "CONSTANT", "Thing"]
        CONSTANT = 3
        class Thing: pass
        def shown(): return 1
        def hidden(): return 2
        """
    )
    assert build_registry([name]).method_names()[0] == "shown"
    assert "hidden" not in build_registry([name]).method_names()


def test_module_without_all(write_module: Any) -> None:
    name = write_module(
        """
        from os.path import join
        def public(): return 1
        def _private(): return 2
        async def later(): return 3
        """
    )
    names = build_registry([name]).method_names()
    assert [n for n in names if not n.startswith("system.")] == ["later", "public"]


def test_tutorial_class(write_module: Any) -> None:
    """A txJSON-RPC tutorial class runs unchanged: methods, sub-handlers and Faults."""
    name = write_module(TUTORIAL_SERVICE)
    registry = build_registry([f"{name}:Example"])
    assert registry.method_names() == [
        "add",
        "echo",
        "fail",
        "math.mul",
        "system.listMethods",
        "system.methodHelp",
        "system.methodSignature",
    ]
    assert result_of(registry.call("add", [2, 3])) == 5
    assert result_of(registry.call("math.mul", {"a": 6, "b": 7})) == 42
    assert result_of(registry.call("system.methodHelp", ["echo"])) == "Return all passed args."
    error = as_rpc_error(exception_of(registry.call("fail", [])))
    assert error is not None
    assert (error.code, error.message) == (123, "The fault message")


def test_plain_class(write_module: Any) -> None:
    name = write_module(
        """
        class Service:
            def jsonrpc_ping(self):
                return "pong"
            def helper(self):
                return "not published"
        """
    )
    registry = build_registry([f"{name}:Service"])
    assert "helper" not in registry.method_names()
    assert result_of(registry.call("ping", [])) == "pong"


def test_two_services(write_module: Any) -> None:
    first = write_module("def one(): return 1\n")
    second = write_module("def two(): return 2\n")
    registry = build_registry([first, second])
    assert result_of(registry.call("two", [])) == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "invalid service ''"),
        ("a b", "invalid service 'a b'"),
        ("module:Class:Extra", "expected package.module or package.module:ClassName"),
        ("netrpc_no_such_module", "cannot import service module 'netrpc_no_such_module'"),
        ("netrpc.demo:Missing", "has no class 'Missing'"),
        ("netrpc.demo:echo", "has no class 'echo'"),
    ],
)
def test_load_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build_registry([spec])


def test_load_module_without_functions(write_module: Any) -> None:
    name = write_module("VALUE = 1\n")
    with pytest.raises(ConfigurationError, match="has no public functions"):
        build_registry([name])


def test_load_module_that_raises(write_module: Any) -> None:
    name = write_module("raise RuntimeError('broken at import')\n")
    with pytest.raises(ConfigurationError, match="failed while importing: RuntimeError: broken at import"):
        build_registry([name])


def test_load_class_without_methods(write_module: Any) -> None:
    name = write_module("class Empty: pass\n")
    with pytest.raises(ConfigurationError, match="has no jsonrpc_ methods"):
        build_registry([f"{name}:Empty"])


def test_load_class_needing_arguments(write_module: Any) -> None:
    name = write_module(
        """
        class Needy:
            def __init__(self, value): pass
            def jsonrpc_x(self): pass
        """
    )
    with pytest.raises(ConfigurationError, match="creatable without arguments"):
        build_registry([f"{name}:Needy"])


def test_load_name_conflict(write_module: Any) -> None:
    name = write_module("def echo(value): return value\n")
    with pytest.raises(ConfigurationError, match="'echo' from .* is already used by 'netrpc.demo'"):
        build_registry(["netrpc.demo", name])


def test_load_system_conflict(write_module: Any) -> None:
    name = write_module("def system(): pass\n")
    with pytest.raises(ConfigurationError, match="already used by 'introspection'"):
        build_registry([name])


def test_call_positional_and_named() -> None:
    registry = build_registry()
    assert result_of(registry.call("multiply", [6, 7])) == 42
    assert result_of(registry.call("multiply", {"b": 7, "a": 6})) == 42


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ([1], "missing a required argument: 'b'"),
        ([1, 2, 3], "too many positional arguments"),
        ({"a": 1}, "missing a required argument: 'b'"),
        ({"a": 1, "b": 2, "c": 3}, "got an unexpected keyword argument 'c'"),
    ],
)
def test_call_invalid_params(params: Any, reason: str) -> None:
    error = rpc_error_of(build_registry().call("multiply", params))
    assert error.code == jsonrpc.INVALID_PARAMS
    assert error.data == f"multiply: {reason}"


def test_call_signature_kinds(write_module: Any) -> None:
    name = write_module(
        """
        def only_positional(a, /, b=2): return [a, b]
        def keyword_only(a, *, flag): return [a, flag]
        def variadic(*args, **kwargs): return [list(args), kwargs]
        """
    )
    registry = build_registry([name])
    assert result_of(registry.call("only_positional", [1])) == [1, 2]
    assert rpc_error_of(registry.call("only_positional", {"a": 1})).code == jsonrpc.INVALID_PARAMS
    assert result_of(registry.call("keyword_only", {"a": 1, "flag": True})) == [1, True]
    assert rpc_error_of(registry.call("keyword_only", [1])).code == jsonrpc.INVALID_PARAMS
    assert result_of(registry.call("variadic", [1, 2])) == [[1, 2], {}]
    assert result_of(registry.call("variadic", {"x": 1})) == [[], {"x": 1}]


def test_call_unknown_method() -> None:
    error = rpc_error_of(build_registry().call("nope", []))
    assert (error.code, error.data) == (jsonrpc.METHOD_NOT_FOUND, "no method named 'nope'")


@pytest.mark.parametrize("name", ["system.__dir__", "system._listFunctions", "system.nope", "nope.x"])
def test_call_unreachable_names(name: str) -> None:
    assert rpc_error_of(build_registry().call(name, [])).code == jsonrpc.METHOD_NOT_FOUND


def test_call_exception_fails_deferred(write_module: Any) -> None:
    name = write_module("def broken(): raise KeyError('inside')\n")
    with pytest.raises(KeyError, match="inside"):
        result_of(build_registry([name]).call("broken", []))


def test_call_rpc_error_passes_through(write_module: Any) -> None:
    name = write_module(
        """
        from netrpc import RPCError
        def refuse(): raise RPCError(7, "No", {"why": "because"})
        """
    )
    error = rpc_error_of(build_registry([name]).call("refuse", []))
    assert (error.code, error.message, error.data) == (7, "No", {"why": "because"})


def test_call_deferred_and_coroutine(write_module: Any) -> None:
    name = write_module(
        """
        from twisted.internet import defer
        def later(): return defer.succeed("deferred")
        async def coroutine(x):
            return await defer.succeed(x * 2)
        """
    )
    registry = build_registry([name])
    assert result_of(registry.call("later", [])) == "deferred"
    assert result_of(registry.call("coroutine", [21])) == 42


def test_cancel_coroutine(write_module: Any) -> None:
    name = write_module(
        """
        from twisted.internet import defer
        cancelled = []
        async def wait_forever():
            try:
                await defer.Deferred()
            except defer.CancelledError:
                cancelled.append(True)
                raise
        """
    )
    registry = build_registry([name])
    call = registry.call("wait_forever", [])
    call.cancel()
    with pytest.raises(defer.CancelledError):
        result_of(call)
    assert __import__(name).cancelled == [True]


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-methods")
    pool.start()
    yield pool
    pool.stop()


@pytest_twisted.inlineCallbacks
def test_blocking_runs_in_thread(threadpool: ThreadPool) -> Iterator[Deferred[Any]]:
    @blocking
    def where() -> int:
        return threading.get_ident()

    registry = MethodRegistry(reactor=reactor, threadpool=threadpool)
    registry.add_function("where", where)
    thread = yield registry.call("where", [])
    assert thread != threading.get_ident()


@pytest_twisted.inlineCallbacks
def test_blocking_does_not_stall(threadpool: ThreadPool) -> Iterator[Deferred[Any]]:
    """Other calls finish while a blocking call waits in its thread."""
    release = threading.Event()

    @blocking
    def wait() -> str:
        release.wait(5)
        return "released"

    registry = MethodRegistry(reactor=reactor, threadpool=threadpool)
    registry.add_function("wait", wait)
    registry.add_function("quick", lambda: "quick")
    waiting = registry.call("wait", [])
    assert result_of(registry.call("quick", [])) == "quick"
    assert not waiting.called
    release.set()
    assert (yield waiting) == "released"


def test_detached_threadpool_abandons_calls() -> None:
    """The pool's threads never hold up the process exit, and a call still running then is logged."""
    fake_reactor = MemoryReactor()
    pool = detached_threadpool(fake_reactor)
    ((start, _, _),) = fake_reactor.whenRunningHooks
    ((log_abandoned, arguments, _),) = fake_reactor.triggers["during"]["shutdown"]
    start()
    release, running = threading.Event(), threading.Event()
    daemon_threads: list[bool] = []

    def wait() -> None:
        daemon_threads.append(threading.current_thread().daemon)
        running.set()
        release.wait(5)

    pool.callInThread(wait)
    try:
        assert running.wait(5)
        with capturedLogs() as events:
            log_abandoned(*arguments)
    finally:
        release.set()
        pool.stop()

    assert daemon_threads == [True]
    (message,) = [formatEvent(event) for event in events]
    assert message.startswith("Exiting with 1 blocking method call still running in threads")


def test_pass_caller() -> None:
    identity = PeerIdentity("alice", dns_names=("alice.example",), serial=10, address="127.0.0.1:5")
    registry = build_registry()
    assert result_of(registry.call("whoami", [], identity)) == identity.as_dict()
    assert result_of(registry.call("whoami", [], None)) is None


def test_pass_caller_not_settable() -> None:
    error = rpc_error_of(build_registry().call("whoami", {"caller": "mallory"}))
    assert error.code == jsonrpc.INVALID_PARAMS
    assert "set by the server" in error.data


def test_pass_caller_not_a_positional_param() -> None:
    @pass_caller
    def greet(greeting: str, caller: PeerIdentity | None = None) -> str:
        return f"{greeting}, {caller.common_name if caller else '?'}"

    registry = MethodRegistry()
    registry.add_function("greet", greet)
    assert result_of(registry.call("greet", ["hi"], PeerIdentity("bob"))) == "hi, bob"
    assert rpc_error_of(registry.call("greet", ["hi", "x"])).code == jsonrpc.INVALID_PARAMS


def test_pass_caller_needs_parameter() -> None:
    with pytest.raises(TypeError, match="no parameter named 'caller'"):

        @pass_caller
        def anonymous() -> None:
            pass


def test_pass_caller_must_be_last() -> None:
    with pytest.raises(TypeError, match="keyword-only or the last positional"):

        @pass_caller
        def first(caller: Any, value: Any) -> None:
            pass


def test_introspection() -> None:
    registry = build_registry()
    assert result_of(registry.call("system.listMethods", [])) == registry.method_names()
    assert result_of(registry.call("system.methodHelp", ["multiply"])) == "Return the product of two numbers."
    assert result_of(registry.call("system.methodSignature", ["multiply"])) == ""


def test_introspection_unknown_method() -> None:
    error = as_rpc_error(exception_of(build_registry().call("system.methodHelp", ["nope"])))
    assert error is not None
    assert error.code == jsonrpc.METHOD_NOT_FOUND


def test_as_rpc_error() -> None:
    own = RPCError(1, "x")
    assert as_rpc_error(own) is own
    converted = as_rpc_error(Fault(5, "five"))
    assert converted is not None
    assert (converted.code, converted.message) == (5, "five")
    assert as_rpc_error(Fault("text", "code")) is None
    assert as_rpc_error(ValueError("x")) is None


def test_demo_sleep_bounds() -> None:
    registry = build_registry()
    for seconds in (-1, 10.5, "1", True):
        assert rpc_error_of(registry.call("sleep", [seconds])).code == jsonrpc.INVALID_PARAMS


@pytest_twisted.inlineCallbacks
def test_demo_sleep() -> Iterator[Deferred[Any]]:
    result = yield build_registry().call("sleep", [0.01])
    assert result == 0.01


def test_demo_multiply_rejects_text() -> None:
    error = rpc_error_of(build_registry().call("multiply", ["a", 3]))
    assert error.code == jsonrpc.INVALID_PARAMS
    assert error.data == "a is 'a', expected a number"


def test_replaced_sub_handler() -> None:
    """A sub-handler put in after the first call is found by later calls."""
    registry = build_registry()
    assert result_of(registry.call("multiply", [2, 3])) == 6

    class Custom:
        subHandlers: dict[str, Any] = {}

        def _getFunction(self, name: str) -> Any:
            if name != "ping":
                raise Fault(jsonrpc.METHOD_NOT_FOUND, name)
            return lambda: "pong"

        def _listFunctions(self) -> list[str]:
            return ["ping"]

        def getSubHandlerPrefixes(self) -> list[str]:
            return []

    registry.putSubHandler("system", Custom())
    assert result_of(registry.call("system.ping", [])) == "pong"
    assert "system.listMethods" not in registry.method_names()
