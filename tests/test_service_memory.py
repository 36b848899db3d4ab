"""What one batch holds in memory: the file bytes read for a batch are bounded by max_batch_bytes (a batch
stops taking files before it would pass the bound; a single larger file goes alone). Real folder, real SQLite,
the real tiny model; the predictor is the real classifier, with each call's batch size written down."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from histod.daemon.app import _register
from histod.daemon.classifier import load_classifier
from histod.daemon.pipeline import Pipeline
from histod.db.models import utcnow
from tests.faults_support import account, tiny_png
from tests.test_service_support import factory_for, service_settings

LIMIT = 2_500_000


class Recording:
    """The real classifier; remembers how many images each predict call got."""

    def __init__(self, classifier: object) -> None:
        self.classifier = classifier
        self.image_size = int(classifier.image_size)  # type: ignore[attr-defined]
        self.threshold = float(classifier.threshold)  # type: ignore[attr-defined]
        self.calls: list[int] = []

    def predict(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.calls.append(len(batch))
        return self.classifier.predict(batch)  # type: ignore[attr-defined,no-any-return]


def test_a_batch_holds_at_most_max_batch_bytes_of_files(tiny_run_dir: Path, tmp_path: Path) -> None:
    settings = service_settings(tmp_path, tiny_run_dir, batch_size=8, max_batch_bytes=LIMIT)
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    names = [f"a{i}.png" for i in range(4)] + ["b big.png"] + [f"c{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        (watch / name).write_bytes(tiny_png(i, size=1100 if "big" in name else 600))
    sizes = {n: (watch / n).stat().st_size for n in names}
    assert all(1_000_000 < s <= LIMIT // 2 for n, s in sizes.items() if "big" not in n)  # two fit, three do not
    assert sizes["b big.png"] > LIMIT
    factory = factory_for(settings)
    classifier = load_classifier(tiny_run_dir, threads=1)
    predictor = Recording(classifier)
    served = _register(factory, classifier, tiny_run_dir, "litert")
    with Pipeline(settings, factory, predictor, served) as pipeline:
        now = utcnow()
        assert pipeline.process([(watch / n, now) for n in names]) == len(names)  # 8 arrivals at once
    assert predictor.calls == [2, 2, 1, 2, 1]
    account(settings, names).check()
