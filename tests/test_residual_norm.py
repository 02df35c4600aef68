"""The residual add fused with the next LayerNorm: the torch form against the plain step, the
Triton kernel against the torch form (on CUDA, or in Triton's interpreter where Triton is installed)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from polcache.policy.executor import COMPUTE, REUSE, Plan, StackedDeltas
from polcache.policy.residual_norm import add_norm_torch, triton_blocker
from tests.helpers import tiny_policy

HAS_TRITON = triton_blocker(torch.device("cuda")) != "Triton is not installed"


def test_uncached_chunk_through_the_fused_path_equals_the_plain_loop():
    p = tiny_policy().eval()
    s = p.sampler("ddim", 6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feats = p.encode({"state": torch.randn(2, p.cfg.n_obs_steps, 5, generator=g)})
        x0 = torch.randn(2, p.cfg.horizon, p.action_dim, generator=g)
        plain = p.denoise(feats, s, x0.clone(), None)
        fused = p.denoise(feats, s, x0.clone(), None, add_norm=add_norm_torch)  # uncached as the all-COMPUTE plan
        n = len(p.denoiser.blocks)
        reused = Plan(((COMPUTE,) * n,) + ((REUSE,) * (n - 1) + (COMPUTE,),) * 5)
        cached = p.denoise(feats, s, x0.clone(), None, reused)
        cached_fused = p.denoise(feats, s, x0.clone(), None, reused, add_norm=add_norm_torch)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_fused, cached, rtol=0, atol=0)


def test_add_norm_adds_the_rows_in_range_then_normalises():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    deltas = StackedDeltas(4)
    deltas.ready(h)
    deltas.buf.normal_()
    norm = torch.nn.LayerNorm(8)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    for start, stop in [(1, 1), (1, 2), (0, 4)]:
        out, y = add_norm_torch(h, deltas, start, stop, norm)
        want = h + deltas.buf[start:stop].sum(0).view_as(h)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(y, norm(want))


CHECK = textwrap.dedent("""
    import sys
    import torch
    from polcache.policy.executor import StackedDeltas
    from polcache.policy.residual_norm import add_norm_torch, add_norm_triton
    dev = sys.argv[1]
    torch.manual_seed(0)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        for width in (64, 96):
            h = torch.randn(3, 16, width, device=dev).to(dtype)
            deltas = StackedDeltas(5)
            deltas.ready(h)
            deltas.buf.normal_()
            norm = torch.nn.LayerNorm(width).to(dev).to(dtype)
            norm.weight.data.normal_()
            norm.bias.data.normal_()
            ref = StackedDeltas(5)
            ref.buf, ref.ones = deltas.buf.float(), deltas.ones.float()
            for start, stop in [(2, 2), (2, 3), (0, 5)]:
                got_h, got_y = add_norm_triton(h, deltas, start, stop, norm)
                want_h, want_y = add_norm_torch(h.float(), ref, start, stop, norm.float())
                torch.testing.assert_close(got_h.float(), want_h, rtol=tol, atol=tol)
                torch.testing.assert_close(got_y.float(), want_y, rtol=tol, atol=tol)
    sys.path.insert(0, sys.argv[2])
    from helpers import tiny_policy
    from polcache.cache.baselines import uniform_plan
    p = tiny_policy(n_layers=2, width=64).to(dev).eval()
    s = p.sampler("ddim", 6)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():  # whole chunks, uncached and cached, batch 1 and 3
        for batch, plan in [(1, None), (3, None), (1, uniform_plan(6, 6, 3))]:
            feats = p.encode({"state": torch.randn(batch, p.cfg.n_obs_steps, 5, generator=g, device=dev)})
            x0 = torch.randn(batch, p.cfg.horizon, p.action_dim, generator=g, device=dev)
            want = p.denoise(feats, s, x0.clone(), None, plan)
            got = p.denoise(feats, s, x0.clone(), None, plan, add_norm=add_norm_triton)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (it comes with CUDA builds of torch)")
def test_triton_kernel_matches_the_torch_form():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # Triton's interpreter runs the kernel on the host
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", CHECK, device, tests], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
