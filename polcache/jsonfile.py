"""Reading the JSON documents polcache writes (checkpoint meta, schedules, manifests), so a file
that is truncated, binary garbage or not an object is named in one line by whichever reader met
it, never a JSONDecodeError or UnicodeDecodeError traceback."""

from __future__ import annotations

import json
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
