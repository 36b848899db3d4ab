"""histod.slides: fields (PIL, in memory) and pyramidal TIFFs (OpenSlide) read at the model's scale, tiled,
streamed block by block, classified, and `histod predict` on them. Mosaics and slides are built here from
synthetic tiles laid on glass at known positions, so every tile's place and class is known."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from histod import imaging, slides, synthetic, tiling
from histod.cli import cli
from histod.errors import ImageError
from histod.runs import load_run

SIDE = 64  # the synthetic training tiles' side: tiny_run_dir records tile_px = 64
GLASS = np.array([238, 236, 240])


def mosaic(rows: int, cols: int, seed: int = 0, side: int = SIDE) -> tuple[np.ndarray, dict[tuple[int, int], bool]]:
    """Synthetic tiles on glass: a tile at every grid cell but one in three; malignant in the right half.
    Returns the image and {(x, y): malignant} of the tiles laid."""
    rng = np.random.default_rng(seed)
    image = np.clip(GLASS + rng.normal(0, 3, (rows * side, cols * side, 3)), 0, 255).astype(np.uint8)
    truth: dict[tuple[int, int], bool] = {}
    for r in range(rows):
        for c in range(cols):
            if (r + c) % 3 == 0:
                continue
            malignant = c >= cols // 2
            image[r * side : (r + 1) * side, c * side : (c + 1) * side] = synthetic.tile(malignant, side, rng)
            truth[(c * side, r * side)] = malignant
    return image, truth


def nuclei(batch: np.ndarray) -> np.ndarray:
    """A transparent predictor for checking where p's land: the share of dark (nucleus) pixels, scaled to 0..1.
    Synthetic malignant tiles are crowded with dark nuclei, benign ones have a few."""
    dark = (batch.astype(np.int32).sum(axis=-1) < 350).mean(axis=(1, 2))
    return np.asarray(np.clip(dark * 4, 0, 1), dtype=np.float32)


def pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 128) -> list[np.ndarray]:
    """A generic tiled pyramidal TIFF (one directory per level, each half the last) that OpenSlide reads."""
    written = []
    with tifffile.TiffWriter(path) as tiff:
        level = image
        for i in range(levels):
            per_cm = None if mpp is None else 1e4 / (mpp * 2**i)
            tiff.write(
                level,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=None if per_cm is None else (per_cm, per_cm),
                resolutionunit=None if per_cm is None else "CENTIMETER",
            )
            written.append(level)
            level = np.asarray(Image.fromarray(level).reduce(2))
    return written


def field_png(
    tmp_path: Path, rows: int = 6, cols: int = 8, name: str = "field.png"
) -> tuple[Path, dict[tuple[int, int], bool]]:
    image, truth = mosaic(rows, cols)
    path = tmp_path / name
    Image.fromarray(image).save(path)
    return path, truth


Inputs = tuple[Path, dict[tuple[int, int], bool], Path, Path]
SCALE = tiling.Scale(image_size=48, threshold=0.5, tile_px=SIDE)


# --- fields -------------------------------------------------------------------------------------------------------


def test_a_field_is_cut_at_the_training_scale_and_every_tissue_tile_found(tmp_path: Path) -> None:
    path, truth = field_png(tmp_path)
    with slides.open_reader(path) as reader:
        assert isinstance(reader, slides.ImageReader)
        result = slides.classify(reader, nuclei, SCALE, batch_size=7)
    assert isinstance(result, tiling.TiledResult)
    found = {(int(x), int(y)): float(p) for x, y, p in zip(result.x, result.y, result.p, strict=True)}
    assert set(found) == set(truth)  # no glass tile taken for tissue, no tissue tile lost
    assert all((found[k] >= 0.5) == malignant for k, malignant in truth.items())
    assert result.n_tiles == 48 and result.aggregate.n_tissue == len(truth)
    assert result.aggregate.n_malignant == sum(truth.values())
    assert result.tile_side == SIDE and result.level == 0 and result.backend == "image"
    assert result.warnings == ()
    assert max(result.thumbnail.shape[:2]) <= slides.THUMBNAIL_PX


def test_tile_p_equals_the_p_of_the_same_tile_as_its_own_file(tiny_run_dir: Path, tmp_path: Path) -> None:
    from histod.daemon.engine import load_engine

    engine = load_engine(tiny_run_dir)
    path, _ = field_png(tmp_path, rows=3, cols=4)
    with slides.open_reader(path) as reader:
        result = slides.classify(reader, engine.predict, tiling.Scale.of(load_run(tiny_run_dir)))
    assert isinstance(result, tiling.TiledResult)
    image = np.asarray(Image.open(path))
    files = []
    for i, (x, y) in enumerate(zip(result.x, result.y, strict=True)):
        files.append(tmp_path / f"tile{i}.png")
        Image.fromarray(image[y : y + SIDE, x : x + SIDE]).save(files[-1])
    alone = engine.predict(np.stack([imaging.load(f, engine.image_size) for f in files]))
    np.testing.assert_allclose(result.p, alone, atol=1e-6)


def test_an_image_of_about_a_tile_takes_the_whole_image_path_unchanged(tmp_path: Path) -> None:
    for size in (SIDE, 90, 50):
        tile = synthetic.tile(True, size, np.random.default_rng(size))
        path = tmp_path / f"t{size}.png"
        Image.fromarray(tile).save(path)
        with slides.open_reader(path) as reader:
            result = slides.classify(reader, nuclei, SCALE)
        assert isinstance(result, slides.Whole)
        assert np.array_equal(result.image, imaging.load(path, SCALE.image_size))
        assert result.warnings == ()


def test_a_scale_mismatch_is_never_silent(tmp_path: Path) -> None:
    path, _ = field_png(tmp_path, rows=4, cols=4)
    unknown = tiling.Scale(image_size=48, threshold=0.5, tile_px=None)
    with slides.open_reader(path) as reader:
        result = slides.classify(reader, nuclei, unknown)
    assert isinstance(result, slides.Whole)
    assert result.image.shape == (48, 48, 3)
    assert [w.split(":")[0] for w in result.warnings] == ["scale_unknown"]

    tiny = tmp_path / "tiny.png"
    Image.fromarray(synthetic.tile(False, 20, np.random.default_rng(0))).save(tiny)
    with slides.open_reader(tiny) as reader:
        result = slides.classify(reader, nuclei, SCALE)
    assert isinstance(result, slides.Whole)
    assert [w.split(":")[0] for w in result.warnings] == ["smaller_than_tile"]

    declared = tiling.Scale(image_size=48, threshold=0.5, tile_px=SIDE, tile_mpp=0.5)
    with slides.open_reader(path) as reader:
        tiled = slides.classify(reader, nuclei, declared)
    assert isinstance(tiled, tiling.TiledResult)
    assert [w.split(":")[0] for w in tiled.warnings] == ["mpp_unknown_image"]


def test_an_image_without_tissue_is_refused_with_a_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "glass.png"
    Image.fromarray(np.clip(GLASS + rng.normal(0, 3, (400, 600, 3)), 0, 255).astype(np.uint8)).save(path)
    with slides.open_reader(path) as reader, pytest.raises(ImageError) as info:
        slides.classify(reader, nuclei, SCALE)
    assert info.value.reason == "no_tissue"


def test_a_field_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    path, _ = field_png(tmp_path, rows=2, cols=2)
    with pytest.raises(ImageError) as info:
        slides.open_reader(path, max_pixels=100)
    assert info.value.reason == "too_many_pixels"


def test_stop_between_batches_returns_nothing_and_progress_counts_up(tmp_path: Path) -> None:
    path, truth = field_png(tmp_path)
    seen: list[tuple[int, int]] = []
    with slides.open_reader(path) as reader:
        slides.classify(reader, nuclei, SCALE, batch_size=5, progress=lambda d, t: seen.append((d, t)))
        assert seen[-1] == (len(truth), len(truth))
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        with pytest.raises(slides.StoppedError):
            slides.classify(reader, nuclei, SCALE, batch_size=5, stop=lambda: True)


# --- slides -------------------------------------------------------------------------------------------------------


def test_a_pyramidal_tiff_is_read_through_openslide_at_the_level_of_the_models_microns(tmp_path: Path) -> None:
    image, _ = mosaic(6, 8, seed=1, side=2 * SIDE)  # scanned at twice the model's magnification
    levels = pyramid(tmp_path / "slide.tif", image, mpp=0.25)
    model = tiling.Scale(image_size=48, threshold=0.5, tile_px=SIDE, tile_mpp=0.5)
    with slides.open_reader(tmp_path / "slide.tif") as reader:
        assert isinstance(reader, slides.SlideReader)
        assert reader.mpp == pytest.approx(0.25)
        assert reader.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        result = slides.classify(reader, nuclei, model)
    assert isinstance(result, tiling.TiledResult)
    assert result.level == 1 and result.tile_side == 2 * SIDE and result.warnings == ()
    assert set(result.x.tolist()) <= set(range(0, image.shape[1], 2 * SIDE))
    # the same tiles, cut from level 1 held in memory, get the same p's
    Image.fromarray(levels[1]).save(tmp_path / "level1.png")
    with slides.open_reader(tmp_path / "level1.png") as reader:
        flat = slides.classify(reader, nuclei, tiling.Scale(48, 0.5, SIDE))
    assert isinstance(flat, tiling.TiledResult)
    np.testing.assert_array_equal(flat.x * 2, result.x)
    np.testing.assert_array_equal(flat.p, result.p)
    assert result.malignant_area_mm2 == pytest.approx(result.aggregate.malignant_area_px * 0.25**2 / 1e6)


def test_a_slide_whose_model_has_no_microns_is_tiled_at_its_base_level_with_a_warning(tmp_path: Path) -> None:
    image, truth = mosaic(4, 6, seed=2)
    pyramid(tmp_path / "slide.tif", image, mpp=0.5, levels=2)
    with slides.open_reader(tmp_path / "slide.tif") as reader:
        result = slides.classify(reader, nuclei, SCALE)
    assert isinstance(result, tiling.TiledResult)
    assert result.level == 0
    assert {(int(x), int(y)) for x, y in zip(result.x, result.y, strict=True)} == set(truth)
    assert [w.split(":")[0] for w in result.warnings] == ["mpp_unknown_model"]


class _Counting(slides.SlideReader):
    """A SlideReader that notes the size of every region it reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[tuple[int, int, int]] = []

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        self.reads.append((level, width, height))
        return super().read(level, x, y, width, height)


