"""Image training: dataset -> UNet -> Trainer, on one process or many (DDP).

`launch(config, args)` is what `ddpmkit train` calls with the resolved config. It runs one
process, spawns `--num-gpus` processes (`--distributed --rigid-launch`), or joins the process
group torchrun set up.

Batches are split the same way whatever the number of processes: the global batch of an update
is a contiguous slice of the epoch's permutation (DistributedSampler with one replica per
process), and its timesteps, noise and flips are drawn for the whole global batch from one
generator seeded identically on every process, each process taking the slots of its own
examples. So N processes with global batch B compute the same update as one process with B
(up to float summation order and dropout, whose RNG is per process).
"""

import argparse
import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DistributedSampler

from ddpmkit.build import build_diffusion
from ddpmkit.config import dump_json
from ddpmkit.devices import compile_mode, compile_module, resolve_device
from ddpmkit.errors import UserError
from ddpmkit.training import distributed as dist_utils
from ddpmkit.training.checkpoint import latest_checkpoint, load_checkpoint
from ddpmkit.training.trainer import Callback, Trainer

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
        return {
            "t": torch.randint(self.diffusion.T, (B,), device=self.device, generator=g),
            "noise": torch.randn((B, *shape[1:]), device=self.device, generator=g),
            "flip": torch.rand(B, device=self.device, generator=g) < 0.5,
        }

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
        with self._autocast():
            losses = self.diffusion.training_losses(self.model, x_0, t, noise)
        return losses.float().mean()


class SampleGrid(Callback):
    """Every `every` epochs (and after a dry run), sample a grid with the EMA weights from a fixed
    x_T, so grids of different epochs are comparable."""

    def __init__(self, diffusion, shape, folder: str, every: int, num: int, seed: int,
                 sampler_name: str = "ddpm", steps: Optional[int] = None,
                 skip_schedule: str = "linear"):
        self.diffusion, self.shape, self.folder = diffusion, tuple(shape), folder
        self.every, self.num, self.seed = every, num, seed
        self.sampler_name, self.steps, self.skip_schedule = sampler_name, steps, skip_schedule

    def save(self, trainer: Trainer, name: str) -> Optional[str]:
        if not trainer.is_main or self.num <= 0:
            return None
        from ddpmkit.diffusion import make_sampler, sample
        from ddpmkit.utils.images import save_grid, to_uint8

        g = torch.Generator(device="cpu").manual_seed(self.seed)
        x_T = torch.randn((self.num, *self.shape), generator=g).to(trainer.device)
        model = trainer.sampling_model
        was_training = model.training
        model.eval()
        sampler = make_sampler(self.diffusion, self.sampler_name, steps=self.steps,
                               skip_schedule=self.skip_schedule)
        try:
            with trainer._autocast():
                x_0 = sample(self.diffusion, model, sampler, x_T,
                             generator=torch.Generator(device=trainer.device).manual_seed(
                                 self.seed))
        finally:
            model.train(was_training)
        path = os.path.join(self.folder, f"{name}.png")
        os.makedirs(self.folder, exist_ok=True)
        save_grid(path, to_uint8(x_0.float()))
        logger.info("saved sample grid %s", path)
        return path

    def on_epoch_end(self, trainer: Trainer) -> None:
        if self.every and trainer.epoch % self.every == 0:
            self.save(trainer, f"{trainer.epoch}")


def run_dirs(config: Dict[str, Any]) -> Dict[str, str]:
    run = config["run"]
    return {
        "chkpt": os.path.join(run["chkpt_dir"], run["exp_name"]),
        "images": os.path.join(run["image_dir"], run["exp_name"]),
    }


