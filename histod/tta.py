"""Test-time augmentation: p(malignant) averaged over flips and 90° rotations of each image.

One definition for the trainer (evaluate, predict) and the service, so that a run's ``tta`` in model.json means
the same everywhere. Views of an NHWC batch, in order: identity, horizontal flip (2), vertical flip and both
flips = 180° rotation (4), then the transpose of each of those (8: all symmetries of the square).
``tta`` N uses the first N views.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

VIEWS = (1, 2, 4, 8)


def view(x: NDArray[Any], i: int) -> NDArray[Any]:
    """The ``i``-th view (0..7) of an NHWC batch."""
    if not 0 <= i < 8:
        raise ValueError(f"view index {i} is not in 0..7")
    v = x[:, :, ::-1, :] if i % 2 else x  # odd: horizontal flip (width is axis 2)
    v = v[:, ::-1, :, :] if (i // 2) % 2 else v  # 2, 3, 6, 7: vertical flip
    return np.swapaxes(v, 1, 2) if i >= 4 else v  # 4..7: transposed


def views(x: NDArray[Any], n: int) -> NDArray[Any]:
    """The first ``n`` views of every image, stacked view-major: shape (n * N, S, S, C)."""
    if n not in VIEWS:
        raise ValueError(f"tta must be one of {VIEWS}, not {n}")
    return x if n == 1 else np.ascontiguousarray(np.concatenate([view(x, i) for i in range(n)]))


def average(p: NDArray[np.float32], n: int) -> NDArray[np.float32]:
    """Mean p over the views of each image: (n * N,) -> (N,)."""
    if n == 1:
        return p
    return np.asarray(p.reshape(n, -1).mean(axis=0), dtype=np.float32)