def test_a_slide_is_streamed_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slides, "BLOCK_PX", 4 * SIDE)
    image, truth = mosaic(10, 12, seed=3)
    pyramid(tmp_path / "slide.tif", image, mpp=None, levels=1)
    reader = _Counting(tmp_path / "slide.tif")
    with reader:
        result = slides.classify(reader, nuclei, SCALE)
    assert isinstance(result, tiling.TiledResult)
    assert result.aggregate.n_tissue == len(truth)
    assert max(w * h for _, w, h in reader.reads) <= (4 * SIDE) ** 2  # never the whole level at once
    # one read of the tiles' blocks and one for the thumbnails (the slide has no smaller level to read them from)
    assert sum(w * h for _, w, h in reader.reads) <= 2 * image.shape[0] * image.shape[1]


@pytest.mark.parametrize(
    ("name", "content", "reasons"),
    [
        ("empty.svs", b"", {"empty"}),
        ("noise.svs", b"II*\x00" + bytes(range(256)) * 8, {"not_an_image", "corrupt"}),
        ("text.ndpi", b"hello, not a slide\n" * 50, {"not_an_image", "corrupt"}),
    ],
)
def test_a_slide_that_cannot_be_read_raises_image_error(
    tmp_path: Path, name: str, content: bytes, reasons: set[str]
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as info:
        slides.open_reader(tmp_path / name)
    assert info.value.reason in reasons


def test_a_truncated_pyramid_fails_with_a_reason_not_a_crash(tmp_path: Path) -> None:
    image, _ = mosaic(6, 8, seed=4)
    pyramid(tmp_path / "whole.tif", image, mpp=0.5)
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError), slides.open_reader(tmp_path / "cut.tif") as reader:
        slides.classify(reader, nuclei, SCALE)


