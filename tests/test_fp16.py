"""`--precision fp16`: autocast float16 with dynamic loss scaling (torch.amp.GradScaler, which
runs on the CPU too), skipped updates counted, the scaler's state in checkpoints for an exact
resume, float32 weights / EMA / optimizer, and `auto` choosing fp16 only on pre-Ampere GPUs."""

import json
import logging

import pytest
import torch
from helpers import TINY, final_state, run_args, same_tensors, toy_trainer, write_fake_cifar

from ddpmkit.runtime import devices
from ddpmkit.training.trainer import MAX_SKIPS_IN_A_ROW, NonFiniteLossError, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class Overflowing(Trainer):
    """A trainer whose loss is inf on the updates listed in `inf_steps` (as an fp16 overflow
    in the forward or backward pass would make it)."""

    inf_steps: frozenset = frozenset()

    def compute_loss(self, x_0):
        loss = super().compute_loss(x_0)
        return loss * float("inf") if self.step in self.inf_steps else loss


def _fp16_trainer(tmp_path, init_seed=0, inf_steps=(), growth_interval=3, **kwargs):
    options = {"log_every": 1, "amp_dtype": torch.float16, **kwargs}
    trainer = toy_trainer(tmp_path, Overflowing, init_seed, **options)
    trainer.inf_steps = frozenset(inf_steps)
    # A short growth interval, so the scale also grows within the test and the growth
    # tracker is part of what a resume must restore.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10,
                                          growth_interval=growth_interval)
    return trainer


def _log(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "log.jsonl")]


def test_a_skipped_update_leaves_weights_and_optimizer_untouched_and_is_counted(tmp_path):
    t = _fp16_trainer(tmp_path, inf_steps={2})
    t.fit(max_steps=2)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    scale = t.scaler.get_scale()
    t.fit(max_steps=3)  # update 3 (t.step == 2 while it runs) has an inf loss
    assert t.step == 3 and t.skipped_steps == 1
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in t.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, moments[k]), k  # Adam's step count and moments too
    assert t.scaler.get_scale() == scale / 2
    records = _log(tmp_path)
    assert {r["step"]: r["skipped_steps"] for r in records} == {1: 0, 2: 0, 3: 1}
    assert records[-1]["loss_scale"] == scale / 2
    # the skipped update's inf loss stays out of the logged mean: no NaN stop; an interval
    # with only that update has no loss
    assert [r["loss"] for r in records if r["step"] == 3] == [None]
    assert [r["grad_norm"] for r in records if r["step"] == 3] == [None]  # inf: JSON null
    assert all(r["loss"] < 10 for r in records if r["step"] < 3)
    t.fit(max_steps=4)  # the next update applies again
    assert t.skipped_steps == 1 and not torch.equal(t.model.state_dict()["out_fc.bias"],
                                                    before["out_fc.bias"])


