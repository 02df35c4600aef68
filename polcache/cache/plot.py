"""A picture of a schedule: every block's similarity matrix with the chosen update steps marked."""

from __future__ import annotations

import math
from pathlib import Path

from polcache.cache.schedule import Schedule


def plot_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Grid of small heatmaps (one per block, layers as rows). On each, the row segments that
    serve the steps of a segment are drawn as white lines, update steps as dots on the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(schedule.update_steps)
    sim = schedule.calibration.similarity
    K = schedule.steps
    cols = 3 if len(names) % 3 == 0 else min(6, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.0 * rows), squeeze=False)
    kept = schedule.kept_similarity()
    image = None
    for ax, (i, name) in zip(axes.flat, enumerate(names)):
        image = ax.imshow(sim[i], vmin=-1.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        steps = schedule.update_steps[name]
        for start, end in zip(steps, steps[1:] + [K]):
            ax.plot([start, end - 1], [start, start], color="white", linewidth=0.8)
        ax.scatter(steps, steps, s=5, color="red", zorder=3)
        star = " *" if name in schedule.bu_selected else ""
        ax.set_title(f"{name}{star} ({len(steps)}, {kept[name]:.3f})", fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{schedule.method}: {schedule.sampler} K={K}, budget {schedule.budget}, "
                 f"BU blocks {schedule.bu_blocks} (*); title: updates, mean similarity kept", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.5, label="cosine similarity (row step a, column t)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
