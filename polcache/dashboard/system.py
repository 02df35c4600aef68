"""This machine's CPU load and GPU utilisation, sampled by the dashboard beside the metrics.

CPU: psutil where installed, else the aggregate line of /proc/stat (busy share of the jiffies
since the previous sample). GPU: nvidia-smi where present; None elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess


class SystemSampler:
    def __init__(self):
        try:
            import psutil
        except ImportError:
            psutil = None
        self._psutil = psutil
        self._last: tuple[int, int] | None = None
        self._nvidia_smi = shutil.which("nvidia-smi")
        self.sample_cpu()  # the first reading only sets the baseline

    def sample_cpu(self) -> float | None:
        if self._psutil is not None:
            return float(self._psutil.cpu_percent(interval=None))
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle, total = fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)
        last, self._last = self._last, (idle, total)
        if last is None or total == last[1]:
            return None
        return 100.0 * (1.0 - (idle - last[0]) / (total - last[1]))

    def sample_gpu(self) -> float | None:
        """Mean utilisation over the GPUs nvidia-smi lists."""
        if self._nvidia_smi is None:
            return None
        try:
            out = subprocess.run([self._nvidia_smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=2).stdout
            values = [float(line) for line in out.split() if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return sum(values) / len(values) if values else None
