"""Training speed and memory: runs the real ``histod train`` as a subprocess and times it from its own log.

    .venv/bin/python bench/train.py [--data DIR] [--head-epochs 1 --epochs 1] [--out RUN_DIR]

Defaults: ``../shared/data/idc-dev`` at 96 px, alpha 0.35 with the ImageNet base weights from ``../shared``
(generated tiles and random weights when those are absent), 1 head-only epoch + 1 fine-tuning epoch, batch 8.

Every event of ``histod train`` is a JSON line with a timestamp; the benchmark reads them as they come:
decoding (``dataset`` -> ``split``), each phase's start (``phase``) and each epoch's end (``epoch``), the
validation scoring, the export and the end. An epoch's seconds include its validation pass (Keras runs it
inside ``fit``); the first epoch of a phase also includes compiling and tracing, and is shown separately.
Peak RSS is the child's VmHWM polled from /proc/PID/status every 0.5 s, cross-checked by ``wait4``'s
``ru_maxrss`` (which can carry the parent's peak across fork+exec; this parent is small).
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    histod_command,
    load_average,
    machine,
    proc_status_mb,
    say,
    shared_data,
    shared_weights,
    synthetic_dataset,
    table,
    write_result,
)


def _when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


class Child:
    """A subprocess whose stderr JSON events are collected, and whose peak RSS is polled."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self.peak_polled_mb = 0.0
        self.started = time.time()
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir()
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True),
        ]
        for r in self._readers:
            r.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._log.write(line)
            text = line.strip()
            if text.startswith("{"):
                try:
                    event = json.loads(text)
                except ValueError:
                    continue
                if isinstance(event, dict) and "event" in event:
                    self.events.append(event)
                    if event["event"] in (
                        "train.phase",
                        "train.epoch",
                        "validation.scored",
                        "export.parity",
                        "run.written",
                    ):
                        brief = {k: v for k, v in event.items() if k not in ("level", "timestamp")}
                        say(f"histod train: {brief}")

    def wait(self, timeout_s: float) -> tuple[int, float]:
        """(exit code, peak RSS in MiB from wait4)."""
        deadline = time.monotonic() + timeout_s
        while True:
            hwm = proc_status_mb(self.proc.pid)
            if hwm is not None:
                self.peak_polled_mb = max(self.peak_polled_mb, hwm)
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid == self.proc.pid:
                break
            if time.monotonic() > deadline:
                self.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 30
            time.sleep(0.5)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        for r in self._readers:
            r.join(timeout=5)
        self._log.close()
        return self.proc.returncode, usage.ru_maxrss / 1024


