"""`histod train`, `histod evaluate`, `histod predict`. TensorFlow is imported inside the commands only.

Each command is thin: parse flags, call histod.trainer.api (or the serving classifier), print. Domain errors
(histod.errors) are turned into messages and exit codes by the group in histod.cli.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from histod.commands_service import chosen_format, format_options
from histod.errors import ConfigError
from histod.logs import problem, say
from histod.settings import load_settings
from histod.trainer import presets
from histod.trainer.config import TrainConfig
from histod.trainer.presets import PRESETS

if TYPE_CHECKING:
    from histod.tiling import TiledResult

COMMANDS: list[click.Command] = []

_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1")


def _d(field: str) -> str:
    """``(default X)`` for a train flag, read from TrainConfig so that help and behaviour cannot drift apart."""
    value = TrainConfig.model_fields[field].default
    shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    return f"(default {shown})"


def _run_dir(model: Path | None) -> Path:
    resolved = load_settings(model=model).model
    if resolved is None:
        raise ConfigError("no model: pass --model RUN_DIR (a folder written by `histod train`) or set HISTOD_MODEL")
    return resolved


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _print_metrics(result: dict[str, Any]) -> None:
    for key in _METRICS:
        click.echo(f"  {key.replace('_', ' '):<18} {_fmt(result.get(key))}")
    click.echo(f"  {'threshold':<18} {_fmt(result.get('threshold'))}")
    (tn, fp), (fn, tp) = result["confusion_matrix"]
    click.echo("  confusion matrix   predicted Benign  predicted Malignant")
    click.echo(f"    true Benign      {tn:>16}  {fp:>19}")
    click.echo(f"    true Malignant   {fn:>16}  {tp:>19}")


# --- train -----------------------------------------------------------------------------------------------------


@click.command()
@click.argument("data_dir", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="RUN_DIR to write (new or empty)")
@click.option(
    "--resume",
    is_flag=True,
    help="go on with the interrupted run in --out from its last finished epoch (its config.json; flags given "
    "must agree with it)",
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help="paper: the method's literal recipe (224 px, pixels / 255, one phase at 1e-5, image-level split, "
    "threshold 0.5) instead of the measured best defaults; flags given here still win",
)
@click.option("--weights", default=None, help=f"imagenet | none | PATH to an .h5 file of base weights {_d('weights')}")
@click.option("--alpha", type=float, default=None, help=f"MobileNetV2 width multiplier {_d('alpha')}")
@click.option("--image-size", type=int, default=None, help=f"square input side in pixels {_d('image_size')}")
@click.option(
    "--head-epochs", type=int, default=None, help=f"head-only epochs with the base frozen {_d('head_epochs')}"
)
@click.option("--epochs", type=int, default=None, help=f"fine-tuning epochs at most {_d('epochs')}")
@click.option("--batch-size", type=int, default=None, help=_d("batch_size"))
@click.option(
    "--fine-tune-layers", type=int, default=None, help=f"base layers unfrozen for fine-tuning {_d('fine_tune_layers')}"
)
@click.option(
    "--head-learning-rate", type=float, default=None, help=f"Adam rate for the head phase {_d('head_learning_rate')}"
)
@click.option("--learning-rate", type=float, default=None, help=f"Adam rate for fine-tuning {_d('learning_rate')}")
@click.option("--dropout", type=float, default=None, help=f"head dropout {_d('dropout')}")
@click.option("--ema", type=float, default=None, help=f"weights moving average, scored and kept (0 = off) {_d('ema')}")
@click.option("--patience", type=int, default=None, help=f"EarlyStopping patience {_d('patience')}")
@click.option("--lr-patience", type=int, default=None, help=f"ReduceLROnPlateau patience {_d('lr_patience')}")
@click.option("--lr-factor", type=float, default=None, help=f"ReduceLROnPlateau factor {_d('lr_factor')}")
@click.option(
    "--class-weights/--no-class-weights", default=None, help=f"inverse-frequency loss weights {_d('class_weights')}"
)
@click.option("--augment/--no-augment", default=None, help=f"rotation, zoom, shear, horizontal flips {_d('augment')}")
@click.option("--dihedral/--no-dihedral", default=None, help=f"also vertical flips, 90° rotations {_d('dihedral')}")
@click.option("--seed", type=int, default=None, help=_d("seed"))
@click.option("--val-split", type=float, default=None, help=f"validation share {_d('val_split')}")
@click.option(
    "--split-by", type=click.Choice(["patient", "image"]), default=None, help=f"validation split {_d('split_by')}"
)
@click.option("--group-pattern", default=None, help="regex with a named group `group` (patient id in file names)")
@click.option(
    "--val-patients",
    type=click.Path(path_type=Path),
    default=None,
    help="file of patient ids, one a line: validate on exactly these patients instead of a drawn split",
)
@click.option(
    "--patient-cap",
    type=click.IntRange(min=0),
    default=None,
    help=f"at most this many images of one patient in each epoch, drawn afresh (0 = all) {_d('patient_cap')}",
)
@click.option(
    "--calibrate/--no-calibrate",
    default=None,
    help=f"Platt scaling fitted on the validation split, folded into the model {_d('calibrate')}",
)
@click.option(
    "--tta",
    type=click.Choice(["1", "2", "4", "8"]),
    default=None,
    help=f"average p over this many flips/rotations at prediction, stored with the model {_d('tta')}",
)
@click.option(
    "--target-sensitivity", type=float, default=None, help="pick the threshold reaching this sensitivity on validation"
)
@click.option("--threshold", type=float, default=None, help="a fixed decision threshold instead of choosing one")
@click.option(
    "--cv",
    type=int,
    default=None,
    help="k-fold patient-grouped cross-validation instead: k models, scored on held-out patients (no model kept)",
)
@click.option(
    "--tile-px",
    type=click.IntRange(min=1),
    default=None,
    help="side of the training images in source pixels: larger inputs are tiled at it (default: their median)",
)
@click.option(
    "--tile-mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="microns per pixel of the training images (picks a slide's level)",
)
def train(
    data_dir: tuple[Path, ...], out: Path, resume: bool, preset: str | None, cv: int | None, **flags: Any
) -> None:
    """Train a Benign/Malignant classifier on DATA_DIR (benign/ and malignant/ folders) into --out RUN_DIR.

    Several DATA_DIRs, or a folder of them, are pooled: a patient's images stay on one side of the split whichever
    folder they are in. The defaults are the recipe measured best on held-out patients; see docs/training.md.
    """
    from histod.errors import ExportParityError
    from histod.trainer import require_training
    from histod.trainer.api import train as run_training

    require_training("histod train")
    values = {k: v for k, v in flags.items() if v is not None}
    if "tta" in values:
        values["tta"] = int(values["tta"])
    requested = {**presets.preset(preset), **values}
    if resume and cv is not None:
        raise ConfigError("--resume continues one trained run; --cv trains none to keep")
    cfg = _resumed_config(data_dir, out, requested) if resume else _config(data_dir, out, requested)
    if cv is not None:
        _cross_validate(cfg, cv)
        return
    from histod.logs import json_mode
    from histod.progress import Progress

    try:
        with Progress("epochs", 0, show=not json_mode(load_settings().log_format)) as bar:  # on a terminal

            def advance(done: int, at_most: int) -> None:
                bar.total = at_most
                bar.advance(done - bar.done)

            run = run_training(cfg, resume=resume, on_epoch=advance)
    except ExportParityError:
        _print_run(cfg.out)
        raise
    _print_run(run)


def _config(data_dir: tuple[Path, ...], out: Path, values: dict[str, Any]) -> TrainConfig:
    from pydantic import ValidationError

    try:
        return TrainConfig(data_dir=data_dir, out=out, **values)
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise ConfigError(problems) from exc


def _resumed_config(data_dir: tuple[Path, ...], out: Path, values: dict[str, Any]) -> TrainConfig:
    """The interrupted run's own config.json; what the command line asks for must agree with it."""
    from histod.runs import CONFIG_FILE

    if not (out / CONFIG_FILE).is_file():
        raise ConfigError(f"--out {out} holds no run to resume (no {CONFIG_FILE})")
    saved = TrainConfig.load(out)
    asked = _config(data_dir, out, values)
    differ = [
        f"--{key.replace('_', '-')} {getattr(asked, key)} (the run has {getattr(saved, key)})"
        for key in values
        if getattr(asked, key) != getattr(saved, key)
    ]
    if [p.resolve() for p in asked.data_dirs] != [p.resolve() for p in saved.data_dirs]:
        given, had = (" ".join(map(str, c.data_dirs)) for c in (asked, saved))
        differ.insert(0, f"DATA_DIR {given} (the run has {had})")
    if differ:
        raise ConfigError(f"--resume goes on with the run as it was configured; these differ: {'; '.join(differ)}")
    return saved


