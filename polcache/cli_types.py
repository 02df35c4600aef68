"""Argument types shared by every subcommand, so bad numbers get the same one-line error."""

from __future__ import annotations

import argparse


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0 or x != x or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return x


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


DEVICE_HELP = "compute device: cpu, cuda, cuda:N or auto (cuda when available, else cpu); default cpu"
