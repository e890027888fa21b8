"""Sampling from a trained model: seeded, sharded, resumable sample folders.

Every sample is a pure function of (checkpoint, sampler settings, seed, sample index), so any
batch size and any number of processes give the same images, and a rerun only makes the
missing files. What a run is asked to do is `ddpmkit.config.sample.SampleConfig` (plain
values, no torch; also importable from here). The modules, from the bottom up:
  labels     class labels per sample and classifier-free guidance
  noise      per-sample noise (Philox4x32-10), `sample_indexed`, `shard`
  denoiser   the network as the sampler calls it, with its fast paths
  folder     the sample folder: PNG writer, manifest, labels.csv
  source     the checkpoint, its weights and guidance for a run
  share      one process's share of a run
  launch     `run(SampleConfig)`: one process, torchrun or spawned; the grid and the summary

Every public name loads on first use (PEP 562), so importing this package (as the command line
does before it parses) loads no torch.
"""

import importlib

# public name -> the module that defines it (under ddpmkit.sampling unless spelled out)
_LAZY = {
    **dict.fromkeys(("SampleConfig", "DEFAULT_DATASET", "DEFAULT_STEPS"), "ddpmkit.config.sample"),
    **dict.fromkeys(("ClassLabels", "class_labels", "Guidance", "DEFAULT_GUIDANCE_SCALE",
                     "class_grid_indices"), "labels"),
    **dict.fromkeys(("IndexedNoise", "philox4x32", "sample_indexed", "shard", "DistEnv",
                     "dist_env_from_environ", "NOISE_VERSION", "X_T_STREAM"), "noise"),
    "make_denoise_fn": "denoiser",
    **dict.fromkeys(("SAMPLE_NAME", "MANIFEST_NAME", "LABELS_NAME", "sample_path",
                     "existing_samples", "remove_stale_temp_files", "check_manifest",
                     "write_labels_file", "read_labels_file", "GenerateResult",
                     "generate_to_folder", "count_samples", "first_samples"), "folder"),
    **dict.fromkeys(("checkpoint_path", "load_sample_model", "SampleModel"), "source"),
    **dict.fromkeys(("run", "SampleSummary", "write_grid"), "launch"),
}


def __getattr__(name):
    if name in _LAZY:
        module = _LAZY[name]
        module = module if module.startswith("ddpmkit.") else f"{__name__}.{module}"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = list(_LAZY)
