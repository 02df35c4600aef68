"""ONNX graphs of one DP-T policy, one sampler, one step count and one cache plan.

Three graphs, so that a chunk costs one encoder run and K step runs and no Python per block:

- `encoder`: raw observation history (every key (B, To, ...), state normalised inside) ->
  `obs_kv` (n_ca, 2, B, heads, To, head_dim), every cross-attention block's observation keys
  and values, computed once per chunk.
- `step`: (x, k, obs_kv, deltas, noise) -> (x_next, deltas_out). Constants inside: the plan
  as a (K, n_blocks) bool "compute" table, the time token's keys/values of every step for every
  cross-attention block (they depend only on the weights and the sampler) and the sampler's
  coefficient tables. The graph gathers row k, embeds x, and for block i runs an `If` on
  compute[k, i]: its then-branch is the block's own nodes (the delta from the current
  residual), its else-branch the stored delta deltas[i]. Consecutive blocks whose column of the
  table is identical (the plan always computes them together: all blocks under uniform:N or
  uncached, the blocks Bubbling Union aligned under BAC) share one If. The sum goes through the
  head and the sampler update (x0 = a x - b out, optionally clipped; x' = c x0 + d x + e out +
  s noise). The residual stream travels as (1, B, H, W), one slice of `deltas`.
- the action decode (unnormalise, slice the executed steps) is two numpy operations on
  tables in the manifest, exactly what `DiffusionPolicy.predict_action` does.

Each graph is built by tracing small wrapper modules with the TorchScript exporter
(`torch.onnx.export(dynamo=False)`, opset 17, dynamic batch axis): a "pre" piece (time K/V of
step k + observation K/V -> memory; embedded x), one piece per block and a "post" piece (head +
sampler update). `assemble_step` joins them with onnx.helper, every name prefixed per piece;
a block's nodes and initializers become its If's then-branch, which reads the residual and
the memory from the outer scope.

Why one graph with If nodes rather than one graph per distinct update pattern of the plan
(`assemble_step(..., pattern=row)`, the If replaced by the statically chosen branch, chosen per
step by the runtime; `--step-graphs patterns`): measured by `benchmarks/bench_export.py`
(BENCHMARKS.md, "Exported denoisers"), DDPM-100 on the default DP-T, one CPU thread: with a BAC
schedule (34 distinct patterns) the If graph took 49.4 ms per chunk against 53.8 ms, is 8x
smaller on disk (38 MB against 310 MB: every pattern graph carries the weights of the blocks it
computes) and exported in 0.9 s against 2.0 s; the pattern graphs won only where the plan has
very few patterns (uniform:10, 2 patterns: 39.1 against 41.0 ms), because an If's else-branch
still copies the stored deltas it passes through. So "if" is the product; "patterns" stays for measuring.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from polcache.policy.blocks import CA
from polcache.policy.policy import DiffusionPolicy
from polcache.policy.samplers import Sampler

OPSET = 17
BATCH = "B"
# "if": one step graph, blocks switched by If nodes on the plan table (the product);
# "patterns": one step graph per distinct row of the plan, chosen per step by the runtime.
STEP_MODES = ("if", "patterns")


# ---- traced pieces ---------------------------------------------------------------------------
class _Encoder(nn.Module):
    """Raw observation history -> every cross-attention block's observation keys/values."""

    def __init__(self, policy: DiffusionPolicy):
        super().__init__()
        self.policy = policy
        self.ca = [blk for blk in policy.denoiser.blocks if blk.kind == CA]

    def forward(self, *obs: torch.Tensor) -> torch.Tensor:
        feats = self.policy.encode(dict(zip(self.policy.obs_keys, obs)))
        o_mem = self.policy.denoiser.obs_memory(feats)  # (B, To, W)
        return torch.stack([torch.stack(blk.memory_kv(o_mem)) for blk in self.ca])  # (n_ca, 2, B, h, To, d)


