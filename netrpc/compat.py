"""
Import compatibility for service modules written for the original txJSON-RPC.

Those modules start with ``from txjsonrpc.netstring import jsonrpc``, but the
maintained release installs as ``txjsonrpc_ng``. ``install_txjsonrpc_alias``
lets the old name resolve to the new package, so such a module runs
unchanged. The alias is installed only where the original ``txjsonrpc`` is
not, so an installed original still wins.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

OLD_NAME = "txjsonrpc"
NEW_NAME = "txjsonrpc_ng"


class _AliasLoader(importlib.abc.Loader):
    """Load a module by importing its counterpart under the new name."""

    def __init__(self, target: str) -> None:
        self._target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self._target)

    def exec_module(self, module: ModuleType) -> None:
        # The target module ran when it was imported under its own name.
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Map ``txjsonrpc`` and its submodules to ``txjsonrpc_ng``."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != OLD_NAME and not fullname.startswith(OLD_NAME + "."):
            return None
        target_name = NEW_NAME + fullname[len(OLD_NAME) :]
        if importlib.util.find_spec(target_name) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(target_name))


def install_txjsonrpc_alias() -> None:
    """
    Let ``import txjsonrpc...`` find ``txjsonrpc_ng``, unless the original
    package is installed. Calling it twice is harmless.
    """
    if any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        return
    if importlib.util.find_spec(OLD_NAME) is not None:
        return
    # First in line: otherwise the path finder would load the submodules of
    # the aliased package a second time, as separate module objects.
    sys.meta_path.insert(0, _AliasFinder())
