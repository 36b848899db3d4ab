"""A serving install has no TensorFlow: `pip install histod` serves, reports, lists, audits, predicts and
evaluates on LiteRT; `pip install 'histod[train]'` adds TensorFlow, Keras, scikit-learn and SciPy for train,
explain, demo and the keras engine.

The installed metadata says so, and each command runs in a Python where importing any of them fails as it does
where they are not installed (``sys.modules[name] = None``: the import raises ModuleNotFoundError
and ``importlib.util.find_spec`` answers None). Any import of one of them on those paths fails the command.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.faults_support import serve_env, tiny_png

TRAINING = ("tensorflow", "keras", "sklearn", "scipy")
"""import names; as distributions:"""
TRAINING_DISTRIBUTIONS = ("tensorflow", "keras", "scikit-learn", "scipy")

WITHOUT_TRAINING = f"""
import sys
for name in {TRAINING!r}:
    sys.modules[name] = None  # what a Python without the package answers: ModuleNotFoundError, find_spec None
sys.argv = ["histod", *sys.argv[1:]]
from histod.__main__ import main

try:
    main()
finally:
    loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in {TRAINING!r})
    with open("loaded.txt", "w") as out:  # not stderr: in JSON mode every line there becomes a log event
        out.write(",".join(loaded))
"""


def test_the_training_packages_are_only_in_the_train_extra() -> None:
    # the installed distribution's own metadata (not a build's histod.egg-info that may lie in the checkout)
    (dist,) = distributions(name="histod", path=[sysconfig.get_paths()["purelib"]])
    found = [Requirement(r) for r in dist.requires or []]
    training = [r for r in found if r.name.lower() in TRAINING_DISTRIBUTIONS]
    assert {r.name.lower() for r in training} == set(TRAINING_DISTRIBUTIONS)
    for r in training:  # never in the base install
        assert r.marker is not None and r.marker.evaluate({"extra": "train"}), r
        assert not r.marker.evaluate({"extra": ""}), r
    base = {r.name.lower() for r in found if r.marker is None}
    assert "ai-edge-litert" in base and not base & set(TRAINING_DISTRIBUTIONS)


def _histod(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAINING, *args],
        cwd=tmp_path,
        env=serve_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _loaded(tmp_path: Path) -> str:
    """The training packages the last command run by :func:`_histod` had imported when it ended."""
    return (tmp_path / "loaded.txt").read_text()


@pytest.mark.slow
def test_serve_report_results_audit_predict_and_evaluate_run_without_tensorflow(
    tiny_run_dir: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    watch = data / "prediction"
    watch.mkdir(parents=True)
    for i in range(6):
        (watch / f"w{i}.png").write_bytes(tiny_png(i))
    common = ["--data-dir", str(data), "--model", str(tiny_run_dir)]
    commands = {
        "serve": ["serve", *common, "--once"],
        "review": ["audit", "review", "1", "--label", "Benign", "--reviewer", "Dr A", "--data-dir", str(data)],
        "report": ["report", "--data-dir", str(data), "--json"],  # with a review: model and reviewer agreement
        "results": ["results", "--data-dir", str(data), "--format", "json"],
        "audit": ["audit", "verify", "--data-dir", str(data)],
        "predict": ["predict", "--model", str(tiny_run_dir), "--json", str(data / "processed")],
        "evaluate": [
            "evaluate",
            "--model",
            str(tiny_run_dir),
            "--json",
            "--out",
            str(tmp_path / "ev"),
            str(synthetic_dataset),
        ],
    }
    for what, args in commands.items():
        done = _histod(tmp_path, *args)
        assert done.returncode == 0, f"{what}: {done.stderr[-3000:]}"
        assert _loaded(tmp_path) == "", what
        if what == "serve":
            assert not any(watch.iterdir())
        if what == "evaluate":  # its plots too
            assert {"roc_curve.png", "pr_curve.png", "reliability.png"} <= {f.name for f in (tmp_path / "ev").iterdir()}
        if what == "report":
            assert json.loads(done.stdout)["reviews"]["reviewed"] == 1
        if what == "predict":
            lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            assert len(lines) == 6 and all(line["label"] in ("Benign", "Malignant") for line in lines)


def test_train_says_which_extra_it_needs_where_tensorflow_is_missing(synthetic_dataset: Path, tmp_path: Path) -> None:
    done = _histod(tmp_path, "train", str(synthetic_dataset), "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "pip install 'histod[train]'" in done.stderr
