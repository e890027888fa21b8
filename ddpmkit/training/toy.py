"""The toy experiment's parts: the 2-D diffusion model, its evaluation that samples, scores
(2-D histogram KL against the estimator's floor; for the Gaussian mixtures, modes covered and
the share of points within 3 std of a mode) and plots it, and loading a trained toy model.

With `class_cond` the network is class-conditional on the mixture's mode index (gaussian8,
gaussian25), trained with label dropout `class_dropout`, and every evaluation asks for the
modes in turn (point i: mode i mod K) with guidance scale `guidance_scale`, reporting also the
share of points within 3 std of the mode asked for.

`ddpmkit train-toy` parses flags into a `ToyRunConfig` (flag names as fields) and calls
`recipes.toy.train_toy`, which uses these parts; they read the run's flat dict `c`
(`ToyRunConfig.to_dict()`).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from typing import Any, Callable

import torch

from ddpmkit.build import build_diffusion
from ddpmkit.checkpoints.files import load_checkpoint
from ddpmkit.config.toy_schema import toy_default
from ddpmkit.data.toy import (
    make_toy_data,
    toy_generator,
    toy_mixture,
)
from ddpmkit.errors import UserError
from ddpmkit.training.trainer import Callback

logger = logging.getLogger(__name__)

# Points of the true distribution the metrics compare against: enough that the histogram-KL
# floor (two samples of the same distribution) stays below 0.02 with 50,000 generated points
# on every toy dataset (measured: about 0.002 / 0.005 / 0.015 for gaussian8 / 25 / swissroll).
NUM_TRUE_EVAL_POINTS = 400_000
# Generated points per sampling batch (bounds memory for large --num-eval-samples).
SAMPLE_CHUNK = 65_536
# Seed offsets: separate, reproducible streams for the training data, the true evaluation
# points, the floor's reference points and the evaluation samples.
SEED_EVAL_TRUE, SEED_EVAL_REF, SEED_SAMPLING = 1, 2, 3

# Settings a checkpoint must share with the command resuming from it.
MUST_MATCH_ON_RESUME = ("dataset", "timesteps", "beta_schedule", "beta_start", "beta_end",
                        "model_mean_type", "model_var_type", "loss_type", "mid_features",
                        "num_temporal_layers", "fourier_features", "fourier_scale",
                        "class_cond", "loss_weight", "min_snr_gamma", "zero_terminal_snr")
# Settings newer than some checkpoints, with the value that reproduces what those computed:
# their defaults (a test holds the diffusion ones equal to the image schema's, which
# `build.build_diffusion` fills in for a toy checkpoint's dict that lacks them).
ADDED_LATER = {name: toy_default(name) for name in (
    "class_cond", "class_dropout", "guidance_scale", "loss_weight", "min_snr_gamma",
    "zero_terminal_snr")}
# The likelihood of the toy data: 2-D points are continuous (`build.build_diffusion(c, DECODER)`
# takes a toy run's flat dict: it reads the diffusion keys and ignores the others).
DECODER = "continuous"
# The evaluation plots `epoch_NNNN.png` and animation `train.<fmt>` in the image folder.
TOY_IMAGE_RE = re.compile(r"^(epoch_\d+\.png|train\.(gif|webp))$")


def num_classes(c: dict[str, Any]) -> int | None:
    """K (the mixture's modes) for a class-conditional run, else None."""
    if not c.get("class_cond"):
        return None
    mixture = toy_mixture(c["dataset"])
    if mixture is None:
        raise UserError(f"--class-cond needs labels, and {c['dataset']} has none (labels are "
                        "the mode index of gaussian8 / gaussian25)")
    return len(mixture.modes)


def build_model(c: dict[str, Any], diffusion):
    from ddpmkit.models.toy import ToyMLP

    return ToyMLP(in_features=2, mid_features=c["mid_features"],
                  num_temporal_layers=c["num_temporal_layers"],
                  out_features=diffusion.model_out_channels(2),
                  fourier_features=c["fourier_features"], fourier_scale=c["fourier_scale"],
                  fourier_seed=c["seed"], num_classes=num_classes(c))


def build_sampler(c: dict[str, Any], diffusion):
    from ddpmkit.diffusion import make_sampler

    try:
        return make_sampler(diffusion, c["sampler"], steps=c["steps"], eta=c["eta"])
    except ValueError as exc:
        raise UserError(str(exc)) from exc


class ToyEvaluation:
    """Samples, scores and plots a toy model (used as a training callback and at the end)."""

    def __init__(self, c: dict[str, Any], diffusion, device: torch.device, image_dir: str,
                 report: Callable[[str], None] = logger.info):
        from ddpmkit.metrics.toy import ToyEvaluator

        self.c = c
        self.report = report
        self.diffusion = diffusion
        self.sampler = build_sampler(c, diffusion)
        self.device = device
        self.image_dir = image_dir
        name, seed = c["dataset"], c["seed"]
        self.true = make_toy_data(name, NUM_TRUE_EVAL_POINTS, toy_generator(seed + SEED_EVAL_TRUE))
        mixture = toy_mixture(name)
        self.evaluator = ToyEvaluator(
            self.true, modes=None if mixture is None else mixture.modes,
            std=None if mixture is None else mixture.std)
        self.mixture = mixture
        self.num_classes = num_classes(c)
        self.guidance_scale = c.get("guidance_scale") or 0.0
        self._floors: dict[int, float] = {}
        self.history: list[dict[str, Any]] = []

    def floor(self, n: int) -> float:
        """KL(true || an independent true sample of n points): the best score n points get."""
        if n not in self._floors:
            ref = make_toy_data(self.c["dataset"], n,
                                toy_generator(self.c["seed"] + SEED_EVAL_REF))
            self._floors[n] = self.evaluator.kl(ref)
        return self._floors[n]

    def labels(self, n: int) -> torch.Tensor | None:
        """The modes the n evaluation points ask for: point i mode i mod K (None: unlabeled)."""
        return None if self.num_classes is None else torch.arange(n) % self.num_classes

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, n: int, epoch: int,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """n points; a class-conditional model's point i asks for mode i mod K, guided with
        `guidance_scale` (default: the run's)."""
        from ddpmkit.diffusion import classifier_free_guidance, sample

        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        labels = self.labels(n)
        learned = self.diffusion.model_var_type == "learned"
        was_training = model.training
        model.eval()
        g = torch.Generator(device=self.device)
        g.manual_seed(self.c["seed"] * 100_003 + SEED_SAMPLING * 1_009 + epoch)
        out = []
        for start in range(0, n, SAMPLE_CHUNK):
            size = min(SAMPLE_CHUNK, n - start)
            x_T = torch.randn(size, 2, generator=g, device=self.device)
            fn = model if labels is None else classifier_free_guidance(
                model, labels[start:start + size].to(self.device), self.num_classes, scale,
                learned)
            out.append(sample(self.diffusion, fn, self.sampler, x_T, clip_denoised=False,
                              generator=g).float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def score(self, gen: torch.Tensor, guidance_scale: float | None = None) -> dict[str, Any]:
        """Today's metrics, plus for a class-conditional run the share of points on the
        requested mode (and the guidance scale they were made with: default the run's)."""
        from ddpmkit.metrics.toy import requested_mode_stats

        metrics = self.evaluator.evaluate(gen)
        if self.num_classes is not None:
            metrics.update(requested_mode_stats(gen, self.labels(len(gen)), self.mixture.modes,
                                                self.mixture.std))
            metrics["guidance_scale"] = (self.guidance_scale if guidance_scale is None
                                         else guidance_scale)
        return metrics

    def run(self, model: torch.nn.Module, epoch: int, n: int) -> dict[str, Any]:
        from ddpmkit.utils.plots import save_scatter

        t0 = time.perf_counter()
        gen = self.generate(model, n, epoch)
        sample_s = time.perf_counter() - t0
        metrics = self.score(gen)
        metrics["kl_floor"] = self.floor(n)
        metrics["num_samples"] = n
        metrics["sample_s"] = round(sample_s, 2)
        metrics["epoch"] = epoch
        self.report(f"[eval] epoch {epoch}: {format_metrics(metrics)}")
        path = os.path.join(self.image_dir, f"epoch_{epoch:04d}.png")
        title = f"{self.c['dataset']}, epoch {epoch}: {format_metrics(metrics, short=True)}"
        save_scatter(path, self.true[:n], gen, title=title,
                     value_range=self.evaluator.value_range)
        self.history.append(metrics)
        return metrics


def format_metrics(m: dict[str, Any], short: bool = False) -> str:
    parts = [f"hist-KL {m['kl']:.4f} (floor {m['kl_floor']:.4f})"]
    if "modes_covered" in m:
        parts.append(f"modes {m['modes_covered']}/{m['num_modes']}")
        parts.append(f"within 3 std {100 * m['high_quality']:.1f}%")
    if "on_requested_mode" in m:
        parts.append(f"on the requested mode {100 * m['on_requested_mode']:.1f}% (worst mode "
                     f"{100 * m['worst_requested_mode']:.1f}%, w {m['guidance_scale']:g})")
    if m.get("non_finite"):
        parts.append(f"{m['non_finite']} non-finite")
    if not short:
        parts.append(f"[{m['num_samples']:,} samples, {m['sample_s']:.1f} s]")
    return ", ".join(parts)


class ToyEvalCallback(Callback):
    """Every `eval_intv` epochs and at the last one: sample, score, plot, log."""

    def __init__(self, evaluation: ToyEvaluation, c: dict[str, Any]):
        self.evaluation = evaluation
        self.c = c
        self.final: dict[str, Any] | None = None

    def on_epoch_end(self, trainer) -> None:
        last = trainer.epoch == trainer.epochs
        if not last and trainer.epoch % self.c["eval_intv"]:
            return
        n = self.c["num_eval_samples"] if last else self.c["num_interim_samples"]
        metrics = self.evaluation.run(trainer.sampling_model, trainer.epoch, n)
        trainer.log_record({"step": trainer.step, "epoch": trainer.epoch,
                            "eval": {k: v for k, v in metrics.items() if k != "mode_counts"}})
        if last:
            self.final = metrics


def load_toy_model(path: str, device: Any = "cpu", use_ema: bool = True):
    """(network in eval mode, its run config `c`) from a `train-toy` checkpoint: the EMA
    weights when the run kept them and `use_ema`, else the trained ones."""
    state = load_checkpoint(path)
    c = state.get("config")
    if not isinstance(c, dict) or "mid_features" not in c:
        raise UserError(f"{path} is not a train-toy checkpoint (its config has no toy network)")
    model = build_model(c, build_diffusion(c, DECODER))
    ema = state.get("ema")
    model.load_state_dict(ema["shadow"] if use_ema and ema else state["model"])
    return model.to(device).eval(), c


def guidance_curve(evaluation: ToyEvaluation, model: torch.nn.Module, scales, n: int,
                   seed_offset: int = 0) -> list[dict[str, Any]]:
    """Score n samples of a class-conditional toy model at each guidance scale in `scales`
    (the same x_T for all): one metrics dict per scale, as the evaluations report them."""
    rows = []
    for scale in scales:
        gen = evaluation.generate(model, n, seed_offset, guidance_scale=float(scale))
        metrics = evaluation.score(gen, guidance_scale=float(scale))
        rows.append({k: v for k, v in metrics.items() if k != "mode_counts"})
    return rows


def write_animation(image_dir: str, fmt: str) -> str | None:
    from ddpmkit.utils.images import PLOT_FRAMES, save_animation

    frames = sorted(glob.glob(os.path.join(image_dir, "epoch_*.png")))
    if fmt == "none" or not frames:
        return None
    path = os.path.join(image_dir, f"train.{fmt}")
    try:
        save_animation(path, frames, PLOT_FRAMES)
    except (ValueError, OSError) as exc:
        raise UserError(f"could not write the animation {path}: {exc}") from exc
    return path
