"""Calibration: run uncached sampling on real observations and measure, per block, how alike
its residual delta is across denoising steps (cosine similarity, the paper's measure, and
squared distance), and how strongly an error in it at each step reaches the actions.

The deltas are observed through a recording store handed to the policy's `sample` (the
same store interface the cached executor writes to), not through hooks. Observations come
from the checkpoint's training dataset when it exists, else from environment resets.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from polcache.cache.errors import CacheError
from polcache.cache.schedule import (FORMAT, Calibration, Schedule, build_schedule, model_hash, save_schedule,
                                     schedule_text)
from polcache.outputs import check_output, json_kind
from polcache.cache.sensitivity import delta_sensitivity
from polcache.config import INSTRUCTION_KEY, INSTRUCTION_WIDTH_SETTING, ExperimentConfig
from polcache.policy.executor import DeltaStore
from polcache.cache.protocol import CacheTarget
from polcache.policy.samplers import Sampler

if TYPE_CHECKING:
    from polcache.data import EpisodeStore


class RecordingStore(DeltaStore):
    """Keeps every delta of one uncached chunk: trace[i][k] is block i's delta at step k, (B, D)."""

    def __init__(self, n_blocks: int, steps: int, on_step: Callable[[], None] | None = None):
        super().__init__(n_blocks)
        self.trace: list[list[torch.Tensor | None]] = [[None] * steps for _ in range(n_blocks)]
        self.on_step = on_step

    def put(self, i: int, k: int, delta: torch.Tensor) -> None:
        self.trace[i][k] = delta.reshape(delta.shape[0], -1)
        if self.on_step is not None and i == len(self.trace) - 1:
            self.on_step()


