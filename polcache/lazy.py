"""Lazy package exports: a package names what it exports and from which module, and a name is
imported on first use, so importing the package stays cheap (no torch, no MuJoCo)."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The module-level `__getattr__` of `package` for `exports` (name -> defining module)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = import_module(exports[name])
        except AttributeError as exc:  # raised while importing (a library without a symbol it needs):
            # passed on as is, `from package import name` would report only "cannot import name"
            raise ImportError(f"{package}.{name}: importing {exports[name]} failed: {exc}") from exc
        return getattr(module, name)

    return __getattr__
