"""threadpoolctl sees and sets fastnorm's thread count, when threadpoolctl (3.2 or later) is installed.

threadpoolctl finds thread pools among the shared libraries a process has loaded; a library it
does not know registers a controller class with ``threadpoolctl.register``. fastnorm's controller
matches fastnorm's own extension module and reads and sets the count through
``get_num_threads`` / ``set_num_threads``, so ``with threadpool_limits(1):`` limits fastnorm as
it limits BLAS and OpenMP, and ``threadpool_info()`` lists it.

threadpoolctl stays optional and ``import fastnorm`` does not import it: if it is imported
already, the controller is registered at once; otherwise a finder on ``sys.meta_path`` waits for
its first import and registers the controller as soon as threadpoolctl's module has run.
"""
from __future__ import annotations

import importlib.abc
import os
import sys
from types import ModuleType
from typing import Any

from . import _core, _threads

_registered_with: ModuleType | None = None


def _controller_class(threadpoolctl: ModuleType) -> type:
    from ._config import installed_version

    class FastnormController(threadpoolctl.LibController):  # type: ignore[name-defined,misc]
        """fastnorm's thread count, for threadpoolctl."""

        user_api = "fastnorm"
        internal_api = "fastnorm"
        # threadpoolctl compares lower-cased file names; another package's `_core` module of the
        # same Python ABI has the same name, so a symbol of fastnorm's kernels must be there too.
        filename_prefixes = (os.path.basename(_core.__file__).lower(),)
        check_symbols = ("fn_parallel_for",)

        def get_num_threads(self) -> int:
            return _threads.get_num_threads()

        def set_num_threads(self, num_threads: int) -> None:
            _threads.set_num_threads(int(num_threads))

        def get_version(self) -> str:
            return installed_version()

    return FastnormController


def register(threadpoolctl: ModuleType) -> None:
    """Register fastnorm's controller with this threadpoolctl module (once; skipped before 3.2,
    which has no ``register``)."""
    global _registered_with
    if _registered_with is threadpoolctl or not hasattr(threadpoolctl, "register"):
        return
    threadpoolctl.register(_controller_class(threadpoolctl))
    _registered_with = threadpoolctl


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when threadpoolctl is about to be imported, it has the other finders
    find it and makes the loader register fastnorm's controller right after the module ran."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "threadpoolctl":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run_module = spec.loader.exec_module

                def exec_module(module: ModuleType) -> None:
                    run_module(module)
                    _remove_hook()
                    register(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


_hook = _RegisterOnImport()


def _remove_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register now if threadpoolctl is imported, else when it is."""
    module = sys.modules.get("threadpoolctl")
    if module is not None:
        register(module)
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def status() -> str:
    """For show_config: whether threadpoolctl controls fastnorm's threads."""
    if _registered_with is not None:
        return f"registered (threadpoolctl {getattr(_registered_with, '__version__', '?')})"
    if "threadpoolctl" in sys.modules:
        return "not registered (threadpoolctl older than 3.2)"
    from importlib import metadata

    try:
        metadata.version("threadpoolctl")
    except metadata.PackageNotFoundError:
        return "not installed"
    return "registers when threadpoolctl is imported"
