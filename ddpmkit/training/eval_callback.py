"""FID (and precision/recall) during training (`--eval`), with the same code as `ddpmkit eval`.

Every `eval.intv` epochs each process samples its share of `eval.total_size` images with the
EMA weights (seeded by sample index, as `ddpmkit generate` does; a class-conditional model
with every class in turn and guidance scale `eval.guidance_scale`), extracts Inception features,
and the main process gathers them and scores them against the cached reference statistics of
the training set. Missing Inception weights or reference data are reported before training
starts, not after the first epochs.
"""

import logging
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ddpmkit.config.run import DatasetCfg, EvalCfg
from ddpmkit.runtime.devices import resolve_device
from ddpmkit.training.trainer import Callback, Trainer

logger = logging.getLogger(__name__)

EVAL_SEED = 0  # the same sample noise at every evaluation, so scores differ only by the model


class FIDCallback(Callback):
    """Evaluations as the run's `eval` section asks, against the reference statistics of its
    training set (`dataset`: its name and root)."""

    def __init__(self, ev: EvalCfg, dataset: DatasetCfg, diffusion, shape: Sequence[int],
                 device: torch.device, inception_weights: Optional[str] = None,
                 precomputed_dir: Optional[str] = None, eval_device: Optional[str] = None):
        self.every = int(ev.intv or 0)
        self.total = int(ev.total_size)
        self.batch = int(ev.batch_size)
        self.sampler_name = ev.sampler_name
        self.steps = int(ev.subseq_size or 0) or None
        self.skip_schedule = ev.skip_schedule
        self.guidance_scale = float(ev.guidance_scale)
        self.metrics = ("fid", "pr")
        self.diffusion, self.shape = diffusion, tuple(shape)
        self.dataset = dataset
        self.weights = inception_weights
        self.precomputed_dir = precomputed_dir or "./precomputed"
        self.device = device if eval_device in (None, "auto") else resolve_device(eval_device)
        self.inception = None
        self.ref_stats = None

    def on_train_start(self, trainer: Trainer) -> None:
        from ddpmkit.metrics import load_fid_inception
        from ddpmkit.metrics.stats import dataset_reference_stats

        self.inception = load_fid_inception(self.weights, device=self.device)
        if trainer.is_main:
            self.ref_stats = dataset_reference_stats(
                self.inception, self.dataset.name, self.dataset.root,
                self.precomputed_dir, split="train", progress=True)

    def evaluate(self, trainer: Trainer) -> Optional[Dict[str, float]]:
        from ddpmkit.diffusion import make_sampler
        from ddpmkit.metrics import compute_metrics, extract_features
        from ddpmkit.metrics.inception import InceptionFeatures
        from ddpmkit.sampling import DistEnv, Guidance, class_labels, sample_indexed, shard
        from ddpmkit.utils.images import quantize

        env = DistEnv(trainer.rank, trainer.world_size)
        model = trainer.sampling_model
        was_training = model.training
        model.eval()
        sampler = make_sampler(self.diffusion, self.sampler_name, steps=self.steps,
                               skip_schedule=self.skip_schedule)
        mine = list(shard(self.total, env))
        net = model
        if trainer.num_classes is not None:
            net = Guidance(model, class_labels(trainer.num_classes), self.guidance_scale,
                           self.diffusion.model_var_type == "learned")

        def batches():
            for first in range(0, len(mine), self.batch):
                idx = mine[first:first + self.batch]
                with trainer.autocast():
                    x = sample_indexed(self.diffusion, net, sampler, idx, self.shape,
                                       EVAL_SEED, trainer.device)
                yield quantize(x)

        try:
            feats = extract_features(self.inception, batches())
        finally:
            model.train(was_training)
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (feats.pool, feats.logits_unbiased))
            feats = InceptionFeatures(np.concatenate([g[0] for g in gathered]),
                                      np.concatenate([g[1] for g in gathered]))
        if not trainer.is_main:
            return None
        results = compute_metrics(feats, self.ref_stats, self.metrics, device=self.device)
        trainer.log_record({"step": trainer.step, "epoch": trainer.epoch, **results})
        logger.info("epoch %d: %s", trainer.epoch,
                    "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results

    def on_epoch_end(self, trainer: Trainer) -> None:
        if self.every and trainer.epoch % self.every == 0:
            self.evaluate(trainer)
