"""The infer stage of the pipeline (histod.daemon.pipeline): one predict call for every model input of a batch,
then each file's p from its own inputs.

A file may bring any number of inputs (histod.daemon.intake.Item.inputs); they are stacked with the batch's
others and their p's are given back to the file and combined by :func:`combine`, the one place that says how a
file's p follows from its inputs' p's. A file marked for the tiles stage (``tiling``) is left to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from histod.daemon.intake import Item
from histod.db.models import utcnow
from histod.errors import ImageError


class Predictor(Protocol):
    """What the pipeline needs of a model (histod.daemon.classifier.Classifier)."""

    image_size: int
    threshold: float

    def predict(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]: ...


def combine(p: NDArray[np.float32]) -> float:
    """A file's p from the p's of its inputs (the mean; a single input's p as it is)."""
    return float(p[0]) if len(p) == 1 else float(np.mean(p))


def infer(items: Sequence[Item], predictor: Predictor) -> int:
    """Set ``p`` and ``classified_at`` of every item (p stays None for a file that failed to decode) and let the
    inputs go. Returns the number of model inputs predicted."""
    inputs = [x for item in items if item.error is None and not item.for_tiles for x in item.inputs]
    p = np.asarray(predictor.predict(np.stack(inputs)), dtype=np.float32).reshape(-1) if inputs else None
    done = utcnow()
    at = 0
    for item in items:
        if item.for_tiles:
            continue  # classified tile by tile (histod.daemon.tiled)
        if item.error is None:
            n = len(item.inputs)
            if n == 0 or p is None:
                item.error = ImageError("corrupt", f"{item.path}: nothing to classify in it")
            else:
                item.p = combine(p[at : at + n])
                at += n
        item.inputs = []
        item.classified_at = done
    return len(inputs)
