"""The generic training loop: exact resume, accumulation, EMA, LR schedule, NaN handling, log."""

import json
import math
import os

import pytest
import torch
from helpers import toy_trainer
from torch import nn

from ddpmkit.checkpoints.files import load_checkpoint
from ddpmkit.data.toy import TensorBatches, make_toy_data, toy_generator
from ddpmkit.models.toy import ToyMLP
from ddpmkit.training.ema import EMA
from ddpmkit.training.trainer import NonFiniteLossError, Trainer, lr_factor, unwrap


def _setup(tmp_path, init_seed=0, **kwargs):
    return toy_trainer(tmp_path, init_seed=init_seed, **kwargs)


def _assert_same_state(a: Trainer, b: Trainer):
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k
    for p, q in zip(a.ema.model.state_dict().values(), b.ema.model.state_dict().values()):
        assert torch.equal(p, q)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(sa["state"][i][key], sb["state"][i][key])
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert (a.step, a.epoch, a.batch_in_epoch) == (b.step, b.epoch, b.batch_in_epoch)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_counters_and_partial_accumulation_group(tmp_path):
    seen = []

    class Recording(Trainer):
        def compute_loss(self, x_0):
            seen.append(self.micro_index)
            return super().compute_loss(x_0)

    t = _setup(tmp_path)
    t.__class__ = Recording
    assert t.batches_per_epoch == 5 and t.steps_per_epoch == 3  # groups of 2, 2, 1
    t.fit()
    assert seen == [0, 1, 0, 1, 0] * 4
    assert (t.step, t.epoch, t.batch_in_epoch) == (12, 4, 0)
    assert t.ema.num_updates == 12


@pytest.mark.parametrize("stop", ["epoch", "mid_epoch"])
def test_resume_is_bit_identical(tmp_path, stop):
    straight = _setup(tmp_path / "a")
    straight.fit()

    first = _setup(tmp_path / "b")
    if stop == "epoch":
        first.fit(until_epoch=2)
    else:
        first.fit(max_steps=4)  # step 4 is the first update of epoch 2
        assert first.batch_in_epoch == 2
    path = first.save_checkpoint()
    # A fresh process: different initial weights, everything restored from the file.
    second = _setup(tmp_path / "b", init_seed=123)
    torch.manual_seed(999)  # the global RNG is restored too
    second.resume(path)
    second.fit()
    _assert_same_state(straight, second)


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path):
    t = _setup(tmp_path, config={"dataset": "gaussian8", "mid_features": 16})
    t.fit(until_epoch=1)
    path = t.save_checkpoint()
    state = load_checkpoint(path)  # torch.load(weights_only=True)
    for key in ("model", "ema", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch",
                "rng", "config", "format_version"):
        assert key in state
    assert state["config"]["mid_features"] == 16
    assert set(state["ema"]) >= {"decay", "num_updates", "shadow"}


def test_accumulation_matches_one_big_batch(tmp_path):
    class Regression(Trainer):
        def compute_loss(self, x_0):  # deterministic: no t or noise draws
            t = torch.zeros(x_0.shape[0], dtype=torch.long)
            return ((self.model(x_0, t) - x_0) ** 2).mean()

    def one_update(batch_size, num_accum):
        torch.manual_seed(0)
        model = ToyMLP(2, 16, 1)
        data = TensorBatches(make_toy_data("gaussian8", 32, toy_generator(0)), batch_size,
                             shuffle=False)
        t = Regression(model, None, data, epochs=1, num_accum=num_accum, progress=False)
        t.fit(max_steps=1)
        return model

    big, accumulated = one_update(32, 1), one_update(16, 2)
    for p, q in zip(big.parameters(), accumulated.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    changed = one_update(16, 1)  # one half-batch update differs
    assert not all(torch.allclose(p, q, atol=1e-6)
                   for p, q in zip(big.parameters(), changed.parameters()))


def test_lr_schedule():
    assert lr_factor(0, 4, 100) == pytest.approx(0.25)
    assert lr_factor(3, 4, 100) == 1.0
    assert lr_factor(50, 0, 100) == 1.0
    assert lr_factor(0, 0, 100, "cosine") == 1.0
    assert lr_factor(50, 0, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 0, 100, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(75, 0, 100, "linear") == pytest.approx(0.25)


def test_ema_update_math():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.75)
    old = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, old + 1.0)  # 0.75 old + 0.25 (old + 4)
    assert not ema.model.weight.requires_grad
    restored = EMA(nn.Linear(2, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.75 and restored.num_updates == 1
    assert torch.equal(restored.model.weight, ema.model.weight)


def test_unwrap():
    model = nn.Linear(2, 2)
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(model) is model


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    t = _setup(tmp_path, chkpt_intv=1, ema_decay=None)
    t.fit(until_epoch=1)
    good = sorted(os.listdir(tmp_path))
    assert any(name.endswith(".pt") for name in good)
    with torch.no_grad():
        t.model.out_fc.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        t.fit()
    assert sorted(os.listdir(tmp_path)) == good  # nothing new written over it
    assert t.epoch == 1


def test_nan_stop_names_the_epoch_of_the_loss(tmp_path):
    """A 2-epoch run whose loss turns NaN in its last epoch says epoch 2, not 3."""
    t = _setup(tmp_path, epochs=2, ema_decay=None, log_every=1000)
    t.fit(until_epoch=1)
    with torch.no_grad():
        t.model.out_fc.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"\(epoch 2\)"):
        t.fit()


def test_a_finished_run_says_there_is_nothing_to_train(tmp_path, caplog):
    t = _setup(tmp_path, epochs=3)
    t.fit()
    shorter = _setup(tmp_path / "b", epochs=2)
    shorter.load_state_dict(t.state_dict())
    with caplog.at_level("WARNING"):
        summary = shorter.fit()
    assert summary["steps_run"] == 0
    assert any("nothing to train: the state is at epoch 3" in r.getMessage()
               and "ends at epoch 2" in r.getMessage() for r in caplog.records)


def test_jsonl_log(tmp_path):
    t = _setup(tmp_path)
    t.fit(until_epoch=2)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 4, 6]  # the first update is always logged
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "epoch"} <= set(r)
        assert math.isfinite(r["loss"]) and r["samples_per_s"] > 0
        # the LR the next update uses: warmup over 3 updates, cosine over 12
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["step"], 3, 12, "cosine"))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        _setup(tmp_path, num_accum=0)
    with pytest.raises(ValueError):
        _setup(tmp_path, lr_decay="step")
    with pytest.raises(ValueError):
        _setup(tmp_path, epochs=0)
