"""--device: one reading for every command, one clear line when the hardware is missing."""

import pytest
import torch

from polcache.errors import DeviceError
from polcache.policy.device import resolve_device, to_device

from test_cli_errors import _err

SHIPPED = "polcache/assets/checkpoints/reach-v3"
NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "", "tpu:0"])
def test_malformed_device_is_named(spec):
    with pytest.raises(DeviceError, match="expected cpu, cuda, cuda:N or auto"):
        resolve_device(spec)


@pytest.mark.skipif(not NO_CUDA, reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_clear_error(spec):
    with pytest.raises(DeviceError, match=f"--device {spec}: CUDA is not available"):
        resolve_device(spec)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_cuda_index_out_of_range():
    with pytest.raises(DeviceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_to_device_moves_nested_batches():
    batch = {"obs": {"state": torch.zeros(2, 3)}, "action": torch.ones(2, 4)}
    dev = resolve_device("auto")
    moved = to_device(batch, dev)
    assert moved["obs"]["state"].device.type == dev.type and moved["action"].device.type == dev.type


@pytest.mark.skipif(not NO_CUDA, reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", SHIPPED, "--episodes", "1", "--device", "cuda"],
    ["serve", "--checkpoint", SHIPPED, "--device", "cuda"],
    ["calibrate", "--checkpoint", SHIPPED, "--budget", "2", "--out", "/tmp/never.json", "--device", "cuda"],
    ["train", "--config", "configs/recommended_cpu.yaml", "dataset=/nonexistent", "--device", "cuda:1"],
])
def test_every_command_refuses_missing_cuda_in_one_line(capsys, argv):
    assert "CUDA is not available" in _err(capsys, argv)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_shipped_checkpoint_denoises_the_same_on_cuda():
    from polcache.policy import load_policy

    obs = {"state": torch.randn(2, 2, 39, generator=torch.Generator().manual_seed(0))}
    x = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    out = {}
    for dev in ("cpu", "cuda"):
        device = resolve_device(dev)
        policy, _, _ = load_policy(SHIPPED, device)
        with torch.no_grad():
            feats = policy.encode(to_device(obs, device))
            out[dev] = policy.denoise(feats, policy.sampler("ddim", 8), x.to(device), None).cpu()
    assert torch.allclose(out["cpu"], out["cuda"], atol=1e-4)


def _tiny_dataset(path):
    import numpy as np

    from polcache.data import Episode, write_dataset

    rng = np.random.default_rng(0)
    eps = [Episode(obs={"state": rng.normal(size=(30, 5)).astype(np.float32)},
                   action=rng.normal(size=(30, 2)).astype(np.float32), task="toy") for _ in range(4)]
    write_dataset(path, eps)
    return path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU"))])
def test_training_runs_and_resumes_on_the_device(tmp_path, device):
    from polcache.cli import main
    from polcache.policy import load_policy

    data = _tiny_dataset(tmp_path / "toy.zarr")
    args = ["train", "--config", "configs/recommended_cpu.yaml", f"dataset={data}", f"out={tmp_path / 'run'}",
            "policy.n_layers=1", "policy.width=32", "policy.state_hidden=32", "policy.sampler.inference_steps=2",
            "train.batch_size=8", "train.warmup_steps=1", "train.checkpoint_every=3", "train.val_windows=4",
            "--device", device, "--no-progress"]
    assert main([*args, "train.epochs=1"]) == 0
    assert main([*args, "train.epochs=2"]) == 0  # resumes: optimizer state and EMA back on the device
    _, _, meta = load_policy(tmp_path / "run" / "last")
    assert meta["step"] == 2 * (4 * 30 * 3 // 4 // 8)
