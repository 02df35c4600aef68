"""The VLA's two text paths side by side (batch 1, CPU): byte tokens embedded from scratch
(`policy.vla.text_encoder: bytes`, 64 prefix tokens) against the frozen MiniLM's cached sentence
embedding (`minilm`, one prefix token). Per chunk; the text path alone (a dict lookup for MiniLM);
and the one-off cost of an instruction the process has not seen (tokenize + 6-layer BERT), plus
loading the model. Also what the pretrained embedding knows before any training: MT10's held-out
paraphrases, each assigned to the task whose training paraphrases' mean embedding is nearest.

    python benchmarks/bench_vla_text.py [--calls 30] [--threads 1]

Fresh models of configs/vla_mt10.yaml's size (latency does not depend on the weights).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from bench_vla import fresh_vla
from common import RESULTS, print_table, round_robin, write_json
from polcache.envs.instructions import INSTRUCTIONS
from polcache.policy.backend import TorchBackend
from polcache.policy.language import encode_instruction

MT10 = [t for t in INSTRUCTIONS if t != "cue-reach"]


def observation(policy, text: str) -> dict[str, np.ndarray]:
    spec, rng = policy.spec, np.random.default_rng(0)
    return {"state": rng.normal(size=(1, spec.n_obs_steps, *spec.obs["state"].shape)).astype(np.float32),
            "instruction": np.repeat(encode_instruction(text, spec.obs["instruction"].shape[0])[None, None],
                                     spec.n_obs_steps, axis=1)}


def training_step(policy, batch: int = 64):
    """One loss + backward over a batch whose instructions are drawn from MT10's 50 training
    paraphrases (the MiniLM path encodes each distinct one once, during warm-up)."""
    spec, rng = policy.spec, np.random.default_rng(1)
    texts = [t for task in MT10 for t in INSTRUCTIONS[task]["train"]]
    rows = np.stack([encode_instruction(texts[i], spec.obs["instruction"].shape[0])
                     for i in rng.integers(0, len(texts), batch)])
    data = {"obs": {"state": torch.randn(batch, spec.n_obs_steps, *spec.obs["state"].shape),
                    "instruction": torch.from_numpy(np.repeat(rows[:, None], spec.n_obs_steps, axis=1))},
            "action": torch.randn(batch, spec.horizon, spec.action_dim)}

    def step():
        policy.zero_grad(set_to_none=True)
        policy.compute_loss(data).backward()

    return step


def heldout_nearest_task(encoder) -> list[dict]:
    """Per MT10 task: held-out paraphrases whose embedding is nearest its own training centroid."""
    centroids = torch.stack([torch.nn.functional.normalize(encoder.embed(INSTRUCTIONS[t]["train"]).mean(0), dim=0)
                             for t in MT10])
    rows = []
    for task in MT10:
        heldout = INSTRUCTIONS[task]["heldout"]
        nearest = [MT10[i] for i in (encoder.embed(heldout) @ centroids.T).argmax(dim=1).tolist()]
        rows.append({"task": task, "nearest_own_task": f"{sum(n == task for n in nearest)}/{len(heldout)}",
                     "misses": ", ".join(f"{h!r} -> {n}" for h, n in zip(heldout, nearest) if n != task)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "vla_text.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    minilm_vla = fresh_vla("minilm")  # the first build imports sentence-transformers and loads MiniLM
    load_s = time.perf_counter() - t0
    bytes_vla = fresh_vla("bytes")
    encoder = minilm_vla.encoder.sentence
    text = INSTRUCTIONS["push-v3"]["heldout"][0]
    backends = {"bytes": TorchBackend(bytes_vla), "minilm": TorchBackend(minilm_vla)}
    obs = {name: observation(b.policy, text) for name, b in backends.items()}
    rows_of = {name: torch.as_tensor(o["instruction"][:, -1]) for name, o in obs.items()}
    unseen = (f"{text} {i}" for i in itertools.count())  # a new text every call: never a cache hit

    @torch.no_grad()
    def text_path(name: str):
        return lambda: backends[name].policy.encoder.text_tokens(rows_of[name])

    fns = {"chunk, bytes": lambda: backends["bytes"].predict(obs["bytes"], seed=0),
           "chunk, minilm (cached instruction)": lambda: backends["minilm"].predict(obs["minilm"], seed=0),
           "text path alone, bytes": text_path("bytes"),
           "text path alone, minilm (cached: lookup + projection)": text_path("minilm"),
           "minilm cache lookup alone (seen instruction)": lambda: encoder.embed([text]),
           "new instruction, minilm (one-off encode)": lambda: encoder.compute(next(unseen))}
    for name, backend in backends.items():
        fns[f"training step at batch 64, {name}"] = training_step(backend.policy)
    times = round_robin(fns, args.calls, warmup=3)
    base = float(np.median(times["chunk, bytes"]))
    rows = [{"path": name, "median_ms": round(float(np.median(t)) * 1e3, 3),
             "p95_ms": round(float(np.percentile(t, 95)) * 1e3, 3),
             "vs_bytes_chunk": round(float(np.median(t)) / base, 3)} for name, t in times.items()]
    print(f"VLA text paths (configs/vla_mt10.yaml sizes, fresh weights): prefix tokens bytes "
          f"{bytes_vla.encoder.memory_tokens}, minilm {minilm_vla.encoder.memory_tokens}; batch 1, "
          f"{args.threads} thread(s), {args.calls} calls round robin; MiniLM import + load {load_s:.2f} s")
    print_table(rows, ["path", "median_ms", "p95_ms", "vs_bytes_chunk"])
    nearest = heldout_nearest_task(encoder)
    print("\nMiniLM, untrained on our data: held-out paraphrase -> nearest training-paraphrase centroid")
    print_table(nearest, ["task", "nearest_own_task", "misses"])
    write_json(args.json, {"threads": args.threads, "calls": args.calls, "minilm_load_s": round(load_s, 3),
                           "pin": encoder.pin.to_dict(), "rows": rows, "heldout_nearest_task": nearest})


if __name__ == "__main__":
    main()
