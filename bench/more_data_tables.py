"""The tables of bench/more_data.py's results (``more_data.py table``), the ones docs/training.md quotes: every
fold result on all held-out images, on their idc-dev images beside the idc-dev-alone 5-fold run where it held out
the same patients, with and without the complete slides, the mean of the folds run so far, and the pooled 5-fold
cross-validations."""

from __future__ import annotations

import csv
import gzip
import json
from typing import Any

import numpy as np

from bench.common import table
from bench.more_data import BASELINE, KEYS, OUT, Variant, complete_slides, read_predictions


def _ci(s: dict[str, Any], key: str) -> str:
    lo, hi = s["ci95"][key]
    return f"{s[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _two(s: dict[str, Any]) -> str:
    return f"{s['balanced_accuracy']:.3f} / {s['roc_auc']:.3f}"


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def _data(v: Variant) -> str:
    """A variant's training data, in words."""
    words = "idc-dev" if v.data == "dev" else "idc-dev + idc-extra"
    if v.nocomplete:
        words += " without the complete slides' idc-extra images"
    if v.frac < 1:
        words += f", {v.frac:.0%} of the fitting images"
    return words


def _cap(r: dict[str, Any]) -> str:
    cap = r["config"].get("patient_cap") or 0
    return f"at most {cap}" if cap else "all"


def _order(r: dict[str, Any]) -> tuple[Any, ...]:
    v = Variant.parse(r["variant"])
    return (r["fold"], v.data != "dev", v.frac, v.nocomplete, r["config"].get("patient_cap") or 0)


def fold_results() -> list[dict[str, Any]]:
    """Every saved fold result, in table order: by fold, then idc-dev before idc-dev + idc-extra."""
    return sorted((json.loads(p.read_text()) for p in OUT.glob("*-fold*.json")), key=_order)


def reference_folds() -> dict[int, dict[str, Any]]:
    """The idc-dev-alone 5-fold run (BASELINE), per fold: its one-view figures on idc-dev images, with the
    patients it held out, so that a fold is compared with it only when they hold out the same patients."""
    predictions = BASELINE.with_name(BASELINE.stem + "-predictions.csv.gz")
    if not (BASELINE.is_file() and predictions.is_file()):
        return {}
    held: dict[int, set[str]] = {}
    with gzip.open(predictions, "rt") as fh:
        for row in csv.DictReader(fh):
            held.setdefault(int(row["fold"]), set()).add(row["group"])
    folds = json.loads(BASELINE.read_text())["folds"]
    return {f["fold"]: {**f["single_view"], "patients": held[f["fold"]], "seconds": f["seconds"]} for f in folds}