def analyse(events: list[dict[str, Any]], n_train: int, n_val: int) -> dict[str, Any]:
    """Per-phase epoch times and images/s from the event timestamps."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_name.setdefault(str(e["event"]), []).append(e)
    phases: dict[str, dict[str, Any]] = {}
    current: str | None = None
    last = 0.0
    for e in events:
        if e["event"] == "train.phase":
            current = str(e["phase"])
            last = _when(e)
            phases[current] = {
                "epochs": [],
                "trainable_params": e.get("trainable_params"),
                "learning_rate": e.get("learning_rate"),
            }
        elif e["event"] == "train.epoch" and current is not None:
            t = _when(e)
            phases[current]["epochs"].append(round(t - last, 2))
            last = t
    for p in phases.values():
        epochs = p["epochs"]
        steady = epochs[1:] or epochs
        p["first_epoch_s"] = epochs[0] if epochs else None
        p["steady_epoch_s"] = round(sum(steady) / len(steady), 2) if steady else None
        p["train_images_per_s"] = round(n_train / p["steady_epoch_s"], 1) if p["steady_epoch_s"] else None
        p["images_per_s_incl_val"] = round((n_train + n_val) / p["steady_epoch_s"], 1) if p["steady_epoch_s"] else None
    stages: dict[str, float] = {}

    def gap(name: str, a: str, b: str) -> None:
        if by_name.get(a) and by_name.get(b):
            stages[name] = round(_when(by_name[b][0]) - _when(by_name[a][0]), 2)

    gap("decode + split", "dataset.found", "split.made")
    gap("split to the first epoch's start", "split.made", "train.phase")
    for e in events:  # the final stretch: each step logs its own seconds
        if "seconds" in e and str(e["event"]).split(".")[0] in ("score", "export", "artefacts"):
            stages[str(e["event"])] = float(e["seconds"])
    gap("total (first to last event)", "dataset.found", "run.written")
    return {"phases": phases, "stages_s": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default ../shared idc-dev)")
    parser.add_argument("--out", type=Path, default=None, help="RUN_DIR to write (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary RUN_DIR")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--weights", default=None, help="default: the ../shared alpha 0.35 file, else none")
    parser.add_argument("--head-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the child is stopped")
    parser.add_argument("--name", default="train", help="results file name (default train)")
    args = parser.parse_args(argv)

    conditions = machine()
    data_dir: Path = (
        args.data or shared_data() or synthetic_dataset(Path(tempfile.gettempdir()) / "histod-bench-synthetic")
    )
    weights = args.weights or (str(shared_weights() or "none"))
    if weights == "none" and args.alpha != 0.35:
        say("NOTE: random initial weights")
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="histod-bench-train-")) / "run"
    command = [
        *histod_command(),
        "--log-format",
        "json",
        "train",
        str(data_dir),
        "--out",
        str(out),
        "--image-size",
        str(args.image_size),
        "--alpha",
        str(args.alpha),
        "--weights",
        weights,
        "--head-epochs",
        str(args.head_epochs),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOD_")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    say("running: " + " ".join(command))
    log_path = out.parent / f"{out.name}-train.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    child = Child(command, env, log_path)
    code, peak_mb = child.wait(args.timeout)
    wall = time.monotonic() - started
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"histod train failed with exit code {code}; log {log_path}:\n{tail}")
    metrics = json.loads((out / "metrics.json").read_text())
    counts = metrics["counts"]
    n_train = sum(counts["train"].values())
    n_val = sum(counts["val"].values())
    result = analyse(child.events, n_train, n_val)

    print(
        f"\ntrain: {data_dir} ({n_train} train / {n_val} val images), {args.image_size} px, alpha {args.alpha}, "
        f"weights {Path(weights).name}, batch {args.batch_size}, {conditions['nproc']} cores "
        f"({conditions['cpu_model']}), load avg {conditions['load_average_at_start']}"
    )
    rows = []
    for name, p in result["phases"].items():
        rows.append(
            [
                name,
                len(p["epochs"]),
                p["trainable_params"],
                p["first_epoch_s"],
                p["steady_epoch_s"],
                p["train_images_per_s"],
                p["images_per_s_incl_val"],
            ]
        )
    print(
        table(
            ["phase", "epochs", "trainable", "1st epoch s", "s/epoch", "train img/s", "img/s incl. val"],
            rows,
        )
    )
    print(table(["stage", "seconds"], [[k, v] for k, v in result["stages_s"].items()]))
    print(
        table(
            ["process", "peak RSS MiB (polled VmHWM)", "ru_maxrss MiB (wait4)", "wall s"],
            [["histod train", child.peak_polled_mb, peak_mb, wall]],
        )
    )
    print(
        f"validation: balanced accuracy {metrics['balanced_accuracy']:.4f}, ROC AUC {metrics['roc_auc']:.4f} "
        f"(after {args.head_epochs}+{args.epochs} epochs)"
    )
    write_result(
        args.name,
        {
            "benchmark": "train",
            "conditions": {**conditions, "load_average_at_end": load_average()},
            "command": command,
            "data_dir": str(data_dir),
            "counts": counts,
            "note": "epoch seconds include the validation pass; the first epoch of a phase includes tracing",
            **result,
            "peak_rss_mb": round(child.peak_polled_mb, 1),
            "ru_maxrss_wait4_mb": round(peak_mb, 1),
            "wall_s": round(wall, 1),
            "validation": {k: metrics[k] for k in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")},
            "run_dir": str(out),
            "log": str(log_path),
        },
    )
    if args.out is None and not args.keep:
        shutil.rmtree(out, ignore_errors=True)  # the log beside it stays
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
