"""Image training: dataset -> UNet -> Trainer, on one process or many (DDP).

`launch(config, options)` is what `ddpmkit train` calls with the resolved config and the launch
options (devices, resume, overwrite, ...: plain values). It runs one process, spawns
`--num-gpus` processes (`--distributed --rigid-launch`), or joins the process group torchrun set
up (also after an elastic restart, which resumes from the newest checkpoint).

Batches are split the same way whatever the number of processes: the global batch of an update
is a contiguous slice of the epoch's permutation (DistributedSampler with one replica per
process), and its timesteps, noise, flips (and, for a class-conditional model, the
label-dropout draws) are drawn for the whole global batch from one generator seeded
identically on every process, each process taking the slots of its own examples. So N
processes with global batch B compute the same update as one process with B (up to float
summation order and dropout, whose RNG is per process).
"""

import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DistributedSampler

from ddpmkit.build import build_diffusion
from ddpmkit.config import facts
from ddpmkit.config.facts import (  # noqa: F401 (IMAGE_LIST_NAME: its old public place)
    IMAGE_LIST_NAME,
    checkpoint_folder,
    elastic_restart,
    read_image_list,
)
from ddpmkit.config.run import DatasetCfg, ImageRunConfig, plain_value
from ddpmkit.config.schema import size_hw
from ddpmkit.errors import UserError, signal_name
from ddpmkit.runtime import distributed as dist_utils
from ddpmkit.runtime.devices import autocast_dtype, compile_mode, compile_module, resolve_precision
from ddpmkit.runtime.stops import StopFlag, exit_code
from ddpmkit.training.run_folder import RunFolder
from ddpmkit.training.trainer import Callback, Trainer
from ddpmkit.utils.io import check_writable_folder

logger = logging.getLogger(__name__)

# Seeds derived from the run seed, kept apart so no two streams coincide.
LOADER_SEED_OFFSET = 1
GRID_SEED_OFFSET = 2


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
        with self._autocast():
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
            with trainer._autocast():
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


def run_dirs(config: ImageRunConfig) -> Dict[str, str]:
    run = config.run
    return {
        "chkpt": checkpoint_folder(run.to_dict()),
        "images": os.path.join(os.path.expanduser(run.image_dir), run.exp_name),
    }


def _architecture(config: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a config a checkpoint's weights and optimizer depend on."""
    return {"model": config.get("model"),
            "diffusion": {k: config.get("diffusion", {}).get(k)
                          for k in ("model_var_type", "timesteps")}}


def _check_same_architecture(state: Dict[str, Any], config: Dict[str, Any], path: str) -> None:
    saved = state.get("config")
    if not isinstance(saved, dict):
        return  # not ours: the weight loader reports any mismatch
    old, new = _architecture(saved), _architecture(config)
    if old != new:
        diffs = [f"{sec}.{k}: checkpoint {old[sec].get(k)!r} vs now {new[sec].get(k)!r}"
                 for sec in old for k in sorted(set(old[sec] or {}) | set(new[sec] or {}))
                 if (old[sec] or {}).get(k) != (new[sec] or {}).get(k)]
        raise UserError(f"checkpoint {path} was trained with a different config ("
                        f"{'; '.join(diffs[:4])}); resume with the same config and flags")


def complete_dataset_facts(config: Dict[str, Any],
                           run_images: Optional[List[str]] = None) -> Dict[str, Any]:
    """`config.facts.complete_dataset_facts` (in place), then the network checked against
    the image size."""
    from ddpmkit.models.unet import check_image_size

    config = facts.complete_dataset_facts(config, run_images)
    check_image_size(config["model"], *size_hw(config["dataset"]["resolution"]))
    return config


# float32 copies of the parameters in a checkpoint: the weights and Adam's two moments, plus
# the EMA weights when kept.
_COPIES_WITHOUT_EMA = 3


def checkpoint_bytes(config: ImageRunConfig) -> int:
    """About how many bytes one checkpoint of this run takes (counted on a network built on
    the meta device: no memory, no time, and the RNG left as it was)."""
    from ddpmkit.models import build_model

    diffusion = build_diffusion(config.diffusion.to_dict(), decoder="discretized")
    out_channels = diffusion.model_out_channels(config.dataset.channels)
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            model = build_model(config.model.to_dict(), out_channels)
    finally:
        torch.set_rng_state(rng)
    copies = _COPIES_WITHOUT_EMA + (1 if config.train.use_ema else 0)
    return copies * 4 * sum(p.numel() for p in model.parameters())


def prepare_run(config: ImageRunConfig, options: Dict[str, Any]) -> RunFolder:
    """The run folder, checked before any work: writable, and resumable or free (see
    `RunFolder`); loads the resume state (into `folder.resumed`)."""
    dirs, saved = run_dirs(config), config.to_dict()
    folder = RunFolder(dirs["chkpt"], config.run.chkpt_name, saved, dirs["images"])
    folder.preflight(checkpoint_bytes(config))
    precomputed = os.path.expanduser(options.get("precomputed_dir") or "")
    if config.eval.enabled and precomputed \
            and not os.path.isdir(precomputed):  # FID's reference statistics are cached there
        check_writable_folder(precomputed, "--precomputed-dir")
    restarted = elastic_restart()
    if restarted and options.get("overwrite") and not folder.holds_config(saved):
        # The first attempt died before it replaced the old run: replace it now.
        folder.check_new_run(overwrite=True)
        return folder
    folder.prepare(bool(options.get("resume")), options.get("chkpt_path"),
                   bool(options.get("overwrite")),
                   lambda state, path: _check_same_architecture(state, saved, path),
                   auto_resume=bool(options.get("auto_resume")) or restarted)
    return folder


def _folder_options(ds: DatasetCfg, folder: RunFolder):
    """How a folder run reads its images; a resumed run keeps the files it started with."""
    from ddpmkit.data.images import FolderOptions

    if ds.name != "folder":
        return None
    files = read_image_list(folder.folder) if folder.resumed is not None else None
    return FolderOptions.from_config(ds.to_dict(), files, report=False)


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


def _build_data(config: ImageRunConfig, info, device, folder):
    """(loader, micro-batch) for this process: a DistributedSampler over the whole dataset."""
    from ddpmkit.data.images import DATASETS, build_dataset, build_loader, default_num_workers

    tr, ds = config.train, config.dataset
    micro = dist_utils.micro_batch_size(tr.batch_size, info.world_size, tr.num_accum)
    split = ds.split or DATASETS[ds.name].train_split
    # Flips are drawn by the trainer (see ImageTrainer), so the dataset yields unflipped images.
    dataset = build_dataset(ds.name, ds.root, split=split, image_size=plain_value(ds.resolution),
                            download=ds.download, random_flip=False,
                            folder=_folder_options(ds, folder))
    if len(dataset) < micro * info.world_size:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                        f"({micro * info.world_size}); lower --batch-size")
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=tr.seed, drop_last=True)
    loader_gen = torch.Generator().manual_seed(tr.seed + LOADER_SEED_OFFSET)
    workers = default_num_workers() if ds.num_workers is None else ds.num_workers
    loader = build_loader(dataset, micro, shuffle=False, num_workers=workers, device=device,
                          drop_last=True, sampler=sampler, generator=loader_gen)
    if len(loader) < tr.num_accum:
        raise UserError("an epoch has fewer micro-batches than --num-accum; lower --batch-size")
    return loader, micro, len(dataset)