class _Pre(nn.Module):
    """x, k, obs_kv -> embedded actions h, and memory K/V [time token of step k, obs tokens]."""

    def __init__(self, policy: DiffusionPolicy, time_kv: torch.Tensor):
        super().__init__()
        self.denoiser = policy.denoiser
        self.register_buffer("time_kv", time_kv)  # (K, n_ca, 2, 1, h, 1, d)

    def forward(self, x: torch.Tensor, k: torch.Tensor, obs_kv: torch.Tensor):
        t = self.time_kv[k]  # (n_ca, 2, 1, h, 1, d)
        t = t.expand(-1, -1, obs_kv.shape[2], -1, -1, -1)
        # the residual stream travels as (1, B, H, W), the shape of one slice of `deltas`, so that
        # stored deltas need no reshaping node between steps
        return self.denoiser.embed_actions(x).unsqueeze(0), torch.cat([t, obs_kv], dim=4)


class _Block(nn.Module):
    """One block's delta from the residual h (and, for cross-attention, its slice of the memory)."""

    def __init__(self, block: nn.Module, ca_index: int | None):
        super().__init__()
        self.block = block
        self.ca_index = ca_index

    def forward(self, h: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        h = h.squeeze(0)  # (1, B, H, W) -> (B, H, W)
        if self.ca_index is None:
            return self.block(h).unsqueeze(0)
        return self.block(h, (mem[self.ca_index, 0], mem[self.ca_index, 1])).unsqueeze(0)


class _Post(nn.Module):
    """Final residual h -> model output -> the sampler's update of x at step k."""

    def __init__(self, policy: DiffusionPolicy, sampler: Sampler):
        super().__init__()
        self.denoiser = policy.denoiser
        for name in "abcdes":
            self.register_buffer(name, getattr(sampler, name).detach().float().cpu().clone())
        self.clip = bool(sampler.clip_sample)

    def forward(self, h: torch.Tensor, x: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.denoiser.output(h.squeeze(0))
        x0 = x * self.a[k] - out * self.b[k]
        if self.clip:
            x0 = x0.clamp(-1.0, 1.0)
        return x0 * self.c[k] + x * self.d[k] + out * self.e[k] + noise * self.s[k]


def _trace(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str],
           dynamic: dict[str, dict[int, str]]) -> onnx.ModelProto:
    module.eval()  # the exporter restores the wrapper's mode afterwards, which would reach the policy
    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.TransformerEncoder's fused kernel has no ONNX form
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return onnx.load_from_string(buf.getvalue())


def time_kv_table(policy: DiffusionPolicy, sampler: Sampler) -> torch.Tensor:
    """The time token's keys/values at every step for every cross-attention block,
    (K, n_ca, 2, 1, heads, 1, head_dim); they depend only on the weights and the sampler."""
    den = policy.denoiser
    with torch.no_grad():
        t_mem = den.time_memory(sampler.timesteps.to(den.pos_emb.device))[None]  # (1, K, W)
        per_block = []
        for blk in den.blocks:
            if blk.kind == CA:
                tk, tv = blk.memory_kv(t_mem)  # (1, h, K, d)
                per_block.append(torch.stack([tk.permute(2, 0, 1, 3).unsqueeze(3),
                                              tv.permute(2, 0, 1, 3).unsqueeze(3)], dim=1))
    return torch.stack(per_block, dim=1).cpu().contiguous()  # (K, n_ca, 2, 1, h, 1, d)


@dataclass
class Pieces:
    """The traced parts of one step graph, before assembly."""

    pre: onnx.ModelProto
    blocks: list[onnx.ModelProto]
    post: onnx.ModelProto
    shapes: dict[str, list]  # symbolic shapes of the step graph's inputs


def dims(policy: DiffusionPolicy) -> dict[str, int]:
    den = policy.denoiser
    ca = [blk for blk in den.blocks if blk.kind == CA]
    return {"n_blocks": len(den.blocks), "n_ca": len(ca), "heads": ca[0].n_heads, "head_dim": ca[0].head_dim,
            "width": den.width, "horizon": policy.cfg.horizon, "action_dim": policy.action_dim,
            "memory_tokens": den.memory_tokens}


def trace_encoder(policy: DiffusionPolicy, batch: int = 2) -> onnx.ModelProto:
    """The encoder graph: every observation key (B, To, ...) -> obs_kv."""
    spec, To = policy.spec, policy.cfg.n_obs_steps
    g = torch.Generator().manual_seed(0)
    args = []
    for key in policy.obs_keys:
        s = spec.obs[key]
        if s.dtype == "uint8":
            args.append(torch.randint(0, 256, (batch, To, *s.shape), generator=g, dtype=torch.uint8))
        else:
            args.append(torch.randn((batch, To, *s.shape), generator=g).to(getattr(torch, s.dtype)))
    dyn = {key: {0: BATCH} for key in policy.obs_keys} | {"obs_kv": {2: BATCH}}
    model = _trace(_Encoder(policy), tuple(args), list(policy.obs_keys), ["obs_kv"], dyn)
    # the tracer names the token count after the Concat that makes it ("Concatobs_kv_dim_4"), though it is
    # fixed: stated as the step graph takes it, so the manifest's shapes hold numbers and the batch "B" only
    d = dims(policy)
    model.graph.output[0].CopyFrom(_value("obs_kv", TensorProto.FLOAT, obs_kv_shape(d)))
    return model


def obs_kv_shape(d: dict[str, int]) -> list:
    """(n_ca, 2, B, heads, To, head_dim): every cross-attention block's observation keys and values."""
    return [d["n_ca"], 2, BATCH, d["heads"], d["memory_tokens"], d["head_dim"]]


def trace_pieces(policy: DiffusionPolicy, sampler: Sampler, batch: int = 2) -> Pieces:
    d = dims(policy)
    B, H, Da, W, To = batch, d["horizon"], d["action_dim"], d["width"], d["memory_tokens"]
    n_ca, heads, hd = d["n_ca"], d["heads"], d["head_dim"]
    x = torch.randn(B, H, Da)
    k = torch.tensor(0, dtype=torch.int64)
    obs_kv = torch.randn(n_ca, 2, B, heads, To, hd)
    mem = torch.randn(n_ca, 2, B, heads, 1 + To, hd)
    h = torch.randn(1, B, H, W)
    pre = _trace(_Pre(policy, time_kv_table(policy, sampler)), (x, k, obs_kv), ["x", "k", "obs_kv"], ["h", "mem"],
                 {"x": {0: BATCH}, "obs_kv": {2: BATCH}, "h": {1: BATCH}, "mem": {2: BATCH}})
    blocks, j = [], 0
    for blk in policy.denoiser.blocks:
        if blk.kind == CA:
            blocks.append(_trace(_Block(blk, j), (h, mem), ["h", "mem"], ["d"],
                                 {"h": {1: BATCH}, "mem": {2: BATCH}, "d": {1: BATCH}}))
            j += 1
        else:
            blocks.append(_trace(_Block(blk, None), (h,), ["h"], ["d"], {"h": {1: BATCH}, "d": {1: BATCH}}))
    post = _trace(_Post(policy, sampler), (h, x, k, x), ["h", "x", "k", "noise"], ["x_next"],
                  {"h": {1: BATCH}, "x": {0: BATCH}, "noise": {0: BATCH}, "x_next": {0: BATCH}})
    shapes = {"x": [BATCH, H, Da], "k": [], "obs_kv": obs_kv_shape(d),
              "deltas": [d["n_blocks"], BATCH, H, W], "noise": [BATCH, H, Da],
              "x_next": [BATCH, H, Da], "deltas_out": [d["n_blocks"], BATCH, H, W]}
    return Pieces(pre, blocks, post, shapes)


# ---- assembly ----------------------------------------------------------------------------------
def _inline(model: onnx.ModelProto, prefix: str, io_map: dict[str, str]):
    """A traced piece's nodes and initializers with every name prefixed, except its graph
    inputs/outputs, which are renamed to the outer names in `io_map`."""
    g = model.graph

    def rename(name: str) -> str:
        if not name:
            return name
        return io_map[name] if name in io_map else prefix + name

    missing = [v.name for v in (*g.input, *g.output) if v.name not in io_map]
    if missing:
        raise ValueError(f"piece {prefix!r}: no outer name for {missing}")
    nodes = []
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"piece {prefix!r}: traced node {node.op_type} holds a subgraph")
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = prefix + (node.name or node.op_type)
        new.input[:] = [rename(n) for n in node.input]
        new.output[:] = [rename(n) for n in node.output]
        nodes.append(new)
    inits = []
    for init in g.initializer:
        new = onnx.TensorProto()
        new.CopyFrom(init)
        new.name = rename(init.name)
        inits.append(new)
    return nodes, inits


