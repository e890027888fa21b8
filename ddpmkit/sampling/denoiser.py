"""The denoiser wrapper: a network as the sampler calls it, with the requested fast paths."""
from __future__ import annotations

import torch

from ddpmkit.runtime.devices import autocast_dtype, compile_mode, compile_module, inductor_freezing


def make_denoise_fn(model: torch.nn.Module, precision: str, device, channels_last: bool = False,
                    compile_model: bool | str | None = False, cuda_graph: bool = False,
                    freeze: bool | None = None):
    """The network as the sampler calls it, `fn(x_t, t) -> float32 output` (or `fn(x_t, t, y)`
    for a class-conditional network: the labels are an input of every fast path, a CUDA graph
    included), with the requested fast paths: bf16 or fp16 autocast (`precision="bf16"` /
    `"fp16"`; the sampler's arithmetic stays float32), channels_last weights and inputs, torch.compile
    (`compile_model`: True or a mode name), and CUDA-graph replay.

    `freeze` (default: on CPUs) freezes a compiled network's weights in: inductor treats them
    as constants, folds autocast's per-call weight casts away and, on CPUs, prepacks
    convolution weights for oneDNN (1.3x on the CIFAR-10 UNet's bf16 forward at batch 4 on a
    2-core CPU, where compile without freezing gains nothing). It is not yet the default on
    GPUs, where it is unmeasured. Do not change the weights after the first call: a frozen
    function may go on using the ones it was compiled with (make a new one instead).
    """
    device = torch.device(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    mode = compile_mode(compile_model)
    net = compile_module(model, mode)
    amp_dtype = autocast_dtype(precision)
    if freeze is None:
        freeze = device.type == "cpu"
    freezing = mode is not None and freeze
    if precision == "fp32" and not channels_last and not cuda_graph and not freezing:
        return net

    def denoise(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        # No weight-cast cache: each weight is used once per call, and a cache would hold
        # tensors across CUDA-graph captures.
        with inductor_freezing(freezing), torch.autocast(
                device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None,
                cache_enabled=False):
            return (net(x_t, t) if y is None else net(x_t, t, y)).float()

    if cuda_graph:
        from ddpmkit.utils.cuda_graphs import CUDAGraphDenoiser

        return CUDAGraphDenoiser(denoise)
    return denoise
