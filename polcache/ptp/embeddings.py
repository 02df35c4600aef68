"""Per-frame embeddings of a frozen observation encoder, stored as a dataset.

A long-context head sees K frames per sample; running the encoder (a ResNet per camera) on all
of them at every training step is most of the cost. The encoder of a policy is per frame, so
`embed_dataset` runs it once over every frame of a dataset and writes the result as an ordinary
polcache dataset whose only observation key is `embedding` (one vector per frame, float32),
with the same actions and episode boundaries. The store is independent of K and stride; its
attributes name the encoder that made it by hash, so a fine-tune with another encoder is refused.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from polcache.atomic import output_lock
from polcache.config import EMBEDDING_KEY
from polcache.data import Episode, EpisodeStore, open_dataset, write_dataset
from polcache.data.store import is_dataset, other_tasks
from polcache.errors import DatasetError
from polcache.outputs import check_output
from polcache.policy.policy import DiffusionPolicy

KEY = EMBEDDING_KEY
ATTR = "embedding"


def encoder_hash(policy: DiffusionPolicy) -> str:
    """sha256 of what decides a frame's embedding: observation keys and shapes, encoder config and
    weights, and the state normaliser (state is normalised before it is encoded)."""
    h = hashlib.sha256()
    ident = {"obs": {k: v.to_dict() for k, v in policy.spec.obs.items()}, "state_hidden": policy.cfg.state_hidden,
             "image": vars(policy.cfg.image)}
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    tensors = {f"encoder.{k}": v for k, v in policy.encoder.state_dict().items()}
    if "state" in policy.spec.obs:
        tensors.update({f"normalizer.{k}": v for k, v in policy.normalizer.stats("state").items()})
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().float().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def is_embedding_store(path: Path) -> bool:
    """True for a store that `embed_dataset` wrote (the only dataset ptp embed may replace)."""
    try:
        return is_dataset(path) and isinstance(EpisodeStore.open(path).attrs.get(ATTR), dict)
    except DatasetError:  # a damaged store is still one: replacing it loses nothing
        return True


def check_embedding_output(out: str | Path, dataset: str | Path, flag: str | None = None) -> Path:
    """Refuse, before embedding, an --out that is the input or an existing dataset of demonstrations."""
    return check_output(out, "an embedding store from `polcache ptp embed`", folder=True, ours=is_embedding_store,
                        flag=flag, inputs=[dataset], error=DatasetError, whole=True)


def check_embeddable(policy: DiffusionPolicy, dataset: str | Path) -> EpisodeStore:
    """The opened dataset when the policy's per-frame encoder takes its observations; else one line
    naming the mismatch, before any frame is encoded."""
    if not policy.encoder.per_frame:  # a VLA encodes all frames (and the instruction) together
        raise DatasetError(f"the checkpoint is a {policy.identity()['family']} policy, whose encoder reads the frames "
                           f"together; ptp embed stores per-frame features (a dp-t policy's encoder)")
    store = open_dataset(dataset)
    store.check_observations({k: policy.spec.obs[k] for k in policy.obs_keys}, str(dataset), "the checkpoint's encoder",
                             f" (a checkpoint of another task, {policy.spec.task or 'unnamed'}?)")
    if (recorded := other_tasks(policy.spec.task, store.attrs)) is not None:  # as calibrate says it: allowed
        print(f"warning: the checkpoint's encoder was trained on {policy.spec.task}, {dataset} was recorded on "
              f"{recorded}: ptp finetune would train on that data with this encoder", file=sys.stderr)
    return store


@torch.no_grad()
def embed_dataset(policy: DiffusionPolicy, dataset: str | Path, out: str | Path, checkpoint: str = "",
                  batch_size: int = 256, progress: bool = True) -> Path:
    """Write the per-frame embeddings of every frame of `dataset` to `out` (atomically; a second
    process embedding into `out` meanwhile is refused at its start)."""
    check_embedding_output(out, dataset)
    with output_lock(out):
        return _embed(policy, dataset, out, checkpoint, batch_size, progress)


def _embed(policy: DiffusionPolicy, dataset: str | Path, out: str | Path, checkpoint: str, batch_size: int,
           progress: bool) -> Path:
    policy = policy.eval()
    device = next(policy.parameters()).device
    store = check_embeddable(policy, dataset)
    arrays = {k: store.array(k) for k in policy.obs_keys}
    n = len(store.array("action"))
    feats = np.empty((n, policy.encoder.feature_dim), np.float32)
    for i in tqdm(range(0, n, batch_size), disable=not progress, desc="embed", unit="batch"):
        obs = {k: torch.from_numpy(np.array(a[i:i + batch_size]))[:, None].to(device) for k, a in arrays.items()}
        feats[i:i + batch_size] = policy.frame_features(obs)[:, 0].float().cpu().numpy()
    actions = np.asarray(store.array("action"), np.float32)
    ends, starts = store.episode_ends, store.episode_starts
    episodes = [Episode(obs={KEY: feats[s:e]}, action=actions[s:e], task=task)  # each episode's own task
                for s, e, task in zip(starts, ends, store.tasks)]
    # absolute paths: `ptp finetune` reads both from the store, from whatever directory it runs in
    attrs = {ATTR: {"encoder_hash": encoder_hash(policy), "checkpoint": str(Path(checkpoint).resolve()) if checkpoint
                    else "", "source": str(Path(dataset).resolve()),
                    "feature_dim": int(feats.shape[1]), "dtype": "float32", "obs_keys": list(policy.obs_keys)}}
    for name in ("task", "tasks_recorded", "fps"):  # what ptp finetune checks its config's task against
        if name in store.attrs:
            attrs[name] = store.attrs[name]
    write_dataset(out, episodes, attrs)
    return Path(out)


def embedding_info(store: EpisodeStore, where: str) -> dict:
    """The store's embedding attributes, refused when it is not an embedding store."""
    info = store.attrs.get(ATTR)
    if not isinstance(info, dict) or KEY not in store.obs_keys or "encoder_hash" not in info:
        raise DatasetError(f"{where} is not an embedding store from `polcache ptp embed`")
    return info
