"""What the server measures per request and per refused message (see polcache_client.records
for the record convention: `counters` accumulate, `summaries` are distributions)."""

from __future__ import annotations

from typing import ClassVar

import msgspec


class RequestRecord(msgspec.Struct, frozen=True):
    kind: ClassVar[str] = "request"
    counters: ClassVar[tuple[str, ...]] = ("requests", "superseded", "deadline_miss")
    summaries: ClassVar[tuple[str, ...]] = ("decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "postprocess_ms",
                                            "encode_ms", "total_ms", "queue_depth", "batch_size")

    t: float
    robot: str
    epoch: int
    seq: int
    decode_ms: float
    preprocess_ms: float
    queue_ms: float  # waiting for the inference worker
    inference_ms: float
    postprocess_ms: float
    encode_ms: float
    total_ms: float  # receipt to reply
    queue_depth: int  # robots with an observation waiting when this one was dispatched
    batch_size: int = 1  # robots whose chunks one inference computed together with this one (1: alone)
    requests: int = 1
    superseded: int = 0  # older observations of this robot replaced while it waited
    deadline_miss: bool = False


# The `robot` of refused messages from connections that never shook hands: they have no name, and
# their session ids (hex) read as robots on the dashboard; the server's log line names the session.
NO_HANDSHAKE = "(no handshake)"


class ErrorRecord(msgspec.Struct, frozen=True):
    kind: ClassVar[str] = "error"
    counters: ClassVar[tuple[str, ...]] = ("errors",)
    summaries: ClassVar[tuple[str, ...]] = ()

    t: float
    robot: str
    code: str
    errors: int = 1
