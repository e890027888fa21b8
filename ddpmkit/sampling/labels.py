"""Class labels per sample and classifier-free guidance for class-conditional models.

Sample i asks for class `classes[i mod n]` (`ClassLabels`: all K classes in order by default,
or the ones requested), a function of i alone like its noise, and is sampled with
classifier-free guidance (`Guidance`; Ho & Salimans 2022).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ddpmkit.diffusion.gaussian import DenoiseFn
from ddpmkit.diffusion.guidance import ConditionalNet, classifier_free_guidance
from ddpmkit.errors import UserError

# Guidance scale w when none is asked for (eq. 6 of Ho & Salimans 2022; 0: the plain
# conditional model). See the README's class-conditioning section for what w does.
DEFAULT_GUIDANCE_SCALE = 1.0


@dataclass(frozen=True)
class ClassLabels:
    """Which class each sample asks for: sample i gets `classes[i mod len(classes)]`, a
    function of its index alone (so of no batch size or process count), and spread evenly."""
    classes: tuple[int, ...]
    num_classes: int

    @property
    def rule(self) -> str:
        """The rule in words, for the manifest."""
        return f"label of sample i = {list(self.classes)}[i mod {len(self.classes)}]"

    def of(self, indices: Sequence[int]) -> list[int]:
        n = len(self.classes)
        return [self.classes[int(i) % n] for i in indices]


def class_labels(num_classes: int, requested: Sequence[int | str] | None = None,
                 names: Sequence[str] | None = None) -> ClassLabels:
    """The labels plan: every class 0..K-1 in turn, or the `requested` ones (ints, or class
    names from `names`). Out-of-range or unknown labels are a UserError."""
    if not requested:
        return ClassLabels(tuple(range(num_classes)), num_classes)
    classes = []
    for value in requested:
        text = str(value).strip()
        if names and text in names and not text.lstrip("-").isdigit():
            classes.append(list(names).index(text))
            continue
        try:
            label = int(text)
        except ValueError:
            known = f" or one of {', '.join(names)}" if names else ""
            raise UserError(f"class label {text!r} is not a number{known}") from None
        if not 0 <= label < num_classes:
            raise UserError(f"class label {label} is out of range: the model knows classes "
                            f"0..{num_classes - 1}")
        classes.append(label)
    return ClassLabels(tuple(classes), num_classes)


@dataclass(frozen=True)
class Guidance:
    """How a class-conditional network is sampled: `net(x_t, t, y)` (e.g. from
    `make_denoise_fn`), the labels plan, and the guidance scale w."""
    net: ConditionalNet
    labels: ClassLabels
    scale: float
    learned_variance: bool = False

    def bind(self, indices: Sequence[int], device) -> DenoiseFn:
        """`denoise_fn(x_t, t)` for these samples: guided towards their labels."""
        y = torch.as_tensor(self.labels.of(indices), dtype=torch.long, device=device)
        return classifier_free_guidance(self.net, y, self.labels.num_classes, self.scale,
                                        self.learned_variance)


def class_grid_indices(num_rows: int, grid_size: int, total_size: int) -> tuple[list[int], int]:
    """(sample indices row by row, columns) of a grid with one row per entry of the labels plan:
    row r holds samples r, r + n, r + 2n, ... (n = num_rows), all of the same class."""
    rows = min(num_rows, total_size)
    cols = max(1, min(grid_size // max(rows, 1), total_size // max(num_rows, 1)))
    return [r + j * num_rows for r in range(rows) for j in range(cols)], cols
