"""The tiles stage of the pipeline (histod.daemon.pipeline): an image larger than the model's tiles (a field, its
bytes read by intake) or a whole-slide image (read from its path through OpenSlide) is classified tile by tile
in a thread of its own, one image at a time, while tile-sized files keep flowing through the batches beside it
(histod.slides.classify: tissue mask, tiles in batches of 64 through the same classifier, aggregation rule).

Nothing of an image is written until its result is recorded: a stop (SIGTERM) between two batches of tiles
returns None, the file stays in the watch folder, and the next start classifies it again from the start. A
slide whose file changed while it was classified (another entry, size or mtime) is not recorded under what was
read: its next event takes it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from histod import heatmap, slides
from histod.daemon.infer import Predictor
from histod.daemon.intake import Item
from histod.daemon.mover import identity
from histod.db.models import utcnow
from histod.db.paths import display
from histod.errors import ImageError
from histod.logs import get_logger
from histod.readers import ImageReader, Reader, open_reader
from histod.tiling import Scale

log = get_logger("histod.service")


def classify_tiled(
    item: Item,
    predictor: Predictor,
    scale: Scale,
    *,
    max_pixels: int,
    max_bytes: int,
    stop: Callable[[], bool],
    progress: Callable[[int, int], None] | None = None,
    heatmap_min_tiles: int | None = 0,
) -> Item | None:
    """Classify ``item`` (``tiling`` is ``field`` or ``slide``) at the model's scale: its p (the rule's score for
    a tiled image), warnings, tiled result and heat-map (with at least ``heatmap_min_tiles`` tissue tiles; None:
    no heat-map), or ``error`` when it cannot be read or holds no tissue. None when ``stop()`` turned true before
    its last tile, or when a slide's file changed meanwhile."""
    start = time.perf_counter()
    name = display(item.path)
    data, item.data = item.data, None
    try:
        reader: Reader
        if item.tiling == "slide":
            reader = open_reader(item.path, max_pixels=max_pixels, max_bytes=max_bytes, follow_symlinks=False)
        else:
            if data is None:
                raise ImageError("unreadable", f"{item.path} could not be read")
            reader = ImageReader(data, name, max_pixels=max_pixels)
        with reader:
            outcome = slides.classify(reader, predictor.predict, scale, progress=progress, stop=stop)
    except slides.StoppedError:
        log.info("tiles.stopped", path=name, note="not recorded: classified again at the next start")
        return None
    except ImageError as exc:
        item.error = ImageError(exc.reason, str(exc.args[0]))
        item.classified_at = utcnow()
        return item
    if item.tiling == "slide" and identity(item.path) != item.identity:
        log.info("tiles.changed", path=name, note="the file changed while it was classified: taken again")
        return None
    if isinstance(outcome, slides.Whole):  # a slide about one tile's size: as a tile file
        item.p = float(predictor.predict(outcome.image[None])[0])
        item.warnings = outcome.warnings
    else:
        item.tiled = outcome
        item.p = outcome.aggregate.score
        item.warnings = outcome.warnings
        if heatmap_min_tiles is not None and outcome.aggregate.n_tissue >= heatmap_min_tiles:
            item.heatmap = heatmap.render(outcome, predictor.threshold, title=None)
    item.classified_at = utcnow()
    item.decode_s = time.perf_counter() - start
    return item