def test_a_skipped_first_update_warns_nothing(tmp_path):
    import warnings

    t = _fp16_trainer(tmp_path, inf_steps={0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before optimizer.step()"
        t.fit(max_steps=2)
    assert t.skipped_steps == 1 and t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert not any("lr_scheduler" in str(f) for f in warnings.filters)  # none left behind


def test_the_scale_grows_after_clean_updates(tmp_path):
    t = _fp16_trainer(tmp_path, growth_interval=3)
    t.fit(max_steps=6)
    assert t.skipped_steps == 0 and t.scaler.get_scale() == 2.0 ** 12


def test_weights_ema_and_optimizer_stay_float32(tmp_path):
    t = _fp16_trainer(tmp_path)
    t.fit(max_steps=3)
    tensors = [*t.model.state_dict().values(), *t.ema.model.state_dict().values()]
    for state in t.optimizer.state_dict()["state"].values():
        tensors += [v for k, v in state.items() if k != "step"]
    assert tensors and all(v.dtype == torch.float32 for v in tensors)
    # and the network did run in float16
    seen = []
    handle = t.model.out_fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    t.fit(max_steps=4)
    handle.remove()
    assert seen and set(seen) == {torch.float16}


@pytest.mark.parametrize("stop", ["epoch", "mid_epoch"])
def test_fp16_resume_is_bit_identical(tmp_path, stop):
    # a skip before and one after the stop; growth every 3 clean updates
    straight = _fp16_trainer(tmp_path / "a", inf_steps={1, 6})
    straight.fit()
    assert straight.skipped_steps == 2

    first = _fp16_trainer(tmp_path / "b", inf_steps={1, 6})
    if stop == "epoch":
        first.fit(until_epoch=1)
    else:
        first.fit(max_steps=4)
        assert first.batch_in_epoch == 2
    path = first.save_checkpoint()
    state = torch.load(path, weights_only=True)
    assert state["scaler"]["scale"] == first.scaler.get_scale() and state["skipped_steps"] == 1
    second = _fp16_trainer(tmp_path / "b", init_seed=123, inf_steps={1, 6})
    torch.manual_seed(999)
    second.resume(path)
    assert second.scaler.state_dict() == first.scaler.state_dict()
    second.fit()
    for (k, p), q in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(p, q), k
    for p, q in zip(straight.ema.model.state_dict().values(),
                    second.ema.model.state_dict().values()):
        assert torch.equal(p, q)
    same_tensors(straight.optimizer.state_dict(), second.optimizer.state_dict())
    assert straight.scaler.state_dict() == second.scaler.state_dict()
    assert straight.skipped_steps == second.skipped_steps == 2


def test_a_run_that_always_overflows_stops_as_diverged(tmp_path):
    t = _fp16_trainer(tmp_path / "run", inf_steps=set(range(1000)), epochs=100, chkpt_intv=1)
    with pytest.raises(NonFiniteLossError, match="diverged.*in a row.*fp16"):
        t.fit()
    assert t.skipped_steps == t.step + 1 == MAX_SKIPS_IN_A_ROW  # it stopped in update 30
    saved = [torch.load(p, weights_only=True)["step"] for p in (tmp_path / "run").glob("*.pt")]
    assert saved and max(saved) < t.step  # epoch checkpoints before the stop, none at it


def test_a_resumed_streak_of_skips_stops_where_the_straight_run_stops(tmp_path):
    """The count of skips in a row is saved: a run stopped after 10 of them and resumed stops
    as diverged at the same update as the run that was never stopped (not 30 updates later)."""
    straight = _fp16_trainer(tmp_path / "a", inf_steps=set(range(1000)), epochs=100)
    with pytest.raises(NonFiniteLossError):
        straight.fit()
    first = _fp16_trainer(tmp_path / "b", inf_steps=set(range(1000)), epochs=100)
    first.fit(max_steps=10)
    path = first.save_checkpoint()
    assert torch.load(path, weights_only=True)["skips_in_a_row"] == 10
    second = _fp16_trainer(tmp_path / "b", inf_steps=set(range(1000)), epochs=100)
    second.resume(path)
    with pytest.raises(NonFiniteLossError, match=f"{MAX_SKIPS_IN_A_ROW} updates in a row"):
        second.fit()
    assert (second.step, second.skipped_steps) == (straight.step, straight.skipped_steps)


def test_fp32_and_bf16_have_no_scaler(tmp_path):
    for dtype in (None, torch.bfloat16):
        t = _fp16_trainer(tmp_path, amp_dtype=dtype)
        t.scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
        t.fit(max_steps=1)
        assert not t.scaler.is_enabled() and t.state_dict()["scaler"] is None
        assert "loss_scale" not in _log(tmp_path)[-1]


# ---- auto ------------------------------------------------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    def install(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated
    return install


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((6, 1), "fp16"), ((8, 0), "bf16"),
                                                  ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_picks_by_compute_capability(fake_gpu, capability, expected):
    fake_gpu(capability)
    precision = devices.resolve_precision("auto", torch.device("cuda"))
    assert precision.name == expected
    assert f"{capability[0]}.{capability[1]}" in precision.reason


@pytest.mark.parametrize("native", [False, True])
def test_auto_never_picks_fp16_on_a_cpu(monkeypatch, native, caplog):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert devices.resolve_precision("auto", torch.device("cpu")).name == ("bf16" if native
                                                                          else "fp32")
    with caplog.at_level(logging.WARNING):
        assert devices.resolve_precision("fp16", torch.device("cpu")).name == "fp16"
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "fp16 on a CPU" in record.getMessage()


def test_autocast_dtypes():
    assert devices.autocast_dtype("fp16") is torch.float16
    assert devices.autocast_dtype("bf16") is torch.bfloat16
    assert devices.autocast_dtype("fp32") is None


# ---- the command -----------------------------------------------------------------------------
def test_train_fp16_records_fp16_and_the_scaler_and_resumes_exactly(tmp_path):
    from ddpmkit.cli.train import main

    root = write_fake_cifar(tmp_path / "data")
    # 8x8 images, batch 4: fp16 convolution backward has no fast CPU kernel (see the README)
    common = ["--dataset", "cifar10", "--root", str(root), *TINY, "--batch-size", "4",
              "--image-size", "8", "--precision", "fp16", "--use-ema", "--num-save-images", "0"]
    assert main([*common, "--max-steps", "4", *run_args(tmp_path, "straight")]) == 0
    assert main([*common, "--max-steps", "2", *run_args(tmp_path, "split")]) == 0
    half = final_state(tmp_path, "split")
    assert half["config"]["train"]["precision"] == "fp16"
    assert half["scaler"]["scale"] > 0 and "_growth_tracker" in half["scaler"]
    assert main([*common, "--max-steps", "4", "--resume", *run_args(tmp_path, "split")]) == 0
    straight, resumed = final_state(tmp_path, "straight"), final_state(tmp_path, "split")
    assert straight["step"] == resumed["step"] == 4
    for key in ("model", "ema", "optimizer", "scheduler"):
        same_tensors(straight[key], resumed[key])
    assert straight["scaler"] == resumed["scaler"]
    log = [json.loads(line) for line in
           (tmp_path / "chkpts" / "straight" / "log.jsonl").read_text().splitlines()]
    assert {"loss_scale", "skipped_steps"} <= set(log[-1])



def test_generate_fp16_records_fp16_and_stays_close_to_fp32(tmp_path):
    import numpy as np
    from helpers import randomize_, tiny_config
    from PIL import Image

    from ddpmkit.checkpoints.files import save_checkpoint
    from ddpmkit.cli.generate import main as generate_main
    from ddpmkit.models.loading import build_from_config

    model, _ = build_from_config(tiny_config())
    path = tmp_path / "model.pt"
    save_checkpoint({"model": randomize_(model, seed=2).state_dict(), "config": tiny_config()},
                    str(path))
    images = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        assert generate_main(["--chkpt-path", str(path), "--total-size", "2", "--sampler",
                              "ddim", "--steps", "3", "--save-dir", str(out), "--precision",
                              precision, "--no-progress"]) == 0
        manifest = json.loads((out / "cifar10" / "generation.json").read_text())
        assert manifest["precision"] == precision
        images[precision] = np.stack([np.asarray(Image.open(out / "cifar10" / f"00000{i}.png"))
                                      for i in range(2)]).astype(int)
    diff = np.abs(images["fp16"] - images["fp32"])
    assert diff.max() <= 3 and diff.mean() < 0.2  # the same images up to fp16 rounding (1, 0.04)

# ---- the network under fp16 autocast -----------------------------------------------------------
def _unet_errors(config, seed=0):
    """Max |output - float64 output| of the UNet (weights randomized to O(1) activations)
    under fp16 and bf16 autocast on the CPU, and the float64 output's max |value|."""
    from helpers import randomize_

    from ddpmkit.models.loading import build_from_config

    model, _ = build_from_config(config)
    model = randomize_(model.eval(), seed=seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    res, ch = config["dataset"]["resolution"], config["dataset"]["channels"]
    x = torch.randn(2, ch, res, res, generator=g)
    t = torch.tensor([10, config["diffusion"]["timesteps"] - 1])
    with torch.no_grad():
        ref = model(x.double(), t).float()
        model.float()
        errors = {}
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype):
                out = model(x, t)
            assert out.dtype == dtype and out.isfinite().all()
            errors[dtype] = float((out.float() - ref).abs().max())
    return errors, float(ref.abs().max())


@pytest.mark.parametrize("name", ["tiny", pytest.param("cifar10", marks=pytest.mark.slow)])
def test_unet_under_fp16_autocast_stays_close_to_fp32(name):
    """No layer needs an upcast for fp16: GroupNorm's kernels accumulate the statistics in
    float32 (see the next test), attention's softmax runs in float32 inside
    scaled_dot_product_attention, and the timestep embedding is computed in float32 before
    autocast reaches a layer. Measured on the CIFAR-10 UNet (35.7M parameters, batch 2,
    t = 10 and 999): max error 3.0e-3 in fp16 and 2.6e-2 in bf16, on outputs up to 2.9."""
    from helpers import tiny_config

    from ddpmkit.config import find_config_file, load_json

    config = tiny_config() if name == "tiny" else load_json(find_config_file(name))
    config["dataset"].setdefault("channels", 3)
    errors, scale = _unet_errors(config)
    assert errors[torch.float16] < 4e-3 * scale
    # fp16 keeps 3 more mantissa bits than bf16: its error is several times smaller
    assert errors[torch.float16] * 3 < errors[torch.bfloat16]


def test_fp16_groupnorm_attention_and_time_embedding_do_not_overflow():
    import torch.nn.functional as F

    from ddpmkit.models.layers import AttnBlock, GroupNorm, timestep_embedding

    g = torch.Generator().manual_seed(0)
    # activations whose squares (up to ~1e6) are past fp16's largest value, 65504
    x = torch.randn(2, 64, 8, 8, generator=g) * 300 + 200
    norm = GroupNorm(8, 64)
    with torch.autocast("cpu", dtype=torch.float16):
        half = norm(x.half())
    assert half.dtype == torch.float16
    assert (half.float() - F.group_norm(x, 8, eps=1e-5)).abs().max() < 1e-2
    # attention logits q.k/sqrt(C) in the thousands (q.k itself up to ~5.5e4, near fp16's top)
    q, k, v = (torch.randn(1, 1, 64, 256, generator=g) * 30 for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = F.scaled_dot_product_attention(q.half(), k.half(), v.half())
    assert out.isfinite().all() and (out.double() - ref).abs().max() < 0.1 * 30
    block = AttnBlock(64, num_groups=8)
    with torch.autocast("cpu", dtype=torch.float16):
        assert block(x).isfinite().all()
        emb = timestep_embedding(torch.tensor([999]), 128)
    # float32: in fp16, t * w_k at t = 999 would be off by up to ~0.5 rad
    assert emb.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_stays_close_to_float64_and_trains(tmp_path):
    """The CUDA kernels (cuDNN, fused attention, GroupNorm) under fp16 autocast, and a few
    fp16 updates with the loss scaler on the GPU."""
    from helpers import randomize_, tiny_config

    from ddpmkit.models.loading import build_from_config

    config = tiny_config()
    model, diffusion = build_from_config(config)
    model = randomize_(model, seed=0).double().cuda().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).cuda()
    t = torch.tensor([0, 3, 6, 9]).cuda()
    with torch.no_grad():
        ref = model(x.double(), t).float()
        model.float()
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x, t)
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max() < 4e-3 * ref.abs().max()
    model.train()
    data = [torch.rand(4, 3, 8, 8).cuda() * 2 - 1] * 4
    trainer = Trainer(model, diffusion, data, epochs=1, device="cuda", progress=False,
                      amp_dtype=torch.float16)
    trainer.fit()
    assert trainer.step == 4 and trainer.scaler.is_enabled()
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())
