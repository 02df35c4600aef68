"""Which optional extra of pyproject.toml brings each optional library, so a command that needs one
on an install without it says what to install in one line (polcache.cli), not a traceback."""

from __future__ import annotations

EXTRAS = {"matplotlib": "report", "mujoco": "sim", "metaworld": "sim", "gymnasium": "sim", "imageio": "sim",
          "onnx": "export", "onnxruntime": "export", "pyarrow": "lerobot", "av": "lerobot", "ray": "cluster"}


def install_hint(module: str) -> str:
    """How to install the extra that brings `module` (a top-level module name of EXTRAS)."""
    return f"pip install -e '.[{EXTRAS[module]}]'"


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line error for an optional library that is not installed; None for any other module
    (a missing module of polcache itself is a bug, shown as one)."""
    module = (exc.name or "").partition(".")[0]
    if module not in EXTRAS:
        return None
    return f"this command needs {module}, which is not installed: {install_hint(module)}"