def _print_run(run: Path) -> None:
    from histod.runs import load_metrics

    m = load_metrics(run)
    counts: Any = m.get("counts", {})
    click.echo(
        f"validation ({m.get('n')} images; train {sum(counts.get('train', {}).values())}, "
        f"skipped {counts.get('skipped', 0)}), threshold {_fmt(m.get('threshold'))}:"
    )
    click.echo(
        f"  balanced accuracy {_fmt(m.get('balanced_accuracy'))}  ROC AUC {_fmt(m.get('roc_auc'))}  "
        f"sensitivity {_fmt(m.get('sensitivity'))}  specificity {_fmt(m.get('specificity'))}"
    )
    click.echo(f"  epochs {m.get('epochs_run')} (best {m.get('best_epoch')}), wall time {m.get('wall_time_s')} s")
    click.echo(f"run: {run}")


def _cross_validate(cfg: TrainConfig, k: int) -> None:
    from histod.trainer.cv import cross_validate

    summary = cross_validate(cfg, k)
    click.echo(f"{k}-fold cross-validation over {summary['patients']} patients ({summary['n']} images):")
    for fold in summary["folds"]:
        click.echo(
            f"  fold {fold['fold']}: balanced accuracy {_fmt(fold['balanced_accuracy'])}  "
            f"ROC AUC {_fmt(fold['roc_auc'])}  ({fold['val_patients']} patients, {fold['n']} images)"
            + (
                f"; first view alone {_fmt(fold['single_view']['balanced_accuracy'])} / "
                f"{_fmt(fold['single_view']['roc_auc'])}"
                if "single_view" in fold
                else ""
            )
        )
    for key in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity"):
        m = summary["mean"][key]
        lo, hi = summary["pooled_ci95"][key]
        click.echo(
            f"  {key.replace('_', ' '):<18} mean {_fmt(m)} (sd {_fmt(summary['sd'][key])}); "
            f"pooled {_fmt(summary['pooled'][key])} [95% CI {lo:.4f}, {hi:.4f}]"
        )
    click.echo(f"written: {cfg.out / 'cv.json'}")


