"""A picture of a schedule: every block's similarity matrix with the chosen update steps marked."""

from __future__ import annotations

import io

from polcache.cache.schedule import Schedule
from polcache.policy.blocks import CA, FFN, SA


def schedule_png(schedule: Schedule) -> bytes:
    """Grid of small heatmaps, one per block (columns: layers, rows: sa/ca/ffn), as PNG bytes. On each,
    the row segments that serve the steps of a segment are white lines, update steps red dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(schedule.update_steps)
    sim = schedule.calibration.similarity
    K = schedule.steps
    where = schedule.calibration.layer_kind
    known = (SA, CA, FFN)  # DP-T's kinds first, any other family's after them
    kinds = sorted({kind for _, kind in where}, key=lambda k: (known.index(k) if k in known else len(known), k))
    cols = max(layer for layer, _ in where) + 1
    fig, axes = plt.subplots(len(kinds), cols, figsize=(1.9 * cols + 1.2, 2.0 * len(kinds)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    kept = schedule.kept_similarity()
    image = None
    for i, (name, (layer, kind)) in enumerate(zip(names, where)):
        ax = axes[kinds.index(kind), layer]
        ax.axis("on")
        image = ax.imshow(sim[i], vmin=-1.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        steps = schedule.update_steps[name]
        for start, end in zip(steps, steps[1:] + [K]):
            ax.plot([start, end - 1], [start, start], color="white", linewidth=0.8)
        ax.scatter(steps, steps, s=5, color="red", zorder=3)
        star = " *" if name in schedule.bu_selected else ""
        ax.set_title(f"{name}{star} ({len(steps)}, {kept[name]:.3f})", fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{schedule.method} ({schedule.objective} objective): {schedule.sampler} K={K}, "
                 f"budget {schedule.budget}, BU blocks {schedule.bu_blocks} (*); title: updates, mean similarity kept", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.5, label="cosine similarity (row step a, column t)")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()
