"""Reading the JSON documents polcache writes (checkpoint meta, schedules, manifests), so a file
that is truncated, binary garbage or not an object is named in one line by whichever reader met
it, never a JSONDecodeError or UnicodeDecodeError traceback; and writing standard JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from polcache.errors import PolcacheError


def read_json_object(path: str | Path, error: type[PolcacheError] = PolcacheError) -> dict[str, Any]:
    """The JSON object stored at `path`; anything else raises `error` naming the file and why."""
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as exc:
        raise error(f"{path}: unreadable ({exc.strerror or exc})") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{path}: not valid JSON (truncated?)") from None
    except RecursionError:  # '[' * 100000: nested deeper than the parser goes; nothing polcache writes
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: not a JSON object")
    return doc


def standard_json(value: Any, indent: int | None = None) -> str:
    """`value` as standard JSON: every NaN or infinite float (nested in dicts and lists) as null. Python
    writes NaN, which jq, browsers and most other readers refuse."""
    return json.dumps(_nulled(value), indent=indent, allow_nan=False)


def _nulled(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulled(v) for v in value]
    return value
