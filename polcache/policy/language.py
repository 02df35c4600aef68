"""Instructions as observations: a language-conditioned policy reads its instruction from the
observation key `instruction`, a fixed-length uint8 array of the instruction's UTF-8 bytes
(zero-padded). As an array it travels the same path as `state` and images (recorded datasets,
sequence windows, the server's per-robot history, exported graphs) and the policy's own text
path turns bytes into tokens, so no tokenizer runs outside the model.
"""

from __future__ import annotations

import numpy as np

from polcache.errors import PolcacheError
from polcache_client.protocol import ProtocolError, instruction_bytes


class InstructionError(PolcacheError):
    """An instruction that cannot be encoded (too long, not valid UTF-8, not text)."""


def encode_instruction(text: str | bytes, length: int, field: str = "instruction") -> np.ndarray:
    """`text` -> (length,) uint8: its UTF-8 bytes, zero-padded. Refuses, naming `field`, what is not
    valid UTF-8, contains a NUL byte (the padding) or takes more than `length` bytes (the client's
    `instruction_bytes`, so a robot refuses locally what the server would)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InstructionError(f"{field}: not valid UTF-8 (byte {exc.start})") from None
    try:
        raw = instruction_bytes(text, length, field)
    except ProtocolError as exc:
        raise InstructionError(str(exc)) from None
    out = np.zeros(length, dtype=np.uint8)
    out[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def decode_instruction(array: np.ndarray) -> str:
    """The text of an encoded instruction (for logs and reports)."""
    raw = np.asarray(array, dtype=np.uint8).tobytes().rstrip(b"\0")
    return raw.decode("utf-8", errors="replace")
