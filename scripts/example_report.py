"""Write docs/example-report.html: the HTML report of a 500-file `histod serve --once` run with a few reviews.

Everything through the real CLI in a temporary folder: synthetic tiles, a small model trained from a random
start (weights none, alpha 0.35), 490 tiles and 10 files that cannot be classified dropped into the watch
folder, one `serve --once`, a few `histod audit review` calls (some disagreeing with the model), then
`histod report --html`. A few minutes on 2 CPU cores.

    .venv/bin/python scripts/example_report.py [OUT.html [WORK_DIR]]

WORK_DIR (kept; default a temporary folder, removed) holds the dataset, the run and the data folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from histod.synthetic import SyntheticSpec, make_dataset, write_images

ROOT = Path(__file__).resolve().parents[1]
IMAGES, BROKEN = 490, 10
REVIEWS = 24  # every 19th classification; the reviewer disagrees on a few
NOTES = ("stroma, no atypia", "crush artefact", "tangentially cut duct", "DCIS focus at the edge")


def histod(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "histod", "--log-format", "json", *args], capture_output=True, text=True, check=False
    )
    if done.returncode not in (0, 7):
        sys.exit(f"histod {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "example-report.html"
    with tempfile.TemporaryDirectory(prefix="histod-example-") as tmp:
        root = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tmp)
        dataset = make_dataset(root / "dataset", SyntheticSpec(patients=24, tiles_per_patient=10, size=64))
        run = root / "run"
        histod(
            "train", str(dataset), "--out", str(run), "--weights", "none", "--alpha", "0.35", "--image-size", "64",
            "--head-epochs", "0", "--epochs", "4", "--fine-tune-layers", "1000", "--learning-rate", "1e-3",
            "--batch-size", "8", "--no-augment", "--ema", "0", "--seed", "1",
        )  # fmt: skip
        data = root / "data"
        watch = data / "prediction"
        for i, path in enumerate(write_images(watch, IMAGES, size=64, seed=7)):
            path.rename(watch / f"case-{1000 + i // 10}_slide{i % 10:02d}.png")
        for i in range(BROKEN):
            broken = watch / f"scan-{i:02d}.png"
            if i % 3 == 0:
                broken.write_bytes(b"")
            elif i % 3 == 1:
                broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
            else:
                broken.write_text("not an image: a note saved with the wrong extension\n")
        where = ["--data-dir", str(data)]
        histod("serve", "--once", "--model", str(run), *where)
        rows = json.loads(histod("results", "--all", "--status", "classified", "--format", "json", *where))
        for k, row in enumerate(rows[3::19][:REVIEWS]):
            disagree = k % 5 == 2
            label = row["label"] if not disagree else ("Benign" if row["label"] == "Malignant" else "Malignant")
            note = ["--note", NOTES[k % len(NOTES)]] if disagree or k % 4 == 0 else []
            reviewer = "Dr. A. Moreau" if k % 2 else "Dr. K. Osei"
            histod("audit", "review", str(row["id"]), "--label", label, "--reviewer", reviewer, *note, *where)
        print(histod("report", "--since", "1h", "--html", str(out), *where))


if __name__ == "__main__":
    main()
