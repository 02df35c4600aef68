"""Lazy package exports: a package names what it exports and from which module, and a name is
imported on first use, so importing the package stays cheap (no torch, no MuJoCo)."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

from polcache.errors import PolcacheError


class LazyImportError(ImportError, PolcacheError):
    """A lazily exported name whose module failed to import because of the environment (a library
    without a symbol it needs): still an ImportError, and one line from the command line."""


def lazy_exports(package: str, exports: dict[str, str], hint: str = "") -> Callable[[str], Any]:
    """The module-level `__getattr__` of `package` for `exports` (name -> defining module); `hint`
    is added to the error where a module fails to import that way (what to install or set)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = import_module(exports[name])
        except AttributeError as exc:  # raised while importing (a library without a symbol it needs):
            # passed on as is, `from package import name` would report only "cannot import name"
            raise LazyImportError(f"{package}.{name}: importing {exports[name]} failed: {exc}{hint}") from exc
        return getattr(module, name)

    return __getattr__