def _same_patients(r: dict[str, Any], ref: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The reference fold holding out the same patients as fold result ``r``, if there is one."""
    k = r["fold"]
    if k not in ref:
        return None
    groups = set(read_predictions(OUT / f"{r['variant']}-fold{k}.csv.gz")[3].tolist())
    return ref[k] if groups == ref[k]["patients"] else None


def _complete_only(r: dict[str, Any]) -> str:
    """Balanced accuracy / ROC AUC of fold result ``r`` on its complete-slide patients alone (no interval: one to
    three patients)."""
    from histod.trainer.evaluate import metrics

    y, p, decided, groups, _ = read_predictions(OUT / f"{r['variant']}-fold{r['fold']}.csv.gz")
    on = np.isin(groups, sorted(complete_slides()))
    if not on.any():
        return ""
    m = metrics(y[on], decided[on].astype(np.float64), 0.5)
    m["roc_auc"] = metrics(y[on], p[on], 0.5)["roc_auc"]
    return f"{len(set(groups[on].tolist()))} / {int(on.sum()):,}: {_two(m)}"


def show() -> None:
    """The Markdown tables of every saved result (the ones docs/training.md quotes)."""
    results, ref = fold_results(), reference_folds()
    if not results:
        raise SystemExit(f"no results in {OUT}")
    print("Held-out patients, all their images (idc-dev + idc-extra); 95 % intervals from a bootstrap over them:\n")
    rows = []
    for r in results:
        a, load = r["held_out_all"], r["conditions"]
        rows.append(
            [
                _data(Variant.parse(r["variant"])),
                _cap(r),
                str(r["fold"]),
                f"{a['patients']} / {a['n']:,}",
                f"{r['fit']['images']:,}",
                _ci(a, "balanced_accuracy"),
                _ci(a, "roc_auc"),
                f"{a['sensitivity']:.3f}",
                f"{a['specificity']:.3f}",
                f"{r['row']['epochs']} ({r['row']['best_epoch']})",
                f"{r['train_cpu_s'] / 60:.0f}",
                f"{r['train_wall_s'] / 60:.0f}",
                f"{load['load_average_at_start'][1]:.1f} / {load['load_average_at_end'][1]:.1f}",
            ]
        )
    headers = ["training data", "images per patient per epoch", "fold", "held out: patients / images"]
    headers += ["fitting images", "balanced accuracy [95 % CI]", "ROC AUC [95 % CI]", "sensitivity", "specificity"]
    headers += ["epochs (best)", "CPU min", "wall min", "load, start / end"]
    print(table(headers, rows))

    print("\nThe same models on the held-out patients' idc-dev images only, beside the idc-dev-alone 5-fold run")
    print(f"({BASELINE.name}, its one view) where it held out the same patients (balanced accuracy / ROC AUC):\n")
    rows = []
    for r in results:
        same, d = _same_patients(r, ref), r["held_out_dev_images"]
        rows.append(
            [
                _data(Variant.parse(r["variant"])),
                _cap(r),
                str(r["fold"]),
                f"{d['patients']} / {d['n']:,}",
                _two(d),
                _two(same) if same else "",
            ]
        )
    headers = ["training data", "images per patient per epoch", "fold", "patients / idc-dev images", "this run"]
    print(table([*headers, "5-fold run, same fold"], rows))

    print("\nWhat the complete slides change in the figures: the held-out patients with and without them")
    print("(balanced accuracy / ROC AUC):\n")
    rows = []
    for r in results:
        a, sparse = r["held_out_all"], r.get("held_out_sparse_patients")
        if sparse is None:
            continue
        rows.append(
            [
                _data(Variant.parse(r["variant"])),
                _cap(r),
                str(r["fold"]),
                f"{a['patients']} / {a['n']:,}",
                _two(a),
                f"{sparse['patients']} / {sparse['n']:,}",
                _two(sparse),
                _complete_only(r),
            ]
        )
    headers = ["training data", "images per patient per epoch", "fold", "all: patients / images", "all"]
    headers += ["without: patients / images", "without the complete slides", "the complete slides alone"]
    print(table(headers, rows))

    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    rows = []
    for name, runs in by_variant.items():
        if len(runs) < 2:
            continue
        views_ = {view: [r[view] for r in runs] for view in ("held_out_all", "held_out_dev_images")}
        means = {view: {k: _mean(v, k) for k in KEYS} for view, v in views_.items()}
        refs = [same for same in (_same_patients(r, ref) for r in runs) if same is not None]
        rows.append(
            [
                _data(Variant.parse(name)),
                _cap(runs[0]),
                ", ".join(str(r["fold"]) for r in runs),
                _two(means["held_out_all"]),
                f"{means['held_out_all']['sensitivity']:.3f} / {means['held_out_all']['specificity']:.3f}",
                _two(means["held_out_dev_images"]),
                _two({k: _mean(refs, k) for k in KEYS}) if len(refs) == len(runs) else "",
                f"{np.mean([r['train_cpu_s'] for r in runs]) / 60:.0f}",
                f"{np.mean([r['train_wall_s'] for r in runs]) / 60:.0f}",
            ]
        )
    if rows:
        print("\nMean of the folds run so far (balanced accuracy / ROC AUC):\n")
        headers = ["training data", "images per patient per epoch", "folds", "all images", "sensitivity / specificity"]
        headers += ["their idc-dev images", "5-fold run, same folds", "CPU min", "wall min"]
        print(table(headers, rows))
    pooled_tables()


VIEWS = {
    "held_out_all": "all images",
    "held_out_dev_images": "idc-dev images",
    "held_out_sparse_patients": "without the complete slides",
}


def pooled_tables() -> None:
    """The pooled 5-fold cross-validations (``cv``), when a variant has all its folds."""
    rows = []
    for path in sorted(OUT.glob("cv5-*.json")):
        s = json.loads(path.read_text())
        for view, label in VIEWS.items():
            v = s[view]
            rows.append(
                [
                    s["variant"],
                    label,
                    _two(v["mean"]),
                    _ci(v["pooled"], "balanced_accuracy"),
                    _ci(v["pooled"], "roc_auc"),
                    f"{v['pooled']['sensitivity']:.3f} / {v['pooled']['specificity']:.3f}",
                    f"{np.mean(s['train_cpu_s']) / 60:.0f}",
                    f"{np.mean(s['train_wall_s']) / 60:.0f}",
                ]
            )
    if not rows:
        return
    headers = ["variant", "held-out images", "mean of folds", "pooled balanced accuracy", "pooled ROC AUC"]
    headers += ["pooled sensitivity / specificity", "CPU min", "wall min"]
    print("\n5-fold cross-validation over all 223 patients:\n")
    print(table(headers, rows))
