"""Find the labelled images, group them by patient, split them, decode them. Small pure functions.

DATA_DIR holds ``benign/`` and ``malignant/`` (any letter case); several DATA_DIRs, or a folder of them, are
pooled. A patient (or slide) id parsed from each file name keeps all of one patient's images on the same side of
the split, whichever folder they are in; files without an id are their own group.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from histod import imaging
from histod.errors import ConfigError, DatasetError, ImageError
from histod.settings import IMAGE_EXTENSIONS

CLASS_DIRS: tuple[str, str] = ("benign", "malignant")  # label 0, label 1 (same order as histod.LABELS)

# Built-in patient-id patterns, tried in order on the file name.
BREAKHIS = re.compile(r"^SOB_[BM]_[A-Z]+-(?P<group>\d+-[0-9A-Za-z]+)-\d+-\d+", re.IGNORECASE)  # 14-22549AB
IDC = re.compile(r"^(?P<group>\d+)_idx\d+_x\d+_y\d+_class\d", re.IGNORECASE)  # 10253
DEFAULT_PATTERNS: tuple[re.Pattern[str], ...] = (BREAKHIS, IDC)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 benign, 1 malignant
    group: str


@dataclass(frozen=True)
class Split:
    train: list[Sample]
    val: list[Sample]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def class_dirs(data_dir: Path) -> dict[int, Path]:
    """Map label -> class folder, matching ``benign``/``malignant`` in any letter case."""
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a folder")
    found: dict[int, Path] = {}
    for child in sorted(data_dir.iterdir()):
        name = child.name.lower()
        if child.is_dir() and name in CLASS_DIRS:
            label = CLASS_DIRS.index(name)
            if label in found:
                raise DatasetError(f"{data_dir} has two {name} folders: {found[label].name} and {child.name}")
            found[label] = child
    missing = [CLASS_DIRS[i] for i in range(2) if i not in found]
    if missing:
        raise DatasetError(
            f"{data_dir} must hold the class folders benign/ and malignant/ (any letter case); "
            f"missing: {', '.join(m + '/' for m in missing)}"
        )
    return found


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """Compile a user ``--group-pattern``; it must have a named group ``group``."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--group-pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    if "group" not in compiled.groupindex:
        raise ConfigError(f"--group-pattern {pattern!r} needs a named group, e.g. (?P<group>\\d+)")
    return compiled


def group_of(name: str, pattern: re.Pattern[str] | str | None = None) -> str | None:
    """The patient/slide id in a file name, or None. A given pattern replaces the built-in ones."""
    patterns: Sequence[re.Pattern[str]]
    if pattern is None:
        patterns = DEFAULT_PATTERNS
    else:
        compiled = compile_pattern(pattern) if isinstance(pattern, str) else pattern
        assert compiled is not None
        patterns = (compiled,)
    for p in patterns:
        m = p.search(name)
        if m and m.group("group"):
            return m.group("group")
    return None


def has_class_dirs(folder: Path) -> bool:
    """Whether ``folder`` holds a ``benign`` or ``malignant`` folder (any letter case): a labelled data folder."""
    return any(c.is_dir() and c.name.lower() in CLASS_DIRS for c in folder.iterdir())


