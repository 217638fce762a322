"""
The method registry: which names a server publishes and how a call runs.

The registry is a txJSON-RPC sub-handler (``BaseSubhandler``), so dotted
names such as ``system.listMethods`` resolve through sub-handlers and
txJSON-RPC's ``Introspection`` lists and documents the methods. On top of
that it loads services by name, checks params against each function's
signature before the call, passes the verified caller to methods that ask
for it and runs blocking functions in a thread pool.

A service is either a module, whose public functions are published under
their own names (only those in ``__all__`` when the module defines it), or
a txJSON-RPC-style class, written ``package.module:ClassName``, whose
``jsonrpc_`` methods and sub-handlers are published as txJSON-RPC would.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from threading import Thread
from typing import Any, TypeVar, cast
from xmlrpc.client import Fault

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from txjsonrpc_ng.jsonrpc import BaseSubhandler, Introspection
from txjsonrpc_ng.jsonrpclib import NoSuchFunction

from netrpc._plural import plural
from netrpc import jsonrpc
from netrpc.compat import install_txjsonrpc_alias
from netrpc.exceptions import ConfigurationError, RPCError
from netrpc.identity import PeerIdentity

__all__ = [
    "DEFAULT_SERVICE",
    "MethodRegistry",
    "as_rpc_error",
    "blocking",
    "build_registry",
    "detached_threadpool",
    "pass_caller",
]

# The service a server publishes when it is given none.
DEFAULT_SERVICE = "netrpc.demo"

# The keyword argument that carries the caller's identity.
CALLER_PARAMETER = "caller"

_BLOCKING_MARK = "_netrpc_blocking"
_PASS_CALLER_MARK = "_netrpc_pass_caller"
_SERVICE_SPEC = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")

# Threads of a detached pool, as the reactor's own pool has by default.
DEFAULT_MAX_THREADS = 10

log = Logger(namespace="netrpc.methods")

_F = TypeVar("_F", bound=Callable[..., Any])


def blocking(function: _F) -> _F:
    """
    Mark a method that blocks or uses the CPU for long, so the server runs
    it in a thread pool and keeps serving other callers meanwhile.

    Cancelling such a call (at its deadline or at shutdown) sends the
    caller an error at once but cannot stop the thread: the function runs
    to its end and its result is dropped.
    """
    setattr(function, _BLOCKING_MARK, True)
    return function


def pass_caller(function: _F) -> _F:
    """
    Mark a method that receives the verified identity of its caller, a
    ``PeerIdentity``, as the keyword argument ``caller``.

    The function needs a ``caller`` parameter that is keyword-only or the
    last positional one; callers cannot set it themselves. It receives
    None on a connection without a client certificate, which the TLS
    endpoints never accept.
    """
    signature = inspect.signature(function)
    parameter = signature.parameters.get(CALLER_PARAMETER)
    if parameter is None:
        raise TypeError(
            f"{function.__qualname__}() has no parameter named "
            f"{CALLER_PARAMETER!r}; add one to receive the caller's identity"
        )
    if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
        later = list(signature.parameters.values())[
            list(signature.parameters).index(CALLER_PARAMETER) + 1 :
        ]
        if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in later):
            raise TypeError(
                f"{function.__qualname__}(): the {CALLER_PARAMETER!r} parameter "
                f"must be keyword-only or the last positional parameter"
            )
    setattr(function, _PASS_CALLER_MARK, True)
    return function


def as_rpc_error(error: BaseException | None) -> RPCError | None:
    """
    Return the JSON-RPC error a method meant to send by raising ``error``:
    an ``RPCError`` as it is, or a txJSON-RPC ``Fault`` with an integer
    code. Return None for any other exception, which is a failure.
    """
    if isinstance(error, RPCError):
        return error
    if isinstance(error, Fault) and type(error.faultCode) is int:
        return RPCError(error.faultCode, str(error.faultString))
    return None


class _Method:
    """A published function with what is needed to check and run calls to it."""

    __slots__ = (
        "name",
        "function",
        "signature",
        "pass_caller",
        "blocking",
        "_min_positional",
        "_max_positional",
    )

    def __init__(self, name: str, function: Callable[..., Any]) -> None:
        self.name = name
        self.function = function
        self.pass_caller = bool(getattr(function, _PASS_CALLER_MARK, False))
        self.blocking = bool(getattr(function, _BLOCKING_MARK, False))
        self.signature = self._public_signature(function)
        self._min_positional, self._max_positional = self._positional_range()

    def _public_signature(self, function: Callable[..., Any]) -> inspect.Signature | None:
        """Return the signature callers bind against, without ``caller`` when it is passed."""
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            # Some built-in callables have no signature; they check their
            # own arguments.
            return None
        if self.pass_caller:
            signature = signature.replace(
                parameters=[
                    p for p in signature.parameters.values() if p.name != CALLER_PARAMETER
                ]
            )
        return signature

    def _positional_range(self) -> tuple[int, float]:
        """
        How many positional params the function takes, so that calls with
        an array of params are checked by counting instead of binding.
        Returns (-1, -1) when counting cannot decide, for a required
        keyword-only parameter or an unknown signature.
        """
        if self.signature is None:
            return -1, -1
        minimum, maximum = 0, 0.0
        for parameter in self.signature.parameters.values():
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                maximum = float("inf")
            elif parameter.kind in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            ):
                maximum += 1
                if parameter.default is inspect.Parameter.empty:
                    minimum += 1
            elif (
                parameter.kind is inspect.Parameter.KEYWORD_ONLY
                and parameter.default is inspect.Parameter.empty
            ):
                return -1, -1
        return minimum, maximum

    def bind(self, params: list[Any] | dict[str, Any]) -> tuple[Sequence[Any], dict[str, Any]]:
        """
        Turn a request's params into call arguments, or raise ``RPCError``
        with ``INVALID_PARAMS`` and the reason when they do not fit.
        """
        if type(params) is list:
            if self._min_positional <= len(params) <= self._max_positional:
                return params, {}
            return self._bind_with_signature(params, {})

        if self.pass_caller and CALLER_PARAMETER in params:
            raise RPCError(
                jsonrpc.INVALID_PARAMS,
                "Invalid params",
                f"{CALLER_PARAMETER!r} is set by the server from the client "
                f"certificate and cannot be passed",
            )
        # The JSON parser yields plain lists and dicts only, so these are by-name params.
        return self._bind_with_signature([], cast(dict[str, Any], params))

    def _bind_with_signature(
        self, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[Sequence[Any], dict[str, Any]]:
        if self.signature is None:
            return args, kwargs
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise RPCError(
                jsonrpc.INVALID_PARAMS, "Invalid params", f"{self.name}: {error}"
            ) from None
        return bound.args, bound.kwargs


class MethodRegistry(BaseSubhandler):
    """
    The methods a server publishes, with txJSON-RPC's introspection under
    ``system.``.

    ``threadpool`` runs functions marked ``@blocking``; by default it is the
    reactor's thread pool. The reactor is only used for those calls.
    """

    def __init__(self, *, reactor: Any = None, threadpool: ThreadPool | None = None) -> None:
        super().__init__()
        self._functions: dict[str, Callable[..., Any]] = {}
        self._sources: dict[str, str] = {"system": "introspection"}
        self._table: dict[str, _Method] | None = None
        self._reactor = reactor
        self._threadpool = threadpool
        self.putSubHandler("system", Introspection(self))

    # txJSON-RPC's hooks: Introspection and BaseSubhandler call these.

    def _getFunction(self, functionPath: str) -> Callable[..., Any]:
        if self.separator in functionPath:
            return cast(Callable[..., Any], super()._getFunction(functionPath))
        function = self._functions.get(functionPath)
        if function is None:
            raise NoSuchFunction(
                jsonrpc.METHOD_NOT_FOUND, f"function {functionPath} not found"
            )
        return function

    def _listFunctions(self) -> list[str]:
        return sorted(self._functions)

    def putSubHandler(self, prefix: str, handler: Any) -> None:
        """Publish ``handler``'s methods under ``prefix.``, replacing any handler there."""
        super().putSubHandler(prefix, handler)
        self._table = None

    # Building the registry.

    def add_function(self, name: str, function: Callable[..., Any], *, source: str = "") -> None:
        """Publish ``function`` as ``name``; ``source`` names it in conflict errors."""
        self._claim(name, source or name)
        self._functions[name] = function
        self._table = None

    def add_handler(self, handler: Any, *, source: str = "") -> None:
        """
        Publish the ``jsonrpc_`` methods and the sub-handlers of a
        txJSON-RPC-style object, as txJSON-RPC's own lookup would find them.
        """
        source = source or type(handler).__qualname__
        names = [
            name[len("jsonrpc_") :]
            for name in dir(handler)
            if name.startswith("jsonrpc_") and callable(getattr(handler, name))
        ]
        prefixes = list(getattr(handler, "subHandlers", {}))
        if not names and not prefixes:
            raise ConfigurationError(
                f"service {source!r} has no jsonrpc_ methods and no sub-handlers; "
                f"name the methods to publish jsonrpc_NAME"
            )
        for name in names:
            self.add_function(name, getattr(handler, "jsonrpc_" + name), source=source)
        for prefix in prefixes:
            self._claim(prefix, source)
            self.putSubHandler(prefix, handler.getSubHandler(prefix))
        self._table = None

    def add_module(self, module: Any, *, source: str = "") -> None:
        """Publish a module's public functions (those in ``__all__`` if it has one)."""
        source = source or module.__name__
        functions = _public_functions(module)
        if not functions:
            raise ConfigurationError(
                f"service module {source!r} has no public functions; define "
                f"functions whose names do not start with '_', or list them in __all__"
            )
        for name, function in functions:
            self.add_function(name, function, source=source)

    def load_service(self, spec: str) -> None:
        """
        Publish the service named ``package.module`` or
        ``package.module:ClassName``. Raises ``ConfigurationError`` naming the
        value and the fix when it cannot be loaded.
        """
        if not _SERVICE_SPEC.match(spec):
            raise ConfigurationError(
                f"invalid service {spec!r}: expected package.module or "
                f"package.module:ClassName"
            )
        module_name, _, class_name = spec.partition(":")
        module = _import_service_module(module_name)
        if not class_name:
            self.add_module(module, source=spec)
            return
        self.add_handler(_instantiate_service_class(module, class_name, spec), source=spec)

    def _claim(self, name: str, source: str) -> None:
        owner = self._sources.get(name)
        if owner is not None:
            raise ConfigurationError(
                f"method name {name!r} from {source!r} is already used by {owner!r}; "
                f"rename one of them or publish only one of the services"
            )
        self._sources[name] = source

    # Looking methods up and calling them.

    def method_names(self) -> list[str]:
        """Return every published method name, sorted, including ``system.*``."""
        names: list[str] = Introspection(self).jsonrpc_listMethods()
        return names

    def __len__(self) -> int:
        return len(self.method_names())

    def _lookup(self, name: str) -> _Method | None:
        table = self._table
        if table is None:
            table = self._table = {
                method_name: _Method(method_name, self._getFunction(method_name))
                for method_name in self.method_names()
            }
        method = table.get(name)
        if method is not None or self.separator not in name:
            return method

        # A sub-handler may resolve names it does not list; private names
        # stay unreachable.
        if any(part.startswith("_") for part in name.split(self.separator)):
            return None
        try:
            return _Method(name, self._getFunction(name))
        except Fault:
            return None

    def call(
        self,
        name: str,
        params: list[Any] | dict[str, Any],
        caller: PeerIdentity | None = None,
    ) -> Deferred[Any]:
        """
        Call the method ``name`` with ``params``.

        The Deferred fires with the method's result. It fails with
        ``RPCError`` for an unknown method (``METHOD_NOT_FOUND``) or params
        that do not fit (``INVALID_PARAMS``), and with whatever the method
        raised otherwise. Cancelling it cancels the method's own Deferred or
        coroutine; a blocking method's thread runs on.
        """
        method = self._lookup(name)
        if method is None:
            return defer.fail(
                RPCError(jsonrpc.METHOD_NOT_FOUND, "Method not found", f"no method named {name!r}")
            )
        try:
            args, kwargs = method.bind(params)
        except RPCError as error:
            return defer.fail(error)

        if method.pass_caller:
            kwargs = {**kwargs, CALLER_PARAMETER: caller}
        if method.blocking:
            return self._call_in_thread(method.function, args, kwargs)
        return defer.maybeDeferred(method.function, *args, **kwargs)

    def _call_in_thread(
        self, function: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Deferred[Any]:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = self._reactor = global_reactor
        if self._threadpool is None:
            self._threadpool = reactor.getThreadPool()
        return deferToThreadPool(reactor, self._threadpool, function, *args, **kwargs)


def _public_functions(module: Any) -> list[tuple[str, Callable[..., Any]]]:
    """List the functions a module publishes, in name order."""
    exported = getattr(module, "__all__", None)
    if exported is not None:
        candidates = [(name, getattr(module, name, None)) for name in exported]
        return sorted(
            (name, value)
            for name, value in candidates
            if callable(value) and not inspect.isclass(value)
        )
    # Without __all__, only functions defined in the module itself count,
    # so names it imports (``from os import remove``) are never published.
    return sorted(
        (name, value)
        for name, value in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(value)
        and value.__module__ == module.__name__
    )


def _import_service_module(module_name: str) -> Any:
    install_txjsonrpc_alias()
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(
            f"cannot import service module {module_name!r}: {error}; check the "
            f"name and that the module's directory is on PYTHONPATH"
        ) from error
    except (Exception, SystemExit) as error:
        # SystemExit too: a module calling sys.exit() on import would
        # otherwise end the daemon with no word of why.
        raise ConfigurationError(
            f"service module {module_name!r} failed while importing: "
            f"{type(error).__name__}: {error}"
        ) from error


def _instantiate_service_class(module: Any, class_name: str, spec: str) -> Any:
    service_class = getattr(module, class_name, None)
    if not inspect.isclass(service_class):
        raise ConfigurationError(
            f"service module {module.__name__!r} has no class {class_name!r}; "
            f"check the part after ':' in {spec!r}"
        )
    try:
        return service_class()
    except Exception as error:
        raise ConfigurationError(
            f"cannot create service {spec!r}: {class_name}() raised "
            f"{type(error).__name__}: {error}; the class must be creatable "
            f"without arguments"
        ) from error


class _DetachedThreadPool(ThreadPool):
    # Daemon threads: the interpreter exits without joining them. ThreadPool
    # only calls threadFactory, but its inferred type is the Thread class.
    threadFactory = partial(Thread, daemon=True)  # type: ignore[assignment]


def detached_threadpool(reactor: Any, *, maxthreads: int = DEFAULT_MAX_THREADS) -> ThreadPool:
    """
    Return a thread pool for ``@blocking`` methods that never delays the
    process exit, started when ``reactor`` runs.

    The reactor's own pool joins its threads at shutdown, so one method
    stuck in a thread would keep the daemon alive past its shutdown grace
    period. This pool's threads are daemon threads and it is not joined: at
    reactor shutdown a method still running in it is abandoned, logged, and
    ends with the process.
    """
    pool = _DetachedThreadPool(0, maxthreads, "netrpc.methods")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", _log_abandoned_calls, pool)
    return pool


def _log_abandoned_calls(pool: ThreadPool) -> None:
    running = len(pool.working)
    if running:
        log.warn(
            "Exiting with {calls} still running in threads; their results are dropped",
            calls=plural(running, "blocking method call"),
            count=running,
        )


def build_registry(
    services: Iterable[str] = (),
    *,
    reactor: Any = None,
    threadpool: ThreadPool | None = None,
) -> MethodRegistry:
    """
    Build a registry publishing ``services`` (``--methods`` values), or the
    demo service when there are none.
    """
    registry = MethodRegistry(reactor=reactor, threadpool=threadpool)
    for spec in list(services) or [DEFAULT_SERVICE]:
        registry.load_service(spec)
    return registry
