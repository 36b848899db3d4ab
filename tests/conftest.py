"""Shared fixtures: a small synthetic labelled data set and one tiny trained run directory for the whole session.

``tiny_run_dir`` trains once (a few tens of seconds on 2 CPU cores) with random weights, alpha 0.35, 48x48 input,
one head epoch and one fine-tuning epoch, no moving average of the weights (over a dozen steps it would still be
the random start); everything else is the default recipe. Its model is NOT expected to be accurate; it is a
valid RUN_DIR (model.keras, model.tflite, model.json, metrics.json, config.json, reports) for tests of
everything that reads one. Tests must not modify it: copy it first (shutil.copytree) when a test needs to change files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from histod.synthetic import make_dataset
from histod.trainer.config import TrainConfig


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """A test that runs the CLI in-process configures structlog (level filter, renderer) for the whole
    process; put the defaults back so later tests that capture debug events see them."""
    yield
    structlog.reset_defaults()


TINY_IMAGE_SIZE = 48


def tiny_config(data_dir: Path, out: Path, **overrides: object) -> TrainConfig:
    """The TrainConfig of the tiny test runs (weights none, alpha 0.35, 48 px, 1 + 1 epochs, no EMA)."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "out": out,
        "weights": "none",
        "alpha": 0.35,
        "image_size": TINY_IMAGE_SIZE,
        "head_epochs": 1,
        "epochs": 1,
        "batch_size": 16,
        "ema": 0.0,
        "seed": 7,
    }
    values.update(overrides)
    return TrainConfig.model_validate(values)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled folder: benign/ and malignant/ PNG tiles from 12 IDC-named patients (120 files). Read-only."""
    return make_dataset(tmp_path_factory.mktemp("synthetic") / "data")


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: Path) -> Path:
    """A complete RUN_DIR trained on ``synthetic_dataset``. Read-only: copy it before changing anything."""
    from histod.trainer.api import train

    return train(tiny_config(synthetic_dataset, tmp_path_factory.mktemp("runs") / "tiny"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A PostgreSQL server for the session (tests/postgres_support.py); skips the test when none can be started."""
    from tests import postgres_support

    try:
        server = postgres_support.start()
    except postgres_support.UnavailableError as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: object) -> Iterator[str]:
    """The URL (postgresql+psycopg://...) of a new, empty database for this test, dropped after it."""
    from tests import postgres_support

    assert isinstance(postgres_server, postgres_support.Server)
    with postgres_support.database(postgres_server) as url:
        yield url