def _build_model(config: ImageRunConfig, info, device):
    """(diffusion, model, the network to train: DDP-wrapped and compiled as asked)."""
    from ddpmkit.models import build_model

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    diffusion = build_diffusion(config.diffusion.to_dict(), decoder="discretized")
    model = build_model(config.model.to_dict(),
                        diffusion.model_out_channels(config.dataset.channels)).to(device)
    # Off by default: on an H100 (torch 2.11, cuDNN 9.19) this UNet trained and sampled slower
    # in channels_last (README, performance section; the cause was not profiled).
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return diffusion, model, compile_module(net, compile_mode(config.train.compile))


def _callbacks(config: ImageRunConfig, options, diffusion, device, folder: RunFolder,
               loader) -> List[Callback]:
    tr, ds, ev = config.train, config.dataset, config.eval
    shape = (ds.channels, *size_hw(ds.resolution))
    grid = SampleGrid(diffusion, shape, run_dirs(config)["images"], every=tr.image_intv,
                      num=tr.num_samples, seed=tr.seed + GRID_SEED_OFFSET,
                      sampler_name=ev.sampler_name, steps=ev.subseq_size or None,
                      skip_schedule=ev.skip_schedule, guidance_scale=float(ev.guidance_scale))
    callbacks: List[Callback] = [folder, grid]
    if ds.name == "folder":
        callbacks.append(ImageListFile(folder.folder, [str(f) for f in loader.dataset.files]))
    if ev.enabled:
        from ddpmkit.training.eval_callback import FIDCallback

        callbacks.append(FIDCallback(config.to_dict(), diffusion, shape, device,
                                     inception_weights=options.get("inception_weights"),
                                     precomputed_dir=options.get("precomputed_dir"),
                                     eval_device=options.get("eval_device")))
    return callbacks


