"""The parts of image training: the trainer's global draws (`ImageTrainer`), sample grids
(`SampleGrid`) and a folder run's image list (`ImageListFile`). The run itself is
`recipes.image.launch`.

Batches are split the same way whatever the number of processes: the global batch of an update
is a contiguous slice of the epoch's permutation (DistributedSampler with one replica per
process), and its timesteps, noise, flips (and, for a class-conditional model, the
label-dropout draws) are drawn for the whole global batch from one generator seeded
identically on every process, each process taking the slots of its own examples. So N
processes with global batch B compute the same update as one process with B (up to float
summation order and dropout, whose RNG is per process).
"""

import logging
import os
from typing import Dict, Optional

import torch

from ddpmkit.config.facts import IMAGE_LIST_NAME
from ddpmkit.training.trainer import Callback, Trainer

logger = logging.getLogger(__name__)



class ImageTrainer(Trainer):
    """The Trainer with per-update global draws of t, noise and flips (see the module doc)."""

    def __init__(self, *args, random_flip: bool = False, global_batch: int, micro_batch: int,
                 seed: int = 0, channels_last: bool = False, **kwargs):
        super().__init__(*args, seed=seed, **kwargs)
        self.generator.manual_seed(int(seed))  # the same stream on every process
        self.random_flip = random_flip
        self.channels_last = channels_last
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self._draws: Optional[Dict[str, torch.Tensor]] = None

    def _slots(self) -> slice:
        """Global slots of this process's examples in the current micro-batch."""
        W, m, a = self.world_size, self.micro_batch, self.micro_index
        return slice(a * m * W + self.rank, (a + 1) * m * W, W)

    def _draw(self, shape: torch.Size) -> Dict[str, torch.Tensor]:
        B = self.global_batch
        g = self.generator
        draws = {
            "t": torch.randint(self.diffusion.T, (B,), device=self.device, generator=g),
            "noise": torch.randn((B, *shape[1:]), device=self.device, generator=g),
            "flip": torch.rand(B, device=self.device, generator=g) < 0.5,
        }
        if self.num_classes is not None:  # drawn last: unconditional runs keep their stream
            draws["drop"] = torch.rand(B, device=self.device, generator=g)
        return draws

    def compute_loss(self, x_0: torch.Tensor) -> torch.Tensor:
        if self.micro_index == 0 or self._draws is None:
            self._draws = self._draw(x_0.shape)
        s = self._slots()
        t, noise = self._draws["t"][s], self._draws["noise"][s].to(x_0.dtype)
        if self.random_flip:
            flip = self._draws["flip"][s].view(-1, 1, 1, 1)
            x_0 = torch.where(flip, x_0.flip(-1), x_0)
        if self.channels_last:
            x_0 = x_0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        y = None
        if self.labels is not None:
            y = self.drop_labels(self.labels, self._draws["drop"][s])
        with self.autocast():
            losses = self.diffusion.training_losses(self.denoiser(y), x_0, t, noise)
        return losses.float().mean()


class SampleGrid(Callback):
    """Every `every` epochs (and after a dry run), sample a grid with the EMA weights from a fixed
    x_T, so grids of different epochs are comparable."""

    def __init__(self, diffusion, shape, folder: str, every: int, num: int, seed: int,
                 sampler_name: str = "ddpm", steps: Optional[int] = None,
                 skip_schedule: str = "linear", guidance_scale: float = 1.0):
        self.diffusion, self.shape, self.folder = diffusion, tuple(shape), folder
        self.every, self.num, self.seed = every, num, seed
        self.sampler_name, self.steps, self.skip_schedule = sampler_name, steps, skip_schedule
        self.guidance_scale = guidance_scale

    def _layout(self, num_classes: Optional[int]):
        """(images, images per row, denoise_fn maker): a class-conditional model gets one class
        per row (K rows of num // K, guided); an unconditional one, or a grid of fewer images
        than classes, the plain grid (a conditional network then predicts for "no class")."""
        from ddpmkit.diffusion import classifier_free_guidance

        if num_classes is None or self.num < num_classes:
            return self.num, None, lambda model, device: model
        cols = self.num // num_classes
        learned = self.diffusion.model_var_type == "learned"

        def denoiser(model, device):
            y = torch.arange(num_classes, device=device).repeat_interleave(cols)  # (K cols,)
            return classifier_free_guidance(model, y, num_classes, self.guidance_scale, learned)

        return num_classes * cols, cols, denoiser

    def save(self, trainer: Trainer, name: str) -> Optional[str]:
        if not trainer.is_main or self.num <= 0:
            return None
        from ddpmkit.diffusion import make_sampler, sample
        from ddpmkit.utils.images import save_grid, to_uint8

        model = trainer.sampling_model
        num, cols, denoiser = self._layout(trainer.num_classes)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        x_T = torch.randn((num, *self.shape), generator=g).to(trainer.device)
        was_training = model.training
        model.eval()
        sampler = make_sampler(self.diffusion, self.sampler_name, steps=self.steps,
                               skip_schedule=self.skip_schedule)
        try:
            with trainer.autocast():
                x_0 = sample(self.diffusion, denoiser(model, trainer.device), sampler, x_T,
                             generator=torch.Generator(device=trainer.device).manual_seed(
                                 self.seed))
        finally:
            model.train(was_training)
        path = os.path.join(self.folder, f"{name}.png")
        os.makedirs(self.folder, exist_ok=True)
        save_grid(path, to_uint8(x_0.float()), nrow=cols)
        logger.info("saved sample grid %s", path)
        return path

    def on_epoch_end(self, trainer: Trainer) -> None:
        if self.every and trainer.epoch % self.every == 0:
            self.save(trainer, f"{trainer.epoch}")


class ImageListFile(Callback):
    """Writes a folder run's image list (IMAGE_LIST_NAME) when the run starts (main process),
    after the run folder has been set up."""

    def __init__(self, folder: str, files):
        self.folder, self.files = folder, files

    def on_run_start(self, trainer: Trainer) -> None:
        from ddpmkit.utils.io import atomic_write_bytes

        if trainer.is_main:
            text = "".join(f"{name}\n" for name in self.files)
            atomic_write_bytes(os.path.join(self.folder, IMAGE_LIST_NAME), text.encode())