def data_folders(paths: Iterable[Path]) -> list[Path]:
    """The labelled folders in ``paths``, in order: a path holds ``benign/`` and ``malignant/`` itself, or is a
    folder of such folders (one level down). No folder may be given twice or lie inside another one."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise DatasetError(f"{path} is not a folder")
        if has_class_dirs(path):
            found.append(path)
            continue
        inner = [c for c in sorted(path.iterdir()) if c.is_dir() and has_class_dirs(c)]
        if not inner:
            class_dirs(path)  # raises: names the missing class folders
        found += inner
    if not found:
        raise DatasetError("no data folder given")
    resolved = [p.resolve() for p in found]
    for i, a in enumerate(resolved):
        for j, b in enumerate(resolved[:i]):
            if a == b or a in b.parents or b in a.parents:
                raise DatasetError(f"data folders {found[j]} and {found[i]} overlap: give each folder once")
    return found


def common_root(folders: Sequence[Path]) -> Path:
    """The folder the written file lists (split.csv, cv_predictions.csv) name images relative to: the data folder
    itself, or the deepest folder holding all of them."""
    if len(folders) == 1:
        return folders[0]
    return Path(os.path.commonpath([f.absolute() for f in folders]))


def discover(data_dir: Path, group_pattern: str | None = None, *, root: Path | None = None) -> list[Sample]:
    """Every image under the class folders (recursively), with its label and group, in a stable order.

    A file without a patient id is its own group, named by its path relative to ``root`` (default ``data_dir``)."""
    pattern = compile_pattern(group_pattern)
    samples: list[Sample] = []
    for label, folder in sorted(class_dirs(data_dir).items()):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))
        if not files:
            raise DatasetError(f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}, any letter case)")
        for path in files:
            group = group_of(path.name, pattern)
            # a file without an id is its own group; the prefix keeps it apart from real ids
            own = path.relative_to(data_dir) if root is None else path.absolute().relative_to(root)
            samples.append(Sample(path, label, group if group is not None else f"file:{own}"))
    return samples


def discover_all(data_dirs: Sequence[Path], group_pattern: str | None = None) -> list[Sample]:
    """``discover`` over every data folder of ``data_dirs`` (see ``data_folders``), pooled in folder order.

    One patient's images share a group whichever folder they are in, so every split keeps them together."""
    folders = data_folders(data_dirs)
    if len(folders) == 1:
        return discover(folders[0], group_pattern)
    root = common_root(folders)
    return [s for folder in folders for s in discover(folder, group_pattern, root=root)]


def read_patients(path: Path) -> set[str]:
    """Patient ids from a text file, one a line (blank lines and ``#`` comments ignored)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"--val-patients {path}: {exc.strerror or exc}") from exc
    ids = {line.split("#", 1)[0].strip() for line in lines} - {""}
    if not ids:
        raise ConfigError(f"--val-patients {path} lists no patient ids")
    return ids


def split_patients(samples: Sequence[Sample], val_patients: Iterable[str]) -> Split:
    """The validation side is exactly the images of ``val_patients``; every other image trains."""
    wanted = set(val_patients)
    unknown = wanted - {s.group for s in samples}
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DatasetError(f"{len(unknown)} validation patients have no images in the data: {shown}")
    result = Split(train=[s for s in samples if s.group not in wanted], val=[s for s in samples if s.group in wanted])
    check_sides(result.train, result.val)
    return result


def split(
    samples: Sequence[Sample],
    val_split: float,
    seed: int,
    by: str = "patient",
    val_patients: Collection[str] | None = None,
) -> Split:
    """Stratified by label AND grouped by patient: no group is ever on both sides.

    ``by="image"`` treats every file as its own group: the paper's image-level split, which puts tiles of one
    patient on both sides and so overstates accuracy (kept only to reproduce it, see ``--preset paper``).
    ``val_patients`` pins the validation side instead of drawing it (``split_patients``).
    """
    if val_patients is not None:
        if by != "patient":
            raise ConfigError("--val-patients needs the split by patient")
        return split_patients(samples, val_patients)
    train_idx, val_idx = folds(samples, max(2, round(1 / val_split)), seed, by)[0]
    train = [samples[i] for i in train_idx]
    val = [samples[i] for i in val_idx]
    check_sides(train, val)
    return Split(train=train, val=val)


def folds(
    samples: Sequence[Sample], n_splits: int, seed: int, by: str = "patient"
) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """``n_splits`` patient-grouped, label-stratified folds: (train indices, validation indices) for each.

    The draw depends on every image's label and group, so adding images to the same patients moves patients
    between folds; ``pinned_folds`` keeps a fold assignment of patients."""
    from sklearn.model_selection import StratifiedGroupKFold

    if by not in ("patient", "image"):
        raise ConfigError(f"split by {by!r}: use patient or image")
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group if by == "patient" else str(s.path) for s in samples])
    counts = np.bincount(labels, minlength=2)
    n_groups = len(set(groups.tolist()))
    share = f"{1 / n_splits:.0%} validation split"
    if len(samples) < 2 * n_splits or counts.min() < 2:
        raise DatasetError(
            f"too few images for a {share}: {counts[0]} benign, {counts[1]} malignant "
            f"(need at least 2 of each and {2 * n_splits} in all)"
        )
    if n_groups < n_splits:
        raise DatasetError(
            f"too few patients/groups for a {share}: {n_groups} groups, need {n_splits} "
            "(check --group-pattern, or lower --val-split)"
        )
    k_fold = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [
        (np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)) for a, b in k_fold.split(labels, labels, groups)
    ]


def fold_of_patients(
    samples: Sequence[Sample], k_folds: Sequence[tuple[NDArray[np.int64], NDArray[np.int64]]]
) -> dict[str, int]:
    """Patient id -> its validation fold (1-based) in ``k_folds`` (from ``folds(samples, ...)``)."""
    return {samples[j].group: i for i, (_, val_idx) in enumerate(k_folds, start=1) for j in val_idx.tolist()}


def pinned_folds(
    samples: Sequence[Sample], fold_of: Mapping[str, int]
) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """Folds that hold out the patients ``fold_of`` assigns to each fold (1..K), whichever images they have."""
    missing = {s.group for s in samples} - set(fold_of)
    if missing:
        raise DatasetError(f"{len(missing)} patients have no fold, e.g. {sorted(missing)[0]}")
    fold = np.array([fold_of[s.group] for s in samples])
    return [
        (np.flatnonzero(fold != k).astype(np.int64), np.flatnonzero(fold == k).astype(np.int64))
        for k in sorted(set(fold_of.values()))
    ]


def check_sides(train: Sequence[Sample], val: Sequence[Sample]) -> None:
    """Both sides of a split must hold both classes."""
    for side, name in ((train, "training"), (val, "validation")):
        side_counts = np.bincount([s.label for s in side], minlength=2)
        if side_counts.min() == 0:
            raise DatasetError(
                f"the {name} split has no {CLASS_DIRS[int(side_counts.argmin())]} images: the classes are spread "
                "over too few patients for this split (add data or change --val-split)"
            )


# --- uneven patients: a cap per epoch ------------------------------------------------------------------------


def patient_codes(groups: Sequence[str]) -> NDArray[np.int64]:
    """Each image's patient as a small integer (0..patients-1)."""
    return np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1].astype(np.int64)