def test_missing_and_linked_slides_follow_the_imaging_rules(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        slides.open_reader(tmp_path / "gone.svs")
    assert info.value.reason == "missing"
    image, _ = mosaic(2, 2)
    pyramid(tmp_path / "real.tif", image, mpp=0.5, levels=1)
    (tmp_path / "link.tif").symlink_to(tmp_path / "real.tif")
    with pytest.raises(ImageError) as info:
        slides.open_reader(tmp_path / "link.tif", follow_symlinks=False)
    assert info.value.reason == "symlink"


def test_a_striped_tiff_is_a_field_not_a_slide(tmp_path: Path) -> None:
    image, _ = mosaic(2, 3)
    Image.fromarray(image).save(tmp_path / "plain.tif")
    with slides.open_reader(tmp_path / "plain.tif") as reader:
        assert isinstance(reader, slides.ImageReader)
        assert reader.dimensions == (3 * SIDE, 2 * SIDE)


def test_thumbnail_of_a_slide_reads_strips_of_a_level(tmp_path: Path) -> None:
    image, _ = mosaic(4, 6, seed=5)
    pyramid(tmp_path / "slide.tif", image, mpp=0.5)
    with slides.open_reader(tmp_path / "slide.tif") as reader:
        thumb = reader.thumbnail(96, 64)
    assert thumb.shape == (64, 96, 3)
    expected = np.asarray(Image.fromarray(image).resize((96, 64), Image.Resampling.BOX)).astype(int)
    assert np.abs(thumb.astype(int) - expected).mean() < 8


# --- histod predict -----------------------------------------------------------------------------------------------


def _predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def inputs(tmp_path: Path) -> Iterator[Inputs]:
    field, truth = field_png(tmp_path, rows=5, cols=6)
    tile = tmp_path / "tile.png"
    Image.fromarray(synthetic.tile(True, SIDE, np.random.default_rng(9))).save(tile)
    image, _ = mosaic(4, 6, seed=6)
    pyramid(tmp_path / "slide.tif", image, mpp=0.5)
    yield field, truth, tile, tmp_path / "slide.tif"


def test_predict_prints_one_summary_line_per_tiled_image(tiny_run_dir: Path, tmp_path: Path, inputs: Inputs) -> None:
    field, truth, tile, _ = inputs
    code, out, err = _predict("--model", str(tiny_run_dir), "--heatmap", str(tmp_path / "maps"), str(field), str(tile))
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{field} => ")
    assert f": {len(truth)} tissue tiles of 30, " in lines[0]
    assert f"rule {tiling.DEFAULT_RULE.name}: " in lines[0]
    assert f"heat-map {tmp_path / 'maps' / 'field.png.heatmap.png'}" in lines[0]
    assert lines[1].startswith(f"{tile} => ") and "(p_malignant=" in lines[1]
    with Image.open(tmp_path / "maps" / "field.png.heatmap.png") as png:
        assert png.format == "PNG"
    assert [p.name for p in (tmp_path / "maps").iterdir()] == ["field.png.heatmap.png"]


def test_predict_json_gives_every_tile_and_the_warnings(tiny_run_dir: Path, inputs: Inputs) -> None:
    field, truth, tile, slide = inputs
    code, out, err = _predict("--model", str(tiny_run_dir), "--json", str(field), str(slide), str(tile))
    assert code == 0, out + err
    records = [json.loads(line) for line in out.strip().splitlines()]
    by_name = {Path(r["path"]).name: r for r in records}
    tiled = by_name["field.png"]
    assert {(t["x"], t["y"]) for t in tiled["tiles"]} == set(truth)
    assert tiled["tissue_tiles"] == len(tiled["tiles"]) == len(truth)
    assert tiled["rule"] == tiling.DEFAULT_RULE.name and tiled["label"] in ("Benign", "Malignant")
    assert all(0 <= t["p"] <= 1 for t in tiled["tiles"])
    assert by_name["slide.tif"]["backend"] == "openslide"
    assert by_name["slide.tif"]["warnings"][0].startswith("mpp_unknown_model")
    assert set(by_name["tile.png"]) == {"path", "label", "p_malignant"}


def test_predict_warns_on_stderr_when_the_scale_does_not_fit(tiny_run_dir: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    Image.fromarray(synthetic.tile(False, 16, np.random.default_rng(0))).save(small)
    code, out, err = _predict("--model", str(tiny_run_dir), str(small))
    assert code == 0
    assert out.startswith(f"{small} => ")
    assert f"warning: {small}: smaller_than_tile" in err


def test_predict_takes_the_slides_in_a_folder(tiny_run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic.tile(True, SIDE, np.random.default_rng(1))).save(folder / "tile.png")
    (folder / "scan.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # a slide name, not a readable slide
    code, out, _ = _predict("--model", str(tiny_run_dir), str(folder))
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{folder / 'scan.svs'} => error (")
    assert lines[1].startswith(f"{folder / 'tile.png'} => ")
    assert code == 1