@torch.no_grad()
def calibrate(policy: CacheTarget, sampler: Sampler, observations: dict[str, torch.Tensor], source: str = "",
              batch_size: int = 8, seed: int = 0, progress: bool = False,
              sensitivity_samples: int = 8) -> Calibration:
    """Per-block K x K mean cosine similarity and squared distance, and mean pairwise L1 distance,
    of the deltas, averaged over the N observation histories in `observations` (key -> (N, To, ...));
    plus the per-step sensitivity of the actions to each delta, from the first
    `sensitivity_samples` of them (0: skip, and the error-bound objective is unavailable)."""
    n_obs = int(next(iter(observations.values())).shape[0])
    if n_obs < 1:
        raise CacheError("calibration needs at least one observation")
    names = [b.name for b in policy.cache_blocks]
    n, K = len(names), sampler.num_steps
    dev = next(policy.parameters()).device
    sim = np.zeros((n, K, K))
    dist = np.zeros((n, K, K))
    l1 = np.zeros(n)
    gen = torch.Generator(device=dev).manual_seed(seed)
    n_sens = min(sensitivity_samples, n_obs)
    # progress: per batch, K sampling steps then n per-block statistics; then one per sensitivity sample
    bar = tqdm(total=(K + n) * -(-n_obs // batch_size) + n_sens, desc="calibrate", disable=not progress)
    for start in range(0, n_obs, batch_size):
        batch = {k: v[start:start + batch_size].to(dev) for k, v in observations.items()}
        store = RecordingStore(n, K, bar.update)
        policy.sample(policy.encode(batch), sampler, None, gen, store)
        for i in range(n):
            x = torch.stack(store.trace[i], dim=1).float()  # (B, K, D)
            u = F.normalize(x, dim=-1)
            sim[i] += (u @ u.transpose(1, 2)).sum(0).double().cpu().numpy()
            dist[i] += (torch.cdist(x, x) ** 2).sum(0).double().cpu().numpy() / x.shape[-1]
            if K > 1:  # mean over step pairs a != t of the per-element mean |delta_a - delta_t|
                l1[i] += torch.cdist(x, x, p=1).sum().item() / (x.shape[-1] * K * (K - 1))
            store.trace[i] = []
            bar.update()
    sens = None
    if n_sens > 0:
        feats = policy.encode({k: v[:n_sens].to(dev) for k, v in observations.items()})
        sens = delta_sensitivity(policy, sampler, feats, gen, bar.update)
    bar.close()
    return Calibration(block_names=names, similarity=sim / n_obs, l1=l1 / n_obs, samples=n_obs, source=source,
                       seed=seed, distance=dist / n_obs, sensitivity=sens,
                       layer_kind=[(b.layer, b.kind) for b in policy.cache_blocks])


DEFAULT_BU_BLOCKS = 5  # blocks widened by Bubbling Union: the paper's choice in simulation
MAX_SAMPLES = 4096  # calibration observations: the scores settle long before (the default is 32)
CHECK_OBSERVATIONS = 16  # held out, to check a new schedule against uncached sampling
HELD_OUT_SEED = 10_000  # their seed's offset: other environment resets (seeds) than any calibration's


def calibration_observations(policy: CacheTarget, cfg: ExperimentConfig, samples: int, seed: int = 0,
                             checkpoint: str | Path | None = None, dataset: str | Path | None = None,
                             warn: bool = True,
                             held_out_of: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """`samples` observation histories (key -> (N, To, ...)) and a description of where they came
    from: random windows of `dataset` if given, else of the training dataset if it is found (see
    `polcache.data.training_set`) and is the data the checkpoint was trained on, else environment resets (the reset
    observation repeated To times, as at the start of an episode). `held_out_of`: the (samples, seed)
    of a calibration whose windows these must not repeat (resets: give a seed past its seeds); the
    rows may then be fewer than asked, or none."""
    if not 1 <= samples <= MAX_SAMPLES:  # each is a simulator reset where no dataset is found: 1e8 never ends
        raise CacheError(f"--samples (calibration observations) must be in 1..{MAX_SAMPLES}, got {samples}")
    keys, To = policy.obs_keys, policy.cfg.n_obs_steps
    if dataset is not None and not Path(dataset).exists():
        raise CacheError(f"--dataset {dataset}: not found")
    from polcache.data import SequenceDataset, open_dataset
    from polcache.data.store import other_tasks
    from polcache.data.training_set import dataset_candidates, training_data

    width = policy.spec.obs[INSTRUCTION_KEY].shape[0] if INSTRUCTION_KEY in keys else 0  # a LeRobot root's tasks

    def open_store(path: Path) -> "EpisodeStore":
        return open_dataset(path, instruction_bytes=width, instruction_setting=INSTRUCTION_WIDTH_SETTING)

    passed: list[str] = []
    if dataset is None:
        dataset, store, passed = training_data(policy, cfg, dataset_candidates(cfg.dataset, checkpoint), open_store)
    else:
        dataset, store = Path(dataset), open_store(Path(dataset))
        store.check_observations({k: policy.spec.obs[k] for k in keys}, str(dataset), "the checkpoint")
        if warn and (recorded := other_tasks(policy.spec.task, store.attrs)) is not None:  # allowed, as eval allows it
            print(f"warning: the checkpoint's policy was trained on {policy.spec.task}, --dataset {dataset} was "
                  f"recorded on {recorded}", file=sys.stderr)
    if store is not None:
        ds = SequenceDataset(store, policy.cfg.horizon, To, keys=keys, obs_stride=policy.cfg.obs_stride,
                             frame_mode=policy.cfg.frame_mode)
        pool = np.arange(len(ds))
        if held_out_of is not None:  # not the calibration's windows (drawn again as it drew them)
            taken = np.random.default_rng(held_out_of[1]).choice(len(ds), size=min(held_out_of[0], len(ds)),
                                                                 replace=False)
            pool = np.setdiff1d(pool, taken)
        idx = np.sort(np.random.default_rng(seed).choice(pool, size=min(samples, len(pool)), replace=False))
        windows = [ds[int(i)]["obs"] for i in idx]
        obs = {k: torch.stack([w[k] for w in windows]) if windows else torch.empty(0) for k in keys}
        short = f", all it has of the {samples} asked" if len(idx) < samples else ""
        return obs, f"dataset {dataset}: {len(idx)} random windows (seed {seed}{short})"
    task = cfg.task or policy.spec.task
    # found by the checkpoint's dataset path but other data (another recording there, another project's): said
    other = f"{'; '.join(passed)}: found from the checkpoint's dataset {cfg.dataset}, not the data it was trained on"
    if not task:
        from polcache.policy.checkpoint import no_task_hint

        found = other if passed else f"dataset {cfg.dataset or '(none)'} not found"
        raise CacheError(f"no calibration observations: {found}, and the checkpoint names no task"
                         f"{no_task_hint(checkpoint) if checkpoint is not None else ''}: pass --dataset PATH")
    if passed and warn:
        print(f"warning: {other}: calibrating on {task} environment resets (pass --dataset PATH for a dataset)",
              file=sys.stderr)
    from polcache.envs import make_env  # simulation is an optional extra

    cams = tuple(k[len("image_"):] for k in keys if k.startswith("image_"))
    size = policy.spec.obs[f"image_{cams[0]}"].shape[0] if cams else 96
    env = make_env(task, seed=seed, image=bool(cams), cameras=cams or None, image_size=size)
    try:
        frames = [env.reset(seed=seed + i) for i in range(samples)]
    finally:
        env.close()
    if INSTRUCTION_KEY in keys:  # a language-conditioned policy follows the task's training instructions
        from polcache.envs.instructions import instruction_array

        length = policy.spec.obs[INSTRUCTION_KEY].shape[0]
        frames = [{**f, INSTRUCTION_KEY: instruction_array(task, "train", i, length)} for i, f in enumerate(frames)]
    obs = {k: torch.as_tensor(np.stack([np.repeat(f[k][None], To, axis=0) for f in frames])) for k in keys}
    return obs, f"{task} environment resets: seeds {seed}..{seed + samples - 1}"


def check_schedule_output(out: str | Path, flag: str | None = "--out") -> tuple[Path, Path]:
    """The schedule path and its heatmap's (the same name, .png), refused before calibration when
    the schedule is not a .json name, or either would replace something calibrate did not write:
    an existing OUT.png is replaced only together with the schedule OUT it belongs to."""
    out = check_output(out, "a cache schedule (JSON)", folder=False, ours=lambda p: json_kind(p, FORMAT), flag=flag,
                       error=CacheError)
    if out.suffix.lower() != ".json":
        raise CacheError(f"{flag} {out}: expected a .json name (the heatmap is written beside it as .png)")
    replacing = out.exists()
    png = check_output(out.with_suffix(".png"), f"the heatmap of schedule {out.name}", folder=False,
                       ours=lambda _: replacing, flag=f"{flag} heatmap" if flag else None, error=CacheError)
    return out, png


def calibrate_checkpoint(checkpoint: str | Path, out: str | Path, budget: int, bu_blocks: int | None = None,
                         sampler: str | None = None, steps: int | None = None, samples: int = 32,
                         method: str = "bac", force_last: bool = True, seed: int = 0, batch_size: int = 8,
                         device: str = "cpu", progress: bool = True, objective: str = "error-bound",
                         dataset: str | Path | None = None) -> Schedule:
    """Calibrate a checkpoint, solve its schedule, and write it to `out` (plus a heatmap PNG beside it);
    `out` is checked before calibrating (see check_schedule_output). Observations come from `dataset`
    or the training data (see `calibration_observations`). Without matplotlib (an install without the
    report or sim extra) the schedule is written without its heatmap."""
    import importlib.util

    from polcache.atomic import atomic_write_together
    from polcache.cache.plot import schedule_png
    from polcache.signals import interrupts_held
    from polcache.export.manifest import refuse_exported
    from polcache.policy.checkpoint import load_policy
    from polcache.policy.device import resolve_device

    out, png = check_schedule_output(out)
    if bu_blocks is not None and method != "bac":  # it was ignored without a word
        raise CacheError(f"--bu-blocks applies to --method bac (Bubbling Union) only, not {method}")
    refuse_exported(checkpoint, "calibrate the checkpoint it was exported from")
    policy, cfg, _ = load_policy(checkpoint, resolve_device(device))
    smp = policy.sampler(sampler, steps)
    K, n = smp.num_steps, len(policy.cache_blocks)
    if not 1 <= budget <= K:
        raise CacheError(f"--budget must be in 1..{K} (the number of denoising steps), got {budget}")
    if bu_blocks is None:  # the paper's 5, or every block of a smaller model
        bu_blocks = min(DEFAULT_BU_BLOCKS, n)
    if method == "bac" and not 0 <= bu_blocks <= n:
        raise CacheError(f"--bu-blocks must be in 0..{n} (the number of blocks), got {bu_blocks}")
    obs, source = calibration_observations(policy, cfg, samples, seed, checkpoint, dataset)
    calib = calibrate(policy, smp, obs, source, batch_size, seed, progress)
    schedule = build_schedule(calib, method, budget, bu_blocks, force_last, model_hash(policy), smp.kind, objective,
                              policy.identity()["family"])
    # the picture is drawn before anything is replaced (Ctrl-C then leaves the old pair as it was), and the
    # schedule and its picture are written together, interrupts held: never one without the other
    picture = schedule_png(schedule) if importlib.util.find_spec("matplotlib") is not None else None
    with interrupts_held():
        if picture is None:
            save_schedule(schedule, out)
            png.unlink(missing_ok=True)  # not beside another schedule
        else:  # a full disk while writing either leaves the old pair as it was
            atomic_write_together([(out, schedule_text(schedule).encode()), (png, picture)])
    return schedule


def check_schedule(checkpoint: str | Path, schedule: Schedule, check: int = CHECK_OBSERVATIONS, samples: int = 32,
                   seed: int = 0, device: str = "cpu", dataset: str | Path | None = None) -> dict[str, float]:
    """A written schedule against uncached sampling on `check` observations its calibration (of
    `samples` at `seed`) did not use: other resets (seed + HELD_OUT_SEED), or windows of the dataset
    it did not draw. `polcache.cache.check.plan_deviation`'s figures and `observations`, the number
    checked (a small dataset may have fewer, or none left)."""
    from polcache.cache.check import plan_deviation
    from polcache.policy.checkpoint import load_policy
    from polcache.policy.device import resolve_device

    policy, cfg, _ = load_policy(checkpoint, resolve_device(device))
    held, _ = calibration_observations(policy, cfg, check, seed + HELD_OUT_SEED, checkpoint, dataset, warn=False,
                                       held_out_of=(samples, seed))
    dev = next(policy.parameters()).device
    with torch.no_grad():
        feats = [policy.encode({k: v[i:i + 1].to(dev) for k, v in held.items()})
                 for i in range(len(next(iter(held.values()))))]
    if not feats:
        return {"observations": 0}
    plan = schedule.to_plan()
    return {**plan_deviation(policy, feats, policy.sampler(schedule.sampler, schedule.steps), plan),
            "observations": len(feats)}