def _build_trainer(config: ImageRunConfig, options, info, device, loader, micro, diffusion,
                   net, folder: RunFolder, stop: StopFlag) -> ImageTrainer:
    tr = config.train
    return ImageTrainer(
        net, diffusion, loader, epochs=tr.epochs, lr=tr.lr, betas=(tr.beta1, tr.beta2),
        weight_decay=tr.weight_decay, optimizer="adamw" if tr.weight_decay > 0 else "adam",
        # Fused Adam: one kernel for all parameters on CUDA; on the CPU 1.06-1.13x faster steps
        # than the per-parameter loop (CIFAR-10 UNet, batch 8, bf16, one thread).
        fused=True,
        warmup_steps=tr.warmup, grad_clip=float(tr.grad_norm or 0.0), num_accum=tr.num_accum,
        ema_decay=float(tr.ema_decay) if tr.use_ema else None,
        device=device, seed=tr.seed, chkpt_dir=folder.folder,
        chkpt_prefix=config.run.chkpt_name, chkpt_intv=tr.chkpt_intv,
        chkpt_intv_steps=tr.chkpt_every_steps or 0,
        chkpt_every_minutes=float(tr.chkpt_every_minutes or 0.0), save_final=True,
        log_path=folder.log_path, log_every=tr.log_intv,
        tensorboard_dir=folder.tensorboard_dir, progress=True,
        callbacks=_callbacks(config, options, diffusion, device, folder, loader),
        config=config.to_dict(),
        is_main=info.is_main, rank=info.rank, world_size=info.world_size,
        control_group=dist_utils.control_group(), stop=stop,
        amp_dtype=autocast_dtype(tr.precision or "fp32"),
        throughput_key="img_per_s", random_flip=bool(config.dataset.random_flip),
        global_batch=tr.batch_size, micro_batch=micro,
        channels_last=bool(tr.channels_last),
        class_dropout=float(tr.class_dropout) if tr.class_cond else 0.0)


def train_worker(config: ImageRunConfig, options: Dict[str, Any]) -> int:
    """One training process (of one, of torchrun's, or of the spawned ones); returns the exit
    status (0, or 128 + the signal that stopped it)."""
    info = dist_utils.env_dist_info()
    device = dist_utils.process_device(options.get("train_device", "auto"), info)
    with StopFlag(announce=info.is_main) as stop:
        dist_utils.init_process_group(info, device)
        try:
            code = _train(config, options, info, device, stop)
            # Leave together: rank 0 may still be writing the last checkpoint, and a process
            # that tears down its process group while another still uses it can abort.
            dist_utils.barrier()
            return code
        finally:
            dist_utils.destroy_process_group()


def _train(config: ImageRunConfig, options, info, device, stop: StopFlag) -> int:
    precision = resolve_precision(config.train.precision, device)
    config = config.replace("train", precision=precision.name)  # the run records what it used
    tr = config.train
    if info.is_main:
        logger.info("precision %s (%s)", precision.name, precision.reason)
    torch.manual_seed(tr.seed + info.rank)  # model init (overwritten on resume), dropout
    folder = prepare_run(config, options)
    loader, micro, num_images = _build_data(config, info, device, folder)
    diffusion, model, net = _build_model(config, info, device)
    if info.is_main:
        logger.info("resolved config:\n%s", json.dumps(config.to_dict(), indent=2,
                                                       sort_keys=True))
        logger.info("%s: %d images, an epoch is %d updates of %d, model %.2fM parameters, "
                    "%d process(es), micro-batch %d, device %s", config.dataset.name,
                    num_images, len(loader) // tr.num_accum, tr.batch_size,
                    sum(p.numel() for p in model.parameters()) / 1e6, info.world_size, micro,
                    device)
    trainer = _build_trainer(config, options, info, device, loader, micro, diffusion, net,
                             folder, stop)
    if folder.resumed is not None:
        trainer.load_state_dict(folder.resumed.state)
        trainer.last_checkpoint = folder.resumed.path
        if info.is_main:
            logger.info("resumed from %s (epoch %d, step %d)", folder.resumed.path,
                        trainer.epoch, trainer.step)
        folder.resumed.state = {"step": trainer.step}  # free the loaded tensors
    max_steps = 1 if options.get("dry_run") else tr.max_steps
    result = trainer.fit(max_steps=max_steps)
    return _finish(trainer, result, options, max_steps, info)


def _finish(trainer: ImageTrainer, result, options, max_steps, info) -> int:
    grid = next(cb for cb in trainer.callbacks if isinstance(cb, SampleGrid))
    if result["stopped"] is not None:
        if info.is_main:
            logger.warning("stopped by %s at step %d; the state is in %s: continue with "
                           "--resume", signal_name(result["stopped"]), trainer.step,
                           trainer.last_checkpoint)
        return exit_code(result["stopped"])
    if options.get("dry_run") or (max_steps is not None and trainer.step >= max_steps):
        grid.save(trainer, f"step{trainer.step}")  # the final checkpoint is saved by fit()
    if info.is_main:
        logger.info("done: %d steps, %d epochs, last loss %s, checkpoint %s", result["step"],
                    result["epoch"], result["loss"], trainer.last_checkpoint)
    return 0


def launch(config: ImageRunConfig, options: Dict[str, Any]) -> int:
    """Run training in this process, under torchrun, or in spawned processes (the reference's
    `--distributed --rigid-launch --num-gpus N`); returns the exit status. `config`: resolved,
    its dataset facts completed (`config.resolve.resolve_image_run`)."""
    from ddpmkit.models.unet import check_image_size

    check_image_size(config.model.to_dict(), *size_hw(config.dataset.resolution))
    if options.get("distributed") and options.get("rigid_launch") \
            and not dist_utils.launched_by_torchrun():
        n = int(options.get("num_gpus", 1))
        dist_utils.check_spawn_devices(n, options.get("train_device", "auto"), "--train-device")
        codes = dist_utils.spawn(train_worker, n, (config, options))
        return max(codes, default=0)
    return train_worker(config, options)
