"""trainer.data: class-folder discovery, patient ids from file names, the stratified grouped split, decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histod.errors import ConfigError, DatasetError
from histod.synthetic import SyntheticSpec, make_dataset
from histod.trainer import data


def _png(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path, format="PNG")
    return path


# --- patient ids -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("SOB_B_A-14-22549AB-40-001.png", "14-22549AB"),
        ("SOB_M_DC-14-2523-400-012.png", "14-2523"),
        ("sob_m_lc-14-15570C-100-004.PNG", "14-15570C"),
        ("10253_idx5_x1001_y751_class0.png", "10253"),
        ("9036_idx5_x51_y1051_class1.png", "9036"),
        ("slide_001.png", None),
        ("SOB_B_A.png", None),
    ],
)
def test_builtin_patient_ids(name: str, group: str | None) -> None:
    assert data.group_of(name) == group


def test_custom_pattern_replaces_the_builtins() -> None:
    pattern = r"^case(?P<group>\d+)_"
    assert data.group_of("case17_tile3.png", pattern) == "17"
    assert data.group_of("10253_idx5_x1001_y751_class0.png", pattern) is None


@pytest.mark.parametrize("pattern", [r"^(\d+)_", r"^(?P<group>[", r"(?P<patient>\d+)"])
def test_bad_group_pattern_is_a_config_error(pattern: str) -> None:
    with pytest.raises(ConfigError, match="group-pattern"):
        data.compile_pattern(pattern)


# --- discovery ---------------------------------------------------------------------------------------------------


def test_discover_any_letter_case_and_extension(tmp_path: Path) -> None:
    _png(tmp_path / "Benign" / "a.PNG")
    _png(tmp_path / "Benign" / "sub" / "b.Tif")
    _png(tmp_path / "MALIGNANT" / "c.jpeg")
    _png(tmp_path / "MALIGNANT" / "d.BMP")
    (tmp_path / "MALIGNANT" / "notes.txt").write_text("not an image")
    (tmp_path / "MALIGNANT" / ".hidden.png").write_bytes(b"")
    samples = data.discover(tmp_path)
    found = {(s.path.name, s.label) for s in samples}
    assert found == {("a.PNG", 0), ("b.Tif", 0), ("c.jpeg", 1), ("d.BMP", 1)}
    # no patient id in these names: every file is its own group
    assert len({s.group for s in samples}) == 4


def test_discover_without_class_folders(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "a.png")
    with pytest.raises(DatasetError, match=r"benign/ and malignant/.*missing: benign/, malignant/"):
        data.discover(tmp_path)


def test_discover_with_one_class_folder_missing(tmp_path: Path) -> None:
    _png(tmp_path / "benign" / "a.png")
    with pytest.raises(DatasetError, match="missing: malignant/"):
        data.discover(tmp_path)


def test_discover_with_an_empty_class(tmp_path: Path) -> None:
    _png(tmp_path / "benign" / "a.png")
    (tmp_path / "malignant").mkdir()
    (tmp_path / "malignant" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"malignant has no images"):
        data.discover(tmp_path)


def test_discover_of_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a folder"):
        data.discover(tmp_path / "nope")


# --- the split ---------------------------------------------------------------------------------------------------


def _samples(n_patients: int, per_patient: int, seed: int = 0) -> list[data.Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        for k in range(per_patient):
            label = int(k == 0) if k < 2 else int(rng.random() < 0.3)
            out.append(data.Sample(Path(f"{p}_{k}.png"), label, f"patient{p}"))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_is_grouped_and_stratified(seed: int) -> None:
    samples = _samples(30, 7, seed)
    result = data.split(samples, 0.2, seed)
    train_groups = {s.group for s in result.train}
    val_groups = {s.group for s in result.val}
    assert train_groups.isdisjoint(val_groups)
    assert len(result.train) + len(result.val) == len(samples)
    assert {s.path for s in result.train} | {s.path for s in result.val} == {s.path for s in samples}
    # about a fifth held out, both classes on both sides, class shares close to the whole set's
    assert 0.1 < len(result.val) / len(samples) < 0.3
    share = np.mean([s.label for s in samples])
    for side in (result.train, result.val):
        side_share = np.mean([s.label for s in side])
        assert 0 < side_share < 1
        assert abs(side_share - share) < 0.15


def test_split_is_reproducible_and_seeded() -> None:
    samples = _samples(30, 5)
    a = data.split(samples, 0.2, 11)
    b = data.split(samples, 0.2, 11)
    assert [s.path for s in a.val] == [s.path for s in b.val]
    others = {tuple(sorted(str(s.path) for s in data.split(samples, 0.2, seed).val)) for seed in range(5)}
    assert len(others) > 1


def test_split_keeps_breakhis_and_idc_patients_apart(tmp_path: Path) -> None:
    names = []
    for p in range(8):
        for k in range(4):
            cls = "B" if k % 2 == 0 else "M"
            names.append((f"SOB_{cls}_A-14-{1000 + p}AB-40-{k:03d}.png", k % 2))
            names.append((f"{20000 + p}_idx5_x{k}_y{p}_class{k % 2}.png", k % 2))
    for name, label in names:
        _png(tmp_path / data.CLASS_DIRS[label] / name)
    samples = data.discover(tmp_path)
    assert len({s.group for s in samples}) == 16
    result = data.split(samples, 0.25, 0)
    assert {s.group for s in result.train}.isdisjoint({s.group for s in result.val})


def test_files_without_an_id_are_their_own_group(tmp_path: Path) -> None:
    for i in range(10):
        _png(tmp_path / "benign" / f"b{i}.png")
        _png(tmp_path / "malignant" / f"m{i}.png")
    samples = data.discover(tmp_path)
    assert len({s.group for s in samples}) == 20
    result = data.split(samples, 0.2, 0)
    assert len(result.val) == 4


def test_too_few_images_for_the_split() -> None:
    samples = [data.Sample(Path(f"{i}.png"), i % 2, str(i)) for i in range(5)]
    with pytest.raises(DatasetError, match="too few images"):
        data.split(samples, 0.2, 0)


def test_too_few_groups_for_the_split() -> None:
    samples = [data.Sample(Path(f"{i}.png"), i % 2, f"g{i % 3}") for i in range(30)]
    with pytest.raises(DatasetError, match="too few patients/groups"):
        data.split(samples, 0.2, 0)


# --- decoding ----------------------------------------------------------------------------------------------------


def test_load_images_decodes_and_lists_unreadable_files(tmp_path: Path) -> None:
    make_dataset(tmp_path, SyntheticSpec(patients=2, tiles_per_patient=3, size=40))
    (tmp_path / "benign" / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "malignant" / "empty.jpg").write_bytes(b"")
    samples = data.discover(tmp_path)
    images, labels, kept, skipped = data.load_images(samples, 32)
    assert images.shape == (6, 32, 32, 3)
    assert images.dtype == np.uint8
    assert labels.tolist() == [s.label for s in kept]
    assert len(kept) + len(skipped) == len(samples)
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons == {"broken.png": "not_an_image", "empty.jpg": "empty"}
    assert all(s.message for s in skipped)
    assert images.std() > 0
