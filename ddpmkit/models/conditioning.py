"""Class conditioning shared by the UNet and the toy MLP: a learned embedding per class, plus one
"no class" entry for classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion
Guidance", section 3.2: one network learns p(x | y) and p(x), the latter from labels replaced
by a null token during training).

Symbols: `K` classes, labels y int64 (B,) in [0, K); the null label is K, so the embedding
table is (K + 1, E). The embedding is added to the timestep embedding (as in Dhariwal & Nichol
2021's class-conditional ImageNet models).

A network built without classes has no embedding at all: its state-dict keys and outputs are
exactly those of an unconditional network, so every unconditional checkpoint loads.
Label values are checked where they enter (command-line flags, datasets), not here: a check
inside `forward` would cost a device synchronisation per call and break CUDA-graph capture.
"""

from __future__ import annotations

import torch
from torch import nn

# The module name of the embedding, so its state-dict key is `class_embed.weight`.
EMBED_NAME = "class_embed"


def check_num_classes(num_classes: int | None) -> int | None:
    """None or 0: unconditional (None); else a positive int K. ValueError otherwise."""
    if num_classes is None or (isinstance(num_classes, int) and not isinstance(num_classes, bool)
                               and num_classes == 0):
        return None
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer or null, got {num_classes!r}")
    return num_classes


def class_embedding(num_classes: int, dim: int) -> nn.Embedding:
    """(K + 1, dim) table: rows 0..K-1 the classes, row K "no class". N(0, 1) init (torch's)."""
    return nn.Embedding(num_classes + 1, dim)


def null_labels(batch: int, num_classes: int, device) -> torch.Tensor:
    """The "no class" label K for a whole batch: int64 (B,)."""
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def class_ids(y: torch.Tensor | None, batch: int, num_classes: int | None, device
              ) -> torch.Tensor | None:
    """Labels the embedding looks up: y itself, or "no class" for y None (a conditional network
    called without labels predicts unconditionally). None for an unconditional network, which
    refuses labels: they would be silently ignored."""
    if num_classes is None:
        if y is not None:
            raise ValueError("this network is unconditional (num_classes is null): it takes no "
                             "class labels")
        return None
    if y is None:
        return null_labels(batch, num_classes, device)
    if y.shape != (batch,):
        raise ValueError(f"class labels must have shape ({batch},), got {tuple(y.shape)}")
    return y.to(device=device, dtype=torch.long)
