"""Small things several test files share (plain values; fixtures live in conftest.py)."""

import copy
import pickle
from pathlib import Path

import numpy as np

# A tiny image-model config (8x8 images, 16 channels, T = 10) for checkpoint and generation
# tests; use `tiny_config()` for a copy that a test may change.
_TINY_CONFIG = {
    "dataset": {"name": "cifar10", "resolution": 8, "channels": 3},
    "diffusion": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.2,
                  "timesteps": 10, "model_mean_type": "eps", "model_var_type": "fixed-large",
                  "loss_type": "mse"},
    "model": {"in_channels": 3, "hid_channels": 16, "ch_multipliers": [1, 2],
              "num_res_blocks": 1, "apply_attn": [False, True], "num_groups": 8},
}


def tiny_config():
    return copy.deepcopy(_TINY_CONFIG)


def randomize_(model, seed=0):
    """Redraw every parameter at a scale that keeps activations O(1), in place.

    Freshly built UNets start their residual branches and output layer near zero (scale
    1e-10), so their output is ~1e-5 and a comparison of two paths' outputs passes whatever
    the paths compute. Tests of fast paths (compile, bf16, channels_last, CUDA graphs) use
    this instead: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2).
    """
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() > 1:
                value = noise / math.sqrt(p[0].numel())
            elif name.endswith("weight"):  # GroupNorm scale
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))
    return model


def rel_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (one number for a whole output)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm())


# ---- image training on tiny models ----------------------------------------------------------
# A UNet small enough for CPU tests: 32/64 channels, one res block, no attention, T = 20.
TINY = ["--hid-channels", "32", "--ch-multipliers", "1,2", "--num-res-blocks", "1",
        "--apply-attn", "0,0", "--drop-rate", "0", "--timesteps", "20", "--num-workers", "0",
        "--num-save-images", "4", "--warmup", "2", "--log-intv", "1"]


def write_fake_cifar(root: Path, per_batch: int = 8, seed: int = 0) -> Path:
    """torchvision's cifar-10-batches-py layout with `per_batch` random images per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        entry = {b"data": data, b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    return root


def run_args(tmp_path: Path, name: str = "run"):
    return ["--chkpt-dir", str(tmp_path / "chkpts"), "--image-dir", str(tmp_path / "images"),
            "--exp-name", name]


def final_state(tmp_path: Path, name: str = "run"):
    """The state with the highest step in a run folder (as --resume would pick it)."""
    from ddpmkit.checkpoints.files import newest_checkpoint

    return newest_checkpoint([str(p) for p in (tmp_path / "chkpts" / name).glob("*.pt")]).state


def same_tensors(a, b):
    """Assert two (nested dicts / lists of) tensors and values are exactly equal."""
    import torch

    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def random_inception_weights(folder: Path, seed: int):
    """(path, spec): Inception weights with random O(1) values saved in `folder`, and the weights
    spec whose hash accepts them (tests monkeypatch it in place of the real file's)."""
    import dataclasses

    import torch

    from ddpmkit.metrics import inception as inc
    from ddpmkit.metrics import weights as wts

    model = inc.randomize_weights_(inc.FIDInceptionV3(), torch.Generator().manual_seed(seed))
    path = folder / "random_inception.pth"
    torch.save(model.state_dict(), path)
    spec = dataclasses.replace(wts.INCEPTION_WEIGHTS, sha256=wts.sha256_of_file(str(path)),
                               num_bytes=path.stat().st_size)
    return str(path), spec


def one_line_error(capsys, code, *needles):
    """Assert a CLI failure as users must see it: exit 2 and one `error: ...` line on stderr
    holding every needle, no traceback. Returns the line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def toy_trainer(tmp_path, trainer_cls=None, init_seed=0, **kwargs):
    """A tiny toy Trainer (gaussian8, T = 20, 4 epochs of 5 updates in 2 micro-batches, EMA,
    warmup, cosine decay, clipping) writing into tmp_path; kwargs override its options."""
    import torch

    from ddpmkit.data.toy import TensorBatches, make_toy_data, toy_generator
    from ddpmkit.diffusion import GaussianDiffusion, get_beta_schedule
    from ddpmkit.models.toy import ToyMLP
    from ddpmkit.training.trainer import Trainer

    torch.manual_seed(init_seed)
    model = ToyMLP(2, 16, 2)
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 20, 1e-3, 0.2), "eps",
                                  "fixed-small", "mse", decoder="continuous")
    data = TensorBatches(make_toy_data("gaussian8", 80, toy_generator(0)), 16, seed=5)
    options = dict(epochs=4, lr=1e-3, warmup_steps=3, lr_decay="cosine", grad_clip=1.0,
                   num_accum=2, ema_decay=0.9, seed=11, chkpt_dir=str(tmp_path),
                   chkpt_prefix="c", progress=False, log_every=2,
                   log_path=str(tmp_path / "log.jsonl"))
    options.update(kwargs)
    return (trainer_cls or Trainer)(model, diffusion, data, **options)