# --- evaluate --------------------------------------------------------------------------------------------------


@click.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), default=None, help="RUN_DIR (default: HISTOD_MODEL)")
@format_options("table: text; csv: metric,value,ci95_low,ci95_high; json: one object")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="a folder for metrics.json, the report, predictions.csv and the plots",
)
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True, help="LiteRT inference threads")
def evaluate(data_dir: Path, model: Path | None, fmt: str, as_json: bool, out: Path | None, threads: int) -> None:
    """Score a labelled DATA_DIR (benign/, malignant/) with a trained model and its stored threshold, with 95 %
    intervals from a bootstrap over patients (as `histod train` reports them).

    Each image is classified as `histod predict` classifies it: a folder of images much larger than the model's
    tiles (fields, slides) is scored image by image, each tiled, at its rule's cut; a folder mixing them with
    tile-sized images is refused."""
    from histod.daemon.classifier import load_classifier
    from histod.progress import Progress
    from histod.trainer.api import evaluate_folder

    fmt = chosen_format(fmt, as_json)
    run_dir = _run_dir(model)
    classifier = load_classifier(run_dir, "litert", threads=threads)
    with Progress("scored", 0) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.advance(done - bar.done)

        result = evaluate_folder(run_dir, data_dir, classifier, out=out, progress=advance)
    if fmt == "json":
        click.echo(json.dumps(result))
    elif fmt == "csv":
        click.echo(_metrics_csv(result), nl=False)
    else:
        click.echo(f"{data_dir}: {result['n']} images ({result['n_benign']} benign, {result['n_malignant']} malignant)")
        if result["tiled"]:
            click.echo(f"  each image tiled at the model's scale and labelled by rule {result['rule']}")
        _print_metrics(result)
        ci = result.get("ci95")
        click.echo(
            f"  95 % intervals: bootstrap over {result['groups']} patients"
            if ci
            else f"  no 95 % intervals: {result['groups']} patient(s) and both classes are needed"
        )
    for w in result["warnings"]:
        click.echo(f"warning: {w['path']}: {w['warning']}", err=True)
    for s in result["skipped"]:
        click.echo(f"skipped {s['path']}: {s['reason']}: {s['message']}", err=True)
    summary = f"done: {result['n']} images scored in {bar.elapsed():.1f} s"
    if result["skipped"]:
        summary += f", {len(result['skipped'])} skipped"
    say(summary + (f"; written: {out}" if out is not None else ""), event="evaluate.done", images=result["n"])


def _metrics_csv(result: dict[str, Any]) -> str:
    from histod.db.audit import write_csv

    ci = result.get("ci95") or {}
    rows = [
        {
            "metric": k,
            "value": result.get(k),
            "ci95_low": ci.get(k, [None, None])[0],
            "ci95_high": ci.get(k, [None, None])[1],
        }
        for k in (*_METRICS, "threshold", "ece")
    ]
    out = io.StringIO()
    write_csv(out, ("metric", "value", "ci95_low", "ci95_high"), rows)
    return out.getvalue()


# --- predict ---------------------------------------------------------------------------------------------------


