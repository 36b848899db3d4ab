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


# --- several data folders ----------------------------------------------------------------------------------------


def _idc(root: Path, patient: int, x: int, label: int) -> Path:
    """An IDC-named tile of ``patient`` at column ``x`` in ``root``'s class folder for ``label``."""
    return _png(root / data.CLASS_DIRS[label] / f"{patient}_idx5_x{50 * x}_y0_class{label}.png", 60 + 40 * label)


def _folder(root: Path, patients: range, tiles: int, first_x: int = 0) -> Path:
    """``tiles`` tiles of each patient (the first two one of each class), columns from ``first_x`` on."""
    for p in patients:
        for k in range(tiles):
            _idc(root, p, first_x + k, int(k == 1 or (k > 1 and (p + k) % 3 == 0)))
    return root


def _two_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Folder a: patients 1-12; folder b: more tiles (other columns) of patients 7-12 and new patients 13-18."""
    a = _folder(tmp_path / "data" / "a", range(1, 13), 3)
    b = _folder(tmp_path / "data" / "b", range(7, 19), 4, first_x=10)
    return a, b


def _side_of(result: data.Split) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for name, side in (("train", result.train), ("val", result.val)):
        for s in side:
            sides.setdefault(s.group, set()).add(name)
    return sides


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_two_folders_keep_each_patient_on_one_side(tmp_path: Path, seed: int) -> None:
    a, b = _two_folders(tmp_path)
    samples = data.discover_all([a, b])
    assert len(samples) == 12 * 3 + 12 * 4
    assert len({s.group for s in samples}) == 18
    result = data.split(samples, 0.25, seed)
    assert {s.path for s in result.train} | {s.path for s in result.val} == {s.path for s in samples}
    sides = _side_of(result)
    assert all(len(side) == 1 for side in sides.values())
    # patients 7-12 have tiles in both folders: one group each, so all their tiles are on one side
    assert {s.path.parents[1].name for s in samples if s.group == "7"} == {"a", "b"}
    for train_idx, val_idx in data.folds(samples, 3, seed):
        assert {samples[j].group for j in train_idx}.isdisjoint({samples[j].group for j in val_idx})


def test_a_folder_of_data_folders(tmp_path: Path) -> None:
    a, b = _two_folders(tmp_path)
    (tmp_path / "data" / "notes").mkdir()
    (tmp_path / "data" / "notes" / "readme.txt").write_text("not a data folder")
    assert data.data_folders([tmp_path / "data"]) == [a, b]
    assert data.discover_all([tmp_path / "data"]) == data.discover_all([a, b])


@pytest.mark.parametrize("given", [["data", "data/a"], ["data/a", "data/a"], ["data/b", "data/b/benign/.."]])
def test_overlapping_data_folders_are_refused(tmp_path: Path, given: list[str]) -> None:
    _two_folders(tmp_path)
    with pytest.raises(DatasetError, match="overlap: give each folder once"):
        data.discover_all([tmp_path / g for g in given])


def test_a_folder_with_neither_class_folders_nor_data_folders(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "images" / "a.png")
    with pytest.raises(DatasetError, match=r"benign/ and malignant/.*missing: benign/, malignant/"):
        data.discover_all([tmp_path / "data"])


def test_files_without_an_id_in_two_folders_stay_apart(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        for i in range(3):
            _png(tmp_path / folder / "benign" / f"b{i}.png")
            _png(tmp_path / folder / "malignant" / f"m{i}.png")
    samples = data.discover_all([tmp_path / "a", tmp_path / "b"])
    assert len({s.group for s in samples}) == 12
    assert "file:b/malignant/m2.png" in {s.group for s in samples}


# --- pinned validation patients and folds ------------------------------------------------------------------------


def test_val_patients_from_a_file_pin_the_validation_side(tmp_path: Path) -> None:
    a, b = _two_folders(tmp_path)
    listed = tmp_path / "val.txt"
    listed.write_text("# held out\n8\n\n14  # only in folder b\n3\n")
    assert data.read_patients(listed) == {"8", "14", "3"}
    samples = data.discover_all([a, b])
    result = data.split(samples, 0.2, 0, val_patients=data.read_patients(listed))
    assert {s.group for s in result.val} == {"8", "14", "3"}
    assert len(result.val) == 3 + (3 + 4) + 4  # patient 8's tiles come from both folders
    assert {s.group for s in result.train}.isdisjoint({"8", "14", "3"})


def test_val_patients_that_are_wrong(tmp_path: Path) -> None:
    a, b = _two_folders(tmp_path)
    samples = data.discover_all([a, b])
    with pytest.raises(DatasetError, match="1 validation patients have no images in the data: 99"):
        data.split(samples, 0.2, 0, val_patients={"8", "99"})
    with pytest.raises(ConfigError, match="split by patient"):
        data.split(samples, 0.2, 0, by="image", val_patients={"8"})
    (tmp_path / "empty.txt").write_text("# nobody\n")
    with pytest.raises(ConfigError, match="lists no patient ids"):
        data.read_patients(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="--val-patients"):
        data.read_patients(tmp_path / "missing.txt")


def test_folds_pinned_by_patient_survive_more_images(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a", range(1, 16), 3)
    more = _folder(tmp_path / "more", range(1, 16, 2), 12, first_x=20)  # many more tiles of some patients
    first = data.discover_all([a])
    fold_of = data.fold_of_patients(first, data.folds(first, 3, 0))
    assert sorted(set(fold_of.values())) == [1, 2, 3] and len(fold_of) == 15
    both = data.discover_all([a, more])
    for k, (train_idx, val_idx) in enumerate(data.pinned_folds(both, fold_of), start=1):
        assert {both[j].group for j in val_idx} == {p for p, f in fold_of.items() if f == k}
        assert len(train_idx) + len(val_idx) == len(both)
    with pytest.raises(DatasetError, match="1 patients have no fold"):
        data.pinned_folds(both, {p: f for p, f in fold_of.items() if p != "3"})


# --- uneven patients ---------------------------------------------------------------------------------------------


def test_capped_draw_takes_at_most_cap_images_of_each_patient_afresh() -> None:
    sizes = [1, 5, 10, 40, 200]
    codes = np.repeat(np.arange(len(sizes)), sizes)
    assert data.capped_size(codes, 10) == 1 + 5 + 10 + 10 + 10
    rng = np.random.default_rng(0)
    draws = [data.capped_draw(codes, 10, rng) for _ in range(30)]
    for draw in draws:
        assert len(draw) == len(set(draw.tolist())) == 36
        assert np.bincount(codes[draw], minlength=5).tolist() == [1, 5, 10, 10, 10]
    assert not np.array_equal(draws[0], draws[1])
    seen = set(np.concatenate(draws).tolist())
    assert len(seen & set(np.flatnonzero(codes == 4).tolist())) > 150  # the big patient's images take turns


def test_patient_share() -> None:
    groups = ["a"] * 1 + ["b"] * 4 + ["c"] * 100
    capped = data.patient_share(groups, cap=10)
    assert capped[0] == 1.0 and capped[1] == 1.0 and capped[-1] == pytest.approx(0.1)
    assert capped.sum() == pytest.approx(1 + 4 + 10)  # the images one epoch holds
    assert data.patient_share(groups, cap=100).tolist() == [1.0] * 105
