"""Tiling validated on real tissue: IDC patches laid back at their slide positions, tiled, classified, aggregated.

    .venv/bin/python bench/mosaic.py table --run RUN_DIR            # the mosaic table (~10 min on 2 busy cores)
    .venv/bin/python bench/mosaic.py show --run RUN_DIR --patient P # mosaic PNG, heat-map, `histod predict` on it
    (tiles/s and memory: bench/tiles_speed.py)

IDC file names give each 50x50 patch's top-left corner in its slide (``<patient>_idx5_x<X>_y<Y>_class<C>``), on
a 50 px grid. A patient's mosaic puts every patch of idc-dev and idc-extra back at its place, on glass (a
near-white (238, 236, 240) with sensor noise, sd 3) where the public set kept no patch. Eight patients have every
patch (idc-extra/SOURCE.txt); the others are sparse samples of their slides, so their mosaics are mostly glass.

``table`` reports, for the run's validation patients (split.csv; never seen in training):

* patch level: the served model (LiteRT) on each patch file, as `histod predict` classifies a tile;
* tile level: each patient's mosaic through histod.slides (read, tissue mask, grid, batches, the same model),
  each tissue tile matched to the patch at its place: the grid is aligned with the patches (offset 0) and then
  shifted by half a tile (offset 25 px: each tile straddles four patches; its truth is the class of most of its
  patch area); the glass tiles taken as tissue and the patches lost as background;
* image level: fields of 10 x 10 patches (500 px) cut from the mosaics, "malignant" when they hold an IDC patch;
  every candidate aggregation rule is scored on fields of the TRAINING patients' mosaics built from their
  idc-extra patches (images the model never saw), its cut and the chosen rule are fixed there, then reported on
  the validation patients' fields; and per validation patient, the whole mosaic's malignant share against the
  true IDC share.

95 % intervals resample patients. Results: bench/results/tiles/*.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):  # run as a file: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import IDC_DEV, RESULTS, SHARED, load_average, machine, say, table, write_result

IDC_EXTRA = SHARED / "data" / "idc-extra"
OUT = RESULTS / "tiles"
NAME = re.compile(r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<c>[01])")
GRID = 50
FIELD = 10  # patches per field side
MIN_FIELD_PATCHES = 10
GLASS = np.array([238.0, 236.0, 240.0])
KEYS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")


@dataclass(frozen=True)
class Patch:
    path: Path
    patient: str
    x: int  # top-left corner on the slide, 1-based as in the file names
    y: int
    label: int
    source: str  # "dev" or "extra"


def all_patches() -> dict[str, list[Patch]]:
    out: dict[str, list[Patch]] = defaultdict(list)
    for source, root in (("dev", IDC_DEV), ("extra", IDC_EXTRA)):
        for folder in ("benign", "malignant"):
            for path in sorted((root / folder).iterdir()):
                m = NAME.match(path.name)
                if m:
                    patch = Patch(path, m["patient"], int(m["x"]), int(m["y"]), int(m["c"]), source)
                    out[patch.patient].append(patch)
    return dict(out)


def val_patients(run: Path) -> list[str]:
    with (run / "split.csv").open(newline="") as fh:
        return sorted({row["group"] for row in csv.DictReader(fh) if row["split"] == "val"})


@dataclass
class Mosaic:
    patient: str
    image: NDArray[np.uint8]
    cells: dict[tuple[int, int], Patch]  # (col, row) of the 50 px grid -> the patch laid there
    origin: tuple[int, int]  # the slide position of the mosaic's top-left pixel

    def place(self, patch: Patch) -> tuple[int, int]:
        """The patch's top-left corner in the mosaic."""
        return patch.x - 1 - self.origin[0], patch.y - 1 - self.origin[1]