PREDICT_COLUMNS = ("path", "label", "p_malignant", "error", "message")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), default=None, help="RUN_DIR (default: HISTOD_MODEL)")
@format_options(
    "table: `path => label (p_malignant=..)`; csv: path, label, p_malignant, error, message; json: one object per "
    "line (with every tile of a tiled image)"
)
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True, help="LiteRT inference threads")
@click.option(
    "--heatmap",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="write a heat-map PNG of every tiled image into this folder",
)
@click.pass_context
def predict(
    ctx: click.Context,
    paths: tuple[Path, ...],
    model: Path | None,
    fmt: str,
    as_json: bool,
    threads: int,
    heatmap: Path | None,
) -> None:
    """Classify image files and folders: `name => Benign|Malignant (p_malignant=0.93)` per image; an image much
    larger than the model's tiles is tiled, with one summary line."""
    from histod.daemon.classifier import load_classifier
    from histod.db.audit import write_csv
    from histod.progress import Progress
    from histod.trainer.api import expand, predict_paths

    fmt = chosen_format(fmt, as_json)
    run_dir = _run_dir(model)
    files = expand(list(paths))
    if not files:
        raise ConfigError(f"no image files in {', '.join(map(str, paths))}")
    classifier = load_classifier(run_dir, "litert", threads=threads)
    if fmt == "csv":
        header = io.StringIO()
        write_csv(header, PREDICT_COLUMNS, [])
        click.echo(header.getvalue(), nl=False)
    failed = 0
    taken: set[str] = set()
    with Progress("classified", len(files)) as bar:
        for pred in predict_paths(classifier, files):
            record: dict[str, Any] = {"path": str(pred.path)}
            if pred.error is not None:
                failed += 1
                record |= {"error": pred.error.reason, "message": pred.error.args[0]}
                text = f"{pred.path} => error ({pred.error.reason}): {pred.error.args[0]}"
            else:
                assert pred.p_malignant is not None
                record |= {"label": pred.label, "p_malignant": round(pred.p_malignant, 6)}
                text = f"{pred.path} => {pred.label} (p_malignant={pred.p_malignant:.2f})"
            bar.clear()
            for warning in pred.warnings if fmt != "json" else ():
                click.echo(f"warning: {pred.path}: {warning}", err=True)
            if pred.tiled is not None and fmt != "csv":
                target = None if heatmap is None else heatmap / _heatmap_name(pred.path.name, taken)
                _tiled(pred.path, pred.tiled, fmt == "json", target, classifier.threshold)
            elif fmt == "json":
                click.echo(json.dumps({**record, "warnings": list(pred.warnings)} if pred.warnings else record))
            elif fmt == "csv":
                row = io.StringIO()
                write_csv(row, PREDICT_COLUMNS, [record], header=False)
                click.echo(row.getvalue(), nl=False)
            else:
                click.echo(text)
            bar.advance()
    summary = f"{len(files) - failed} of {len(files)} images classified in {bar.elapsed():.1f} s"
    if failed:
        problem(f"{failed} of {len(files)} images could not be read ({summary})", files=len(files), failed=failed)
        ctx.exit(1)
    say(f"done: {summary}", event="predict.done", files=len(files))


def _heatmap_name(name: str, taken: set[str]) -> str:
    """``NAME.heatmap.png``, or ``NAME-2.heatmap.png``, ``NAME-3...`` when an earlier image of this command has the
    same file name (images of one name in several folders), so that no heat-map overwrites another."""
    candidate, n = f"{name}.heatmap.png", 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}.heatmap.png"
    taken.add(candidate)
    return candidate


def _tiled(path: Path, result: TiledResult, as_json: bool, heatmap: Path | None, threshold: float) -> None:
    """One summary line (or JSON object with every tile) for a tiled image; its heat-map, to the file ``heatmap``,
    when asked."""
    a = result.aggregate
    written = None
    if heatmap is not None:
        from histod import heatmap as heatmaps

        written = heatmaps.write(heatmap, result, threshold)
    if as_json:
        record = {"path": str(path), **result.summary(), "heatmap": None if written is None else str(written)}
        click.echo(json.dumps({**record, "tiles": result.tiles()}))
        return
    area = "" if result.malignant_area_mm2 is None else f", {result.malignant_area_mm2:.3f} mm²"
    click.echo(
        f"{path} => {a.label} (rule {a.rule}: {a.score:.3f}): {a.n_tissue} tissue tiles of {result.n_tiles}, "
        f"{a.n_malignant} malignant ({a.malignant_share:.1%} of the tissue{area})"
        + ("" if written is None else f"; heat-map {written}")
    )


COMMANDS += [train, evaluate, predict]