def patient_share(groups: Sequence[str], cap: int) -> NDArray[np.float64]:
    """Each training image's weight in an epoch of at most ``cap`` images per patient, relative to plain
    training (1.0 each): the chance that the epoch draws it, min(1, cap / n) for a patient with n images."""
    codes = patient_codes(groups)
    n = np.bincount(codes)[codes].astype(np.float64)
    return np.asarray(np.minimum(1.0, cap / n), dtype=np.float64)


def capped_size(codes: NDArray[np.int64], cap: int) -> int:
    """How many images an epoch with at most ``cap`` images per patient holds."""
    return int(np.minimum(np.bincount(codes), cap).sum())


def capped_draw(codes: NDArray[np.int64], cap: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """One epoch's image indices: at most ``cap`` of each patient's images, drawn at random, in random order."""
    order = rng.permutation(len(codes))
    by_patient = order[np.argsort(codes[order], kind="stable")]  # grouped by patient, random within each
    starts = np.flatnonzero(np.r_[True, np.diff(codes[by_patient]) != 0])
    sizes = np.diff(np.r_[starts, len(codes)])
    rank = np.arange(len(codes)) - np.repeat(starts, sizes)  # position within its patient
    return rng.permutation(by_patient[rank < cap]).astype(np.int64)


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str
    message: str


def load_images(
    samples: Sequence[Sample],
    size: int,
    *,
    workers: int = 4,
    loader: Callable[[Path, int], NDArray[np.uint8]] | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.int64], list[Sample], list[Skipped]]:
    """Decode ``samples`` with histod.imaging.load into (N, size, size, 3) uint8 and labels (N,).

    Returns the images, the labels, the samples that loaded (same order) and the ones that did not.
    """
    load = loader or (lambda p, s: imaging.load(p, s))

    def one(sample: Sample) -> NDArray[np.uint8] | Skipped:
        try:
            return load(sample.path, size)
        except ImageError as exc:
            return Skipped(sample.path, exc.reason, str(exc.args[0]))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, samples))
    kept: list[Sample] = []
    skipped: list[Skipped] = []
    images = np.zeros((len(samples), size, size, 3), dtype=np.uint8)
    n = 0
    for sample, result in zip(samples, results, strict=True):
        if isinstance(result, Skipped):
            skipped.append(result)
            continue
        images[n] = result
        kept.append(sample)
        n += 1
    labels = np.array([s.label for s in kept], dtype=np.int64)
    return images[:n], labels, kept, skipped


def counts(samples: Sequence[Sample]) -> dict[str, int]:
    c = np.bincount([s.label for s in samples], minlength=2)
    return {CLASS_DIRS[0]: int(c[0]), CLASS_DIRS[1]: int(c[1])}