def _value(name: str, elem: int, shape: Sequence) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def block_groups(compute: np.ndarray) -> list[list[int]]:
    """Runs of consecutive blocks whose compute column is the same at every step: the plan computes
    or reuses them together, so one If serves the run (uniform plans: one If for all blocks)."""
    groups: list[list[int]] = []
    for i in range(compute.shape[1]):
        if groups and np.array_equal(compute[:, groups[-1][-1]], compute[:, i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _group_if(pieces: Pieces, group: list[int]) -> onnx.NodeProto:
    """One If for a run of blocks: the then-branch runs their nodes in order (each on the residual
    plus the deltas before it), the else-branch passes their stored deltas through; it outputs
    delta_<i> for every block of the run, which the outer graph adds to the residual."""
    shape = [1, BATCH, None, None]
    then_nodes, then_inits, then_out, else_nodes, else_out = [], [], [], [], []
    h = f"h_{group[0]}"
    for pos, i in enumerate(group):
        b_nodes, b_inits = _inline(pieces.blocks[i], f"blk{i}/", {"h": h, "mem": "mem_kv", "d": f"blk{i}/computed"})
        then_nodes += b_nodes
        then_inits += b_inits
        if pos + 1 < len(group):
            then_nodes.append(helper.make_node("Add", [h, f"blk{i}/computed"], [f"blk{i}/h_next"],
                                               name=f"blk{i}/residual_in_branch"))
            h = f"blk{i}/h_next"
        then_out.append(_value(f"blk{i}/computed", TensorProto.FLOAT, shape))
        # gathered here, not split outside: only reused deltas are copied, once
        else_nodes.append(helper.make_node("Gather", ["deltas", f"blk{i}/index"], [f"blk{i}/reused"],
                                           name=f"blk{i}/reuse", axis=0))
        else_out.append(_value(f"blk{i}/reused", TensorProto.FLOAT, shape))
    tag = f"blk{group[0]}" + (f"-{group[-1]}" if len(group) > 1 else "")
    then_g = helper.make_graph(then_nodes, f"{tag}_compute", [], then_out, initializer=then_inits)
    else_g = helper.make_graph(else_nodes, f"{tag}_reuse", [], else_out)
    return helper.make_node("If", [f"blk{group[0]}/compute"], [f"delta_{i}" for i in group], name=f"{tag}/if",
                            then_branch=then_g, else_branch=else_g)


def assemble_step(pieces: Pieces, compute: np.ndarray | None = None, pattern: Sequence[bool] | None = None,
                  name: str = "polcache_step") -> onnx.ModelProto:
    """The step graph: with `compute` (K, n_blocks) bool, an If on compute[k, i] per block (one per
    run of blocks that the table always computes together, see `block_groups`);
    with `pattern` (n_blocks,) bool instead, block i is inlined where pattern[i] and its
    stored delta passed through otherwise (no table, no If)."""
    if (compute is None) == (pattern is None):
        raise ValueError("assemble_step needs exactly one of compute (a table) or pattern (a row)")
    n = len(pieces.blocks)
    nodes, inits = [], []
    pre_nodes, pre_inits = _inline(pieces.pre, "pre/", {"x": "x", "k": "k", "obs_kv": "obs_kv", "h": "h_0",
                                                         "mem": "mem_kv"})
    nodes += pre_nodes
    inits += pre_inits
    # pattern graphs: one Split of the stored deltas, stored[i] is (1, B, H, W); If graphs gather a
    # block's stored delta inside its else-branch. compute[i] is (1,).
    stored = [f"blk{i}/stored" for i in range(n)]
    if pattern is not None:
        nodes.append(helper.make_node("Split", ["deltas"], stored, name="deltas/split", axis=0))
    else:
        inits += [numpy_helper.from_array(np.array([i], dtype=np.int64), f"blk{i}/index") for i in range(n)]
    if compute is not None:
        compute = np.asarray(compute, dtype=bool)
        if compute.ndim != 2 or compute.shape[1] != n:
            raise ValueError(f"compute table has shape {compute.shape}, expected (K, {n})")
        inits.append(numpy_helper.from_array(compute, "plan/compute"))
        nodes.append(helper.make_node("Gather", ["plan/compute", "k"], ["plan/row"], name="plan/gather_row", axis=0))
        nodes.append(helper.make_node("Split", ["plan/row"], [f"blk{i}/compute" for i in range(n)],
                                      name="plan/split", axis=0))
    elif len(pattern) != n:
        raise ValueError(f"pattern has {len(pattern)} entries, expected {n}")
    deltas = [f"delta_{i}" if pattern is None or pattern[i] else stored[i] for i in range(n)]
    for group in (block_groups(compute) if pattern is None else [[i] for i in range(n)]):
        if pattern is None:
            nodes.append(_group_if(pieces, group))
        elif pattern[group[0]]:
            i = group[0]
            b_nodes, b_inits = _inline(pieces.blocks[i], f"blk{i}/", {"h": f"h_{i}", "mem": "mem_kv", "d": deltas[i]})
            nodes += b_nodes
            inits += b_inits
        for i in group:
            nodes.append(helper.make_node("Add", [f"h_{i}", deltas[i]], [f"h_{i + 1}"], name=f"blk{i}/residual"))
    nodes.append(helper.make_node("Concat", deltas, ["deltas_out"], name="deltas/concat", axis=0))
    post_nodes, post_inits = _inline(pieces.post, "post/", {"h": f"h_{n}", "x": "x", "k": "k", "noise": "noise",
                                                             "x_next": "x_next"})
    nodes += post_nodes
    inits += post_inits
    s = pieces.shapes
    graph = helper.make_graph(
        nodes, name,
        [_value("x", TensorProto.FLOAT, s["x"]), _value("k", TensorProto.INT64, s["k"]),
         _value("obs_kv", TensorProto.FLOAT, s["obs_kv"]), _value("deltas", TensorProto.FLOAT, s["deltas"]),
         _value("noise", TensorProto.FLOAT, s["noise"])],
        [_value("x_next", TensorProto.FLOAT, s["x_next"]), _value("deltas_out", TensorProto.FLOAT, s["deltas_out"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="polcache")
    model.ir_version = pieces.pre.ir_version
    return model


def io_description(model: onnx.ModelProto) -> dict:
    """Names, shapes (symbolic dims by name, e.g. "B") and dtypes of a graph's inputs and outputs."""

    def one(v: onnx.ValueInfoProto) -> dict:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return {"inputs": [one(v) for v in model.graph.input], "outputs": [one(v) for v in model.graph.output]}
