"""Other projects' model formats: diffusers folders, safetensors files, Hugging Face Hub ids.

- `diffusers_format`: diffusers' `UNet2DModel` + `DDPMScheduler` configs and weights <->
  ddpmkit's UNet and diffusion config (both directions, exact).
- `safetensors_format`: bare weights with ddpmkit's config in the file's metadata.
- `hub`: Hub ids (`google/ddpm-cifar10-32`) through huggingface_hub's cache (optional package).
- `sources`: what `--chkpt-path` may name (a checkpoint file, a diffusers folder, a
  .safetensors file, a Hub id) -> one checkpoint dict the loaders understand.
- `export`: a ddpmkit checkpoint -> a diffusers pipeline folder or a .safetensors file.

diffusers itself is never imported here (it is a test-only dependency): configs are JSON and
weights are read with safetensors or `torch.load(weights_only=True)`.
"""