def build(patient: str, patches: list[Patch], seed: int = 0) -> Mosaic:
    from histod import imaging

    x0, y0 = min(p.x for p in patches) - 1, min(p.y for p in patches) - 1  # multiples of 50
    width = max(p.x for p in patches) - 1 - x0 + GRID
    height = max(p.y for p in patches) - 1 - y0 + GRID
    rng = np.random.default_rng(seed)
    image = np.clip(GLASS + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8)
    cells = {}
    for p in patches:
        px, py = p.x - 1 - x0, p.y - 1 - y0
        pixels = imaging.load(p.path, None)[:GRID, :GRID]
        image[py : py + pixels.shape[0], px : px + pixels.shape[1]] = pixels
        cells[(px // GRID, py // GRID)] = p
    return Mosaic(patient, image, cells, (x0, y0))


def png_bytes(image: NDArray[np.uint8]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def tile(mosaic: Mosaic, classifier: Any, scale: Any, offset: int = 0) -> Any:
    """The mosaic (shifted by ``offset`` px) through histod.slides as a PNG file's bytes, like a dropped field."""
    from histod import readers, slides

    image = mosaic.image[offset:, offset:]
    reader = readers.ImageReader(png_bytes(image), mosaic.patient)
    return slides.classify(reader, classifier.predict, scale)


def tile_truth(mosaic: Mosaic, x: int, y: int, offset: int) -> tuple[int | None, float]:
    """(class of most of the tile's patch area or None, the share of the tile covered by patches)."""
    covered = malignant = 0
    for col in range((x + offset) // GRID, (x + offset + GRID - 1) // GRID + 1):
        for row in range((y + offset) // GRID, (y + offset + GRID - 1) // GRID + 1):
            p = mosaic.cells.get((col, row))
            if p is None:
                continue
            w = min(x + offset + GRID, (col + 1) * GRID) - max(x + offset, col * GRID)
            h = min(y + offset + GRID, (row + 1) * GRID) - max(y + offset, row * GRID)
            covered += w * h
            malignant += w * h * p.label
    if covered == 0:
        return None, 0.0
    return int(malignant / covered >= 0.5), covered / GRID**2


def figures(y: NDArray[Any], p: NDArray[Any], groups: NDArray[Any], cut: float) -> dict[str, Any]:
    from histod.trainer.evaluate import bootstrap_ci, metrics

    m = metrics(y, p, cut)
    out = {k: m[k] for k in KEYS} | {"n": int(y.size), "positives": int(y.sum()), "patients": len(set(groups))}
    out["ci95"] = bootstrap_ci(y, p, groups, cut, n=500)
    return out


# --- table ------------------------------------------------------------------------------------------------------


def patch_level(classifier: Any, patches: list[Patch]) -> NDArray[np.float32]:
    from histod import imaging

    p = []
    for start in range(0, len(patches), 256):
        chunk = patches[start : start + 256]
        p.append(classifier.predict(np.stack([imaging.load(q.path, classifier.image_size) for q in chunk])))
    return np.concatenate(p)


def mosaic_tiles(mosaics: list[Mosaic], classifier: Any, scale: Any, offset: int) -> dict[str, Any]:
    """Every tissue tile of every mosaic with its truth; glass tiles taken as tissue; patches lost."""
    rows: list[tuple[str, int, int, float, float, int | None, float]] = []
    lost: list[tuple[str, int]] = []
    results = {}
    for m in mosaics:
        result = tile(m, classifier, scale, offset)
        results[m.patient] = result
        found = set()
        for x, y, p, t in zip(result.x, result.y, result.p, result.tissue, strict=True):
            label, cover = tile_truth(m, int(x), int(y), offset)
            rows.append((m.patient, int(x), int(y), float(p), float(t), label, cover))
            found.add(((int(x) + offset) // GRID, (int(y) + offset) // GRID))
        if offset == 0:
            lost += [(m.patient, q.label) for cell, q in m.cells.items() if cell not in found]
    return {"rows": rows, "lost": lost, "results": results}


def fields(mosaic: Mosaic, rows: list[tuple[str, int, int, float, float, int | None, float]]) -> list[dict[str, Any]]:
    """Fields of FIELD x FIELD patches with at least MIN_FIELD_PATCHES patches: truth and tissue tiles."""
    by_field: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for _, x, y, p, t, _, _ in rows:
        by_field[(x // GRID // FIELD, y // GRID // FIELD)].append((p, t * GRID**2))
    out = []
    members: dict[tuple[int, int], list[Patch]] = defaultdict(list)
    for (col, row), patch in mosaic.cells.items():
        members[(col // FIELD, row // FIELD)].append(patch)
    for key, patches in members.items():
        if len(patches) >= MIN_FIELD_PATCHES and by_field.get(key):
            tiles = np.array(by_field[key])
            truth = int(any(q.label for q in patches))
            share = sum(q.label for q in patches) / len(patches)
            out.append({"patient": mosaic.patient, "y": truth, "share": share, "p": tiles[:, 0], "area": tiles[:, 1]})
    return out


def candidate_rules() -> list[Any]:
    from histod.tiling import Rule

    kinds = [("max", 0.0), ("mean", 0.0), ("topk", 3), ("topk", 0.1), ("topk", 0.25), ("share", 0.0), ("count", 0.0)]
    return [Rule(kind, k) for kind, k in kinds]


def best_cut(y: NDArray[Any], s: NDArray[Any]) -> float:
    """The score cut with the highest balanced accuracy (the lowest of equals)."""
    cuts = np.unique(np.round(s, 2))  # a cut of two decimals (whole tiles for counts)
    ba = [((s[y == 1] >= c).mean() + (s[y == 0] < c).mean()) / 2 for c in cuts]
    return float(cuts[int(np.argmax(ba))])


def rule_table(
    train_fields: list[dict[str, Any]], val_fields: list[dict[str, Any]], threshold: float
) -> dict[str, Any]:
    """Every candidate rule: its cut (best balanced accuracy on the training fields), then its validation figures."""
    from sklearn.metrics import roc_auc_score

    from histod.tiling import Rule, score

    out: dict[str, Any] = {}
    for rule in candidate_rules():
        s_train = np.array([score(rule, f["p"], f["area"], threshold) for f in train_fields])
        y_train = np.array([f["y"] for f in train_fields])
        cut = best_cut(y_train, s_train)
        chosen = Rule(rule.kind, rule.k, cut)
        s_val = np.array([score(rule, f["p"], f["area"], threshold) for f in val_fields])
        y_val = np.array([f["y"] for f in val_fields])
        groups = np.array([f["patient"] for f in val_fields])
        train_ba = ((s_train[y_train == 1] >= cut).mean() + (s_train[y_train == 0] < cut).mean()) / 2
        out[chosen.name] = {
            "kind": rule.kind,
            "k": rule.k,
            "cut": cut,
            "train": {"balanced_accuracy": train_ba, "roc_auc": float(roc_auc_score(y_train, s_train))},
            "val": figures(y_val, s_val, groups, cut),
        }
    return out


def run_table(args: argparse.Namespace) -> None:
    from histod import tiling
    from histod.daemon.classifier import load_classifier
    from histod.runs import load_run

    classifier = load_classifier(args.run, "litert", threads=2)
    info = load_run(args.run)
    scale = tiling.Scale.of(info)
    say(f"model {info.run_id}: image_size {info.image_size}, tile_px {info.tile_px}, threshold {info.threshold:.3f}")
    patients = all_patches()
    val = val_patients(args.run)
    train = sorted(set(patients) - set(val))
    started, conditions = time.monotonic(), machine()

    say(f"patch level: {sum(len(patients[v]) for v in val)} patches of {len(val)} validation patients")
    patches = [q for v in val for q in sorted(patients[v], key=lambda q: (q.y, q.x))]
    p_patch = patch_level(classifier, patches)
    y_patch = np.array([q.label for q in patches])
    g_patch = np.array([q.patient for q in patches])
    dev = np.array([q.source == "dev" for q in patches])

    say("building the validation mosaics")
    mosaics = [build(v, patients[v]) for v in val]
    levels = {}
    for offset in (0, GRID // 2):
        say(f"tiling the validation mosaics, offset {offset}")
        levels[offset] = mosaic_tiles(mosaics, classifier, scale, offset)
    rows0 = levels[0]["rows"]
    matched = [r for r in rows0 if r[5] is not None]
    tile_p = {(r[0], r[1], r[2]): r[3] for r in rows0}
    where = {m.patient: m for m in mosaics}
    paired = []  # (patch p, tile p, class, patient) for the patches found as tissue
    for q, p in zip(patches, p_patch, strict=True):
        key = (q.patient, *where[q.patient].place(q))
        if key in tile_p:
            paired.append((float(p), tile_p[key], q.label, q.patient))
    pairs = np.array([(a, b) for a, b, _, _ in paired])
    glass_taken = [r for r in rows0 if r[5] is None]
    n_glass_cells = sum((m.image.shape[0] // GRID) * (m.image.shape[1] // GRID) - len(m.cells) for m in mosaics)
    t = info.threshold

    def tile_figures(rows: list[Any], min_cover: float) -> dict[str, Any]:
        kept = [r for r in rows if r[5] is not None and r[6] >= min_cover]
        return figures(
            np.array([r[5] for r in kept]), np.array([r[3] for r in kept]), np.array([r[0] for r in kept]), t
        )

    report: dict[str, Any] = {
        "patch_level": {
            "all_patches_of_the_validation_patients": figures(y_patch, p_patch, g_patch, t),
            "idc_dev_validation_patches": figures(y_patch[dev], p_patch[dev], g_patch[dev], t),
        },
        "tile_level": {
            "aligned": tile_figures(rows0, 0.0),
            "aligned_same_patches_as_tiles": figures(
                np.array([c for _, _, c, _ in paired]), pairs[:, 0], np.array([g for *_, g in paired]), t
            ),
            "half_tile_offset": tile_figures(levels[GRID // 2]["rows"], 0.5),
            "patch_vs_tile_p": {
                "pairs": len(paired),
                "max_abs_diff": float(np.abs(pairs[:, 0] - pairs[:, 1]).max()),
                "share_above_0.01": float((np.abs(pairs[:, 0] - pairs[:, 1]) > 0.01).mean()),
                "same_decision": float(((pairs[:, 0] >= t) == (pairs[:, 1] >= t)).mean()),
            },
        },
        "tissue_mask": {
            "tissue_tiles": len(rows0),
            "glass_tiles_taken_as_tissue": len(glass_taken),
            "glass_cells": n_glass_cells,
            "glass_taken_share_of_glass": len(glass_taken) / max(1, n_glass_cells),
            "glass_taken_share_of_tissue_tiles": len(glass_taken) / max(1, len(rows0)),
            "patches": len(patches),
            "patches_lost_as_background": len(levels[0]["lost"]),
            "lost_malignant": sum(c for _, c in levels[0]["lost"]),
            "matched_tiles": len(matched),
        },
    }
    say(f"training patients' fields: mosaics of idc-extra patches of {len(train)} training patients")
    train_fields = []
    for i, patient in enumerate(train):
        extra = [q for q in patients[patient] if q.source == "extra"]
        if len(extra) < MIN_FIELD_PATCHES:
            continue
        m = build(patient, extra, seed=i + 1)
        result = mosaic_tiles([m], classifier, scale, 0)
        train_fields += fields(m, result["rows"])
    val_fields = [f for m in mosaics for f in fields(m, [r for r in rows0 if r[0] == m.patient])]
    rules = rule_table(train_fields, val_fields, t)
    chosen = max(rules, key=lambda name: (rules[name]["train"]["balanced_accuracy"], rules[name]["train"]["roc_auc"]))
    rule = tiling.Rule(rules[chosen]["kind"], rules[chosen]["k"], rules[chosen]["cut"])
    report["image_level"] = {
        "fields": {"train": len(train_fields), "val": len(val_fields)},
        "field_positives": {
            "train": sum(f["y"] for f in train_fields),
            "val": sum(f["y"] for f in val_fields),
        },
        "rules": rules,
        "chosen_on_training_fields": chosen,
    }
    per_patient = []
    for m in mosaics:
        result = levels[0]["results"][m.patient]
        truth = sum(q.label for q in m.cells.values()) / len(m.cells)
        mine = [r for r in rows0 if r[0] == m.patient and r[5] is not None]
        per_patient.append(
            {
                "patient": m.patient,
                "complete_slide": m.patient in COMPLETE,
                "size": f"{m.image.shape[1]}x{m.image.shape[0]}",
                "patches": len(m.cells),
                "idc_share": truth,
                "tissue_tiles": result.aggregate.n_tissue,
                "glass_taken": sum(1 for r in rows0 if r[0] == m.patient and r[5] is None),
                "predicted_share": result.aggregate.malignant_share,
                "score": tiling.aggregate(result.p, result.tissue * GRID**2, t, rule).score,
                "tile_accuracy": float(np.mean([(r[3] >= t) == r[5] for r in mine])) if mine else None,
                "label": tiling.aggregate(result.p, result.tissue * GRID**2, t, rule).label,
            }
        )
    true_share = np.array([r["idc_share"] for r in per_patient])
    pred_share = np.array([r["predicted_share"] for r in per_patient])
    report["per_patient"] = per_patient
    report["patient_share"] = {
        "mean_abs_error": float(np.abs(true_share - pred_share).mean()),
        "pearson_r": float(np.corrcoef(true_share, pred_share)[0, 1]),
        "bias": float((pred_share - true_share).mean()),
    }
    report.update(
        run=str(args.run),
        run_id=info.run_id,
        threshold=t,
        tile_px=info.tile_px,
        wall_s=round(time.monotonic() - started, 1),
        machine=conditions,
        load_average_at_end=load_average(),
    )
    write_result("mosaic", report, OUT)
    print_table(report)


COMPLETE = {"9077", "8974", "9126", "8864", "8917", "9023", "8980", "8950"}


def _ci(f: dict[str, Any], key: str) -> str:
    lo, hi = f["ci95"][key]
    return f"{f[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def print_table(report: dict[str, Any]) -> None:
    rows = []
    for name, f in [
        (
            "patches, served model (all patches of the val. patients)",
            report["patch_level"]["all_patches_of_the_validation_patients"],
        ),
        ("patches, idc-dev validation split only", report["patch_level"]["idc_dev_validation_patches"]),
        ("tiles, grid aligned with the patches", report["tile_level"]["aligned"]),
        ("tiles, grid shifted by half a tile", report["tile_level"]["half_tile_offset"]),
    ]:
        rows.append([name, f["n"], f["patients"], _ci(f, "balanced_accuracy"), _ci(f, "roc_auc")])
    print(table(["level", "n", "patients", "balanced accuracy", "ROC AUC"], rows))
    print()
    print(json.dumps(report["tissue_mask"], indent=1))
    print(json.dumps(report["tile_level"]["patch_vs_tile_p"], indent=1))
    image = report["image_level"]
    rows = []
    for name, r in image["rules"].items():
        v = r["val"]
        rows.append(
            [
                name,
                f"{r['train']['balanced_accuracy']:.3f}",
                f"{r['train']['roc_auc']:.3f}",
                _ci(v, "balanced_accuracy"),
                _ci(v, "roc_auc"),
                f"{v['sensitivity']:.3f}",
                f"{v['specificity']:.3f}",
            ]
        )
    print(f"\nfields: {image['fields']} (with IDC: {image['field_positives']})")
    print(f"chosen on the training fields: {image['chosen_on_training_fields']}")
    print(
        table(["rule (cut from training fields)", "train BA", "train AUC", "val BA", "val AUC", "sens", "spec"], rows)
    )
    print(json.dumps(report["patient_share"], indent=1))
    rows = [
        [
            r["patient"],
            "yes" if r["complete_slide"] else "",
            r["size"],
            r["patches"],
            f"{r['idc_share']:.2f}",
            r["tissue_tiles"],
            r["glass_taken"],
            f"{r['predicted_share']:.2f}",
            f"{r['tile_accuracy']:.3f}",
            r["label"],
        ]
        for r in report["per_patient"]
    ]
    print(
        table(
            [
                "patient",
                "complete",
                "size",
                "patches",
                "IDC share",
                "tissue tiles",
                "glass as tissue",
                "predicted share",
                "tile accuracy",
                "rule's label",
            ],
            rows,
        )
    )


# --- show -------------------------------------------------------------------------------------------------------


def run_show(args: argparse.Namespace) -> None:
    """One patient's mosaic and its densest field as PNG files, `histod predict` on both, and a small heat-map."""
    from PIL import Image

    from histod import heatmap, readers, slides, tiling
    from histod.daemon.classifier import load_classifier
    from histod.runs import load_run

    args.work.mkdir(parents=True, exist_ok=True)
    m = build(args.patient, all_patches()[args.patient])
    mosaic_png = args.work / f"mosaic-{args.patient}.png"
    Image.fromarray(m.image).save(mosaic_png)
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for col, row in m.cells:
        counts[(col // FIELD, row // FIELD)] += 1
    col, row = max(counts, key=lambda k: counts[k])
    side = FIELD * GRID
    field_png = args.work / f"field-{args.patient}.png"
    Image.fromarray(m.image[row * side : (row + 1) * side, col * side : (col + 1) * side]).save(field_png)
    histod = Path(sys.executable).parent / "histod"
    command = [str(histod), "predict", "--model", str(args.run), "--heatmap", str(args.work / "maps")]
    done = subprocess.run([*command, str(mosaic_png), str(field_png)], capture_output=True, text=True)
    print(f"$ histod predict --model RUN --heatmap {args.work / 'maps'} {mosaic_png.name} {field_png.name}")
    print(done.stdout, end="")
    classifier = load_classifier(args.run, "litert", threads=2)
    result = slides.classify(
        readers.ImageReader(mosaic_png.read_bytes(), mosaic_png.name),
        classifier.predict,
        tiling.Scale.of(load_run(args.run)),
    )
    assert isinstance(result, tiling.TiledResult)
    truth = sum(q.label for q in m.cells.values()) / len(m.cells)
    title = (
        f"patient {args.patient} ({len(m.cells)} patches, {truth:.0%} IDC): {result.label}, "
        f"{result.aggregate.malignant_share:.0%} of the tissue above the threshold"
    )
    heatmap.write(args.docs, result, classifier.threshold, title=title, dpi=60)
    with Image.open(args.docs) as png:
        png.convert("RGB").quantize(colors=96).save(args.docs, optimize=True)
    say(f"written {args.docs} ({args.docs.stat().st_size // 1024} KiB)")
    write_result(f"show-{args.patient}", {"command_output": done.stdout, "summary": result.summary()}, OUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["table", "show"])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--patient", default="9126")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tiles-work"))
    parser.add_argument("--docs", type=Path, default=None, help="the heat-map PNG to write (default docs/img/...)")
    args = parser.parse_args()
    if args.docs is None:
        args.docs = RESULTS.parent.parent / "docs" / "img" / f"heatmap-{args.patient}.png"
    run_table(args) if args.command == "table" else run_show(args)


if __name__ == "__main__":
    main()