def _architecture(config: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a config a checkpoint's weights and optimizer depend on."""
    return {"model": config.get("model"),
            "diffusion": {k: config.get("diffusion", {}).get(k)
                          for k in ("model_var_type", "timesteps")}}


def find_resume_path(config: Dict[str, Any], args: argparse.Namespace) -> Optional[str]:
    """--chkpt-path, else the newest checkpoint of the run; None when not resuming."""
    elastic_restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if not (args.resume or elastic_restart):
        return None
    if args.chkpt_path:
        return args.chkpt_path
    folder = run_dirs(config)["chkpt"]
    path = latest_checkpoint(folder, f"{config['run']['chkpt_name']}_*.pt")
    if path is None and args.resume:
        raise UserError(f"--resume: no checkpoint found in {folder}; pass --chkpt-path FILE or "
                        "start without --resume")
    return path


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


def train_worker(config: Dict[str, Any], args: argparse.Namespace) -> int:
    """One training process (of one, of torchrun's, or of the spawned ones)."""
    info = dist_utils.env_dist_info()
    device = dist_utils.process_device(resolve_device(args.train_device), info)
    dist_utils.init_process_group(info, device)
    try:
        code = _train(config, args, info, device)
        # Leave together: rank 0 may still be writing the last checkpoint, and a process that
        # tears down its process group while another still uses it can abort.
        dist_utils.barrier()
        return code
    finally:
        dist_utils.destroy_process_group()


def _train(config, args, info, device) -> int:
    from ddpmkit.data.images import DATASETS, build_dataset, build_loader
    from ddpmkit.models import build_model

    tr, ds = config["train"], config["dataset"]
    seed = int(tr["seed"])
    torch.manual_seed(seed + info.rank)  # model init (overwritten on resume) and dropout
    micro = dist_utils.micro_batch_size(int(tr["batch_size"]), info.world_size,
                                        int(tr["num_accum"]))
    split = getattr(args, "split", None) or DATASETS[ds["name"]].train_split
    random_flip = ds.get("random_flip", DATASETS[ds["name"]].random_flip)
    # Flips are drawn by the trainer (see ImageTrainer), so the dataset yields unflipped images.
    dataset = build_dataset(ds["name"], ds["root"], split=split, image_size=ds.get("resolution"),
                            download=bool(ds.get("download")), random_flip=False)
    if len(dataset) < micro * info.world_size:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                        f"({micro * info.world_size}); lower --batch-size")
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    loader_gen = torch.Generator().manual_seed(seed + LOADER_SEED_OFFSET)
    loader = build_loader(dataset, micro, shuffle=False, num_workers=int(ds["num_workers"]),
                          device=device, drop_last=True, sampler=sampler, generator=loader_gen)
    if len(loader) < int(tr["num_accum"]):
        raise UserError("an epoch has fewer micro-batches than --num-accum; lower --batch-size")

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    channels, resolution = int(ds.get("channels", 3)), int(ds["resolution"])
    diffusion = build_diffusion(config["diffusion"], decoder="discretized")
    model = build_model(config["model"], diffusion.model_out_channels(channels)).to(device)
    # Off by default: on an H100 (torch 2.11, cuDNN 9.19) this UNet trained and sampled slower
    # in channels_last (README, performance section; the cause was not profiled).
    channels_last = bool(tr.get("channels_last"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    net = compile_module(net, compile_mode(tr.get("compile")))

    dirs = run_dirs(config)
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("resolved config:\n%s", json.dumps(config, indent=2, sort_keys=True))
        logger.info("%s: %d images, model %.2fM parameters, %d process(es), micro-batch %d, "
                    "device %s", ds["name"], len(dataset), n_params / 1e6, info.world_size,
                    micro, device)
        os.makedirs(dirs["chkpt"], exist_ok=True)
        dump_json(config, os.path.join(dirs["chkpt"], "config.json"))

    ev = config.get("eval", {})
    grid = SampleGrid(diffusion, (channels, resolution, resolution), dirs["images"],
                      every=int(tr["image_intv"]), num=int(tr["num_samples"]),
                      seed=seed + GRID_SEED_OFFSET,
                      sampler_name="ddim" if ev.get("use_ddim") else "ddpm",
                      steps=int(ev.get("subseq_size") or 0) or None,
                      skip_schedule=ev.get("skip_schedule", "linear"))
    callbacks: List[Callback] = [grid]
    if ev.get("enabled"):
        from ddpmkit.training.eval_callback import FIDCallback

        callbacks.append(FIDCallback(config, args, diffusion, (channels, resolution, resolution),
                                     device))
    trainer = ImageTrainer(
        net, diffusion, loader, epochs=int(tr["epochs"]), lr=float(tr["lr"]),
        betas=(float(tr["beta1"]), float(tr["beta2"])),
        weight_decay=float(tr.get("weight_decay", 0.0)),
        optimizer="adamw" if float(tr.get("weight_decay", 0.0)) > 0 else "adam",
        # Fused Adam: one kernel for all parameters on CUDA; on the CPU 1.06-1.13x faster steps
        # than the per-parameter loop (CIFAR-10 UNet, batch 8, bf16, one thread).
        fused=True,
        warmup_steps=int(tr["warmup"]), grad_clip=float(tr.get("grad_norm") or 0.0),
        num_accum=int(tr["num_accum"]),
        ema_decay=float(tr["ema_decay"]) if tr.get("use_ema") else None,
        device=device, seed=seed, chkpt_dir=dirs["chkpt"],
        chkpt_name=config["run"]["chkpt_name"] + "_{epoch}.pt",
        chkpt_intv=int(tr["chkpt_intv"]), save_final=True,
        log_path=os.path.join(dirs["chkpt"], "log.jsonl"), log_every=int(tr["log_intv"]),
        tensorboard_dir=os.path.join(dirs["chkpt"], "tensorboard"),
        progress=True, callbacks=callbacks, config=config, is_main=info.is_main,
        rank=info.rank, world_size=info.world_size,
        amp_dtype=torch.bfloat16 if tr.get("precision") == "bf16" else None, throughput_key="img_per_s",
        random_flip=bool(random_flip), global_batch=int(tr["batch_size"]), micro_batch=micro,
        channels_last=channels_last)

    resume_path = find_resume_path(config, args)
    if resume_path:
        state = load_checkpoint(resume_path, map_location="cpu")
        _check_same_architecture(state, config, resume_path)
        trainer.load_state_dict(state)
        trainer.last_checkpoint = resume_path
        if info.is_main:
            logger.info("resumed from %s (epoch %d, step %d)", resume_path, trainer.epoch,
                        trainer.step)

    max_steps = 1 if args.dry_run else tr.get("max_steps")
    result = trainer.fit(max_steps=max_steps)
    if args.dry_run or (max_steps is not None and trainer.step >= max_steps):
        grid.save(trainer, f"step{trainer.step}")  # the final checkpoint is saved by fit()
    if info.is_main:
        logger.info("done: %d steps, %d epochs, last loss %s, checkpoint %s", result["step"],
                    result["epoch"], result["loss"], trainer.last_checkpoint)
    return 0


def launch(config: Dict[str, Any], args: argparse.Namespace) -> int:
    """Run training in this process, under torchrun, or in spawned processes."""
    if args.distributed and args.rigid_launch and not dist_utils.launched_by_torchrun():
        dist_utils.spawn(train_worker, args.num_gpus, (config, args))
        return 0
    return train_worker(config, args)
