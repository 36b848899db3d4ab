"""Counters per pipeline stage (histod.daemon.pipeline): how many files and batches went through each stage and
how many seconds the stage spent on them. The pipeline calls :meth:`Stats.add` in one place per stage, once per
batch; an observer (metrics, health) reads :meth:`Stats.snapshot` or registers a listener, which is called with
the same arguments in the thread of that stage (keep it quick: a counter, not a network call)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

STAGES = ("intake", "decode", "infer", "record", "move", "tiles")
"""the stages in their order (intake and decode run in the decode pool, infer in its thread, record and move in
the service's main thread; tiles, for images larger than the model's tiles, in its own thread)"""

Listener = Callable[[str, int, float], None]


@dataclass
class StageCount:
    batches: int = 0
    files: int = 0
    seconds: float = 0.0


class Stats:
    """Per-stage totals since the service started; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {stage: StageCount() for stage in STAGES}
        self.listeners: list[Listener] = []

    def add(self, stage: str, files: int, seconds: float) -> None:
        """One batch through ``stage``: ``files`` files in ``seconds`` seconds (summed over the files' threads
        for intake and decode)."""
        with self._lock:
            count = self._counts[stage]
            count.batches += 1
            count.files += files
            count.seconds += seconds
        for listener in self.listeners:
            listener(stage, files, seconds)

    def snapshot(self) -> dict[str, StageCount]:
        with self._lock:
            return {stage: StageCount(c.batches, c.files, c.seconds) for stage, c in self._counts.items()}
