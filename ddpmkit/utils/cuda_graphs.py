"""Replay a network call as a CUDA graph: one launch per call instead of one per kernel.

Small-batch sampling on a fast GPU is bound by the CPU launching the UNet's few hundred
kernels, not by the GPU running them. Capturing the call once per input shape and replaying it
removes that cost. Written here rather than using torch.compile(mode="reduce-overhead"),
which does the same but needs a compile (a minute or more for the UNet) and recompiles or
falls back on every new shape; a captured eager graph costs two warm-up calls.

Only for inference with fixed weights: the graph reads the parameters in place, so it sees
weight updates, but it replays the exact kernels it captured (same shapes, dtypes, devices).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ddpmkit.diffusion.gaussian import DenoiseFn


class CUDAGraphDenoiser:
    """`fn(x_t, t)` replayed from a CUDA graph captured per (shape, dtype, device) of x_t and t.

    The output is copied out of the graph's static buffer, so it stays valid after the next
    call. `fn` must be capturable: no host synchronisation, no data-dependent control flow, no
    CPU tensors (cuDNN autotuning and lazy initialisation happen in the warm-up calls).
    """

    def __init__(self, fn: DenoiseFn, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.fn = fn
        self.warmup = warmup
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor,
                                        torch.Tensor]] = {}

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.device.type != "cuda" or t.device != x_t.device:
            raise ValueError("CUDAGraphDenoiser needs x_t and t on the same CUDA device")
        key = (tuple(x_t.shape), x_t.dtype, x_t.device, tuple(t.shape), t.dtype,
               x_t.is_contiguous(memory_format=torch.channels_last))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x_t, t)
        graph, static_x, static_t, static_out = entry
        static_x.copy_(x_t)
        static_t.copy_(t)
        graph.replay()
        return static_out.clone()

    def _capture(self, x_t: torch.Tensor, t: torch.Tensor):
        static_x, static_t = x_t.clone(), t.clone()
        current = torch.cuda.current_stream(x_t.device)
        # Warm up on a side stream, as capture requires (cuDNN picks its algorithms here).
        side = torch.cuda.Stream(device=x_t.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                self.fn(static_x, static_t)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = self.fn(static_x, static_t)
        return graph, static_x, static_t, static_out
