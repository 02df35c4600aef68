"""One reading of `--device` for every command: cpu, cuda, cuda:N or auto.

Asked-for hardware that is missing is a user error with one clear line, not a torch traceback
from deep inside the first tensor copy."""

from __future__ import annotations

import re

import torch

from polcache.errors import DeviceError


def resolve_device(spec: str | torch.device = "cpu", setting: str = "--device") -> torch.device:
    """The torch device `spec` names, checked against this machine; refusals name `setting` (the
    command's flag, or a config key such as launch's server.device)."""
    cpu = f"{setting} cpu" if setting.startswith("-") else f"{setting}=cpu"
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise DeviceError(f"{setting} {spec!r}: expected cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise DeviceError(f"{setting} {spec}: CUDA is not available ({why}); use {cpu}")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(f"{setting} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return torch.device("cuda", index)


def to_device(batch, device: torch.device):
    """A (nested dict of) tensors on `device`; non-blocking where the source is pinned."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)
