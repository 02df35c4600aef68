"""The fields a schedule file may hold: every key `save_schedule` has written (version 1 lacked
objective, model.family, model.layers and model.kinds). Any other is a typo or another program's
file, refused rather than ignored. Kept apart from polcache.cache.schedule, which needs torch, so
that an exported policy served without torch names a hand-added field too."""

from __future__ import annotations

from polcache.errors import cut_short

SCHEDULE_KEYS = {"": {"format", "version", "method", "objective", "model", "sampler", "budget", "bu_blocks",
                      "force_last", "bu_selected", "block_evaluations", "block_evaluations_uncached", "update_steps",
                      "created", "code_version", "calibration"},
                 "model.": {"hash", "family", "blocks", "layers", "kinds"}, "sampler.": {"kind", "steps"},
                 "calibration.": {"source", "samples", "seed", "l1", "similarity", "distance", "sensitivity"}}


def check_schedule_keys(doc: dict) -> None:
    """ValueError naming the first field of a schedule document that no schedule holds."""
    for prefix, known in SCHEDULE_KEYS.items():
        obj = doc.get(prefix[:-1]) if prefix else doc
        unknown = [k for k in obj if k not in known] if isinstance(obj, dict) else []
        if unknown:
            raise ValueError(f"unknown field {cut_short(repr(prefix + unknown[0]))}, not one `polcache calibrate` "
                             f"writes")
