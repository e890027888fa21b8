"""The image recipe: dataset -> UNet -> `ImageTrainer`, on one process or many (DDP).

`launch(config, options)` is what `ddpmkit train` calls with the frozen, resolved config
(`config.resolve.resolve_image_run`) and the launch options (devices, resume, overwrite, ...:
plain values). It runs one process, spawns `--num-gpus` processes (`--distributed
--rigid-launch`), or joins the process group torchrun set up (also after an elastic restart,
which resumes from the newest checkpoint). What differs from the toy recipe comes in as small
objects: the data loader, the network, the trainer's global draws (`ImageTrainer`) and the
evaluations (`SampleGrid`, `FIDCallback`); resume and stop handling are `recipes.common`'s.
"""

import json
import logging
import os
from typing import Any, Dict, List, Tuple

import torch
from torch.utils.data import DistributedSampler

from ddpmkit.build import build_diffusion
from ddpmkit.config.facts import checkpoint_folder, elastic_restart, read_image_list
from ddpmkit.config.run import DatasetCfg, ImageRunConfig, plain_value
from ddpmkit.config.schema import size_hw
from ddpmkit.errors import UserError
from ddpmkit.recipes.common import (
    checkpoint_bytes,
    prepare_folder,
    resume_from,
    stop_exit_code,
    trainer_options,
)
from ddpmkit.runtime import distributed as dist_utils
from ddpmkit.runtime.devices import autocast_dtype, compile_mode, compile_module, resolve_precision
from ddpmkit.runtime.stops import StopFlag
from ddpmkit.training.callbacks import Callback
from ddpmkit.training.images import ImageListFile, ImageTrainer, SampleGrid
from ddpmkit.training.run_folder import RunFolder
from ddpmkit.utils.io import check_writable_folder

logger = logging.getLogger(__name__)

# Seeds derived from the run seed, kept apart so no two streams coincide.
LOADER_SEED_OFFSET = 1
GRID_SEED_OFFSET = 2


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


def image_checkpoint_bytes(config: ImageRunConfig) -> int:
    """About how many bytes one checkpoint of this run takes."""
    from ddpmkit.models import build_model

    diffusion = build_diffusion(config.diffusion.to_dict(), decoder="discretized")
    out_channels = diffusion.model_out_channels(config.dataset.channels)
    return checkpoint_bytes(lambda: build_model(config.model.to_dict(), out_channels),
                            config.train.use_ema)


def prepare_run(config: ImageRunConfig, options: Dict[str, Any]) -> RunFolder:
    """The run folder, checked before any work: writable, and resumable or free (see
    `RunFolder`); loads the resume state (into `folder.resumed`)."""
    dirs, saved = run_dirs(config), config.to_dict()
    precomputed = os.path.expanduser(options.get("precomputed_dir") or "")
    if config.eval.enabled and precomputed \
            and not os.path.isdir(precomputed):  # FID's reference statistics are cached there
        check_writable_folder(precomputed, "--precomputed-dir")
    folder = RunFolder(dirs["chkpt"], config.run.chkpt_name, saved, dirs["images"])
    return prepare_folder(folder, options,
                          lambda state, path: _check_same_architecture(state, saved, path),
                          image_checkpoint_bytes(config), restarted=elastic_restart())


def _folder_options(ds: DatasetCfg, folder: RunFolder):
    """How a folder run reads its images; a resumed run keeps the files it started with."""
    from ddpmkit.data.images import FolderOptions

    if ds.name != "folder":
        return None
    files = read_image_list(folder.folder) if folder.resumed is not None else None
    return FolderOptions.from_config(ds.to_dict(), files, report=False)


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
               loader) -> Tuple[List[Callback], SampleGrid]:
    """The run's callbacks besides its folder, and among them its sample grid (`_finish`
    saves a last one)."""
    tr, ds, ev = config.train, config.dataset, config.eval
    shape = (ds.channels, *size_hw(ds.resolution))
    grid = SampleGrid(diffusion, shape, run_dirs(config)["images"], every=tr.image_intv,
                      num=tr.num_samples, seed=tr.seed + GRID_SEED_OFFSET,
                      sampler_name=ev.sampler_name, steps=ev.subseq_size or None,
                      skip_schedule=ev.skip_schedule, guidance_scale=float(ev.guidance_scale))
    callbacks: List[Callback] = [grid]
    if ds.name == "folder":
        callbacks.append(ImageListFile(folder.folder, [str(f) for f in loader.dataset.files]))
    if ev.enabled:
        from ddpmkit.training.eval_callback import FIDCallback

        callbacks.append(FIDCallback(ev, ds, diffusion, shape, device,
                                     inception_weights=options.get("inception_weights"),
                                     precomputed_dir=options.get("precomputed_dir"),
                                     eval_device=options.get("eval_device")))
    return callbacks, grid


def _build_trainer(config: ImageRunConfig, info, device, loader, micro, diffusion, net,
                   folder: RunFolder, callbacks: List[Callback], stop: StopFlag) -> ImageTrainer:
    tr = config.train
    return ImageTrainer(
        net, diffusion, loader, **trainer_options(tr, folder, callbacks, config.to_dict(), stop),
        # Fused Adam: one kernel for all parameters on CUDA; on the CPU 1.06-1.13x faster steps
        # than the per-parameter loop (CIFAR-10 UNet, batch 8, bf16, one thread).
        fused=True, device=device, tensorboard_dir=folder.tensorboard_dir, progress=True,
        is_main=info.is_main, rank=info.rank, world_size=info.world_size,
        control_group=dist_utils.control_group(),
        amp_dtype=autocast_dtype(tr.precision or "fp32"),
        throughput_key="img_per_s", random_flip=bool(config.dataset.random_flip),
        global_batch=tr.batch_size, micro_batch=micro,
        channels_last=bool(tr.channels_last))


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
    callbacks, grid = _callbacks(config, options, diffusion, device, folder, loader)
    trainer = _build_trainer(config, info, device, loader, micro, diffusion, net, folder,
                             callbacks, stop)
    resume_from(trainer, folder, _main_only(info, logger.info))
    max_steps = 1 if options.get("dry_run") else tr.max_steps
    result = trainer.fit(max_steps=max_steps)
    return _finish(trainer, grid, result, options, max_steps, info)


def _finish(trainer: ImageTrainer, grid: SampleGrid, result, options, max_steps, info) -> int:
    code = stop_exit_code(result, trainer, _main_only(info, logger.warning))
    if code is not None:
        return code
    if options.get("dry_run") or (max_steps is not None and trainer.step >= max_steps):
        grid.save(trainer, f"step{trainer.step}")  # the final checkpoint is saved by fit()
    if info.is_main:
        logger.info("done: %d steps, %d epochs, last loss %s, checkpoint %s", result["step"],
                    result["epoch"], result["loss"], trainer.last_checkpoint)
    return 0


def _main_only(info, log):
    """`log` on the main process; nothing on the others."""
    return log if info.is_main else (lambda message: None)


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
