"""histod.readers and histod.slides: fields (histod.imaging, in memory) and pyramidal TIFFs (OpenSlide) read at the
model's scale, tiled, streamed block by block and classified; files judged by content; the slides extra absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from structlog.testing import capture_logs

from histod import imaging, readers, slides, synthetic, tiling
from histod.errors import ImageError
from histod.runs import load_run
from tests.tiles_support import GLASS, SIDE, field_png, mosaic, needs_openslide, nuclei, pyramid

SCALE = tiling.Scale(image_size=48, threshold=0.5, tile_px=SIDE)


# --- fields -------------------------------------------------------------------------------------------------------


def test_a_field_is_cut_at_the_training_scale_and_every_tissue_tile_found(tmp_path: Path) -> None:
    path, truth = field_png(tmp_path)
    with readers.open_reader(path) as reader:
        assert isinstance(reader, readers.ImageReader)
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
    from histod.daemon.classifier import load_classifier

    classifier = load_classifier(tiny_run_dir)
    path, _ = field_png(tmp_path, rows=3, cols=4)
    with readers.open_reader(path) as reader:
        result = slides.classify(reader, classifier.predict, tiling.Scale.of(load_run(tiny_run_dir)))
    assert isinstance(result, tiling.TiledResult)
    image = np.asarray(Image.open(path))
    files = []
    for i, (x, y) in enumerate(zip(result.x, result.y, strict=True)):
        files.append(tmp_path / f"tile{i}.png")
        Image.fromarray(image[y : y + SIDE, x : x + SIDE]).save(files[-1])
    alone = classifier.predict(np.stack([imaging.load(f, classifier.image_size) for f in files]))
    np.testing.assert_allclose(result.p, alone, atol=1e-6)


def test_an_image_of_about_a_tile_takes_the_whole_image_path_unchanged(tmp_path: Path) -> None:
    for size in (SIDE, 90, 50):
        tile = synthetic.tile(True, size, np.random.default_rng(size))
        path = tmp_path / f"t{size}.png"
        Image.fromarray(tile).save(path)
        with readers.open_reader(path) as reader:
            result = slides.classify(reader, nuclei, SCALE)
        assert isinstance(result, slides.Whole)
        assert np.array_equal(result.image, imaging.load(path, SCALE.image_size))
        assert result.warnings == ()


def test_a_scale_mismatch_is_never_silent(tmp_path: Path) -> None:
    path, _ = field_png(tmp_path, rows=4, cols=4)
    unknown = tiling.Scale(image_size=48, threshold=0.5, tile_px=None)
    with readers.open_reader(path) as reader:
        result = slides.classify(reader, nuclei, unknown)
    assert isinstance(result, slides.Whole)
    assert result.image.shape == (48, 48, 3)
    assert [w.split(":")[0] for w in result.warnings] == ["scale_unknown"]

    tiny = tmp_path / "tiny.png"
    Image.fromarray(synthetic.tile(False, 20, np.random.default_rng(0))).save(tiny)
    with readers.open_reader(tiny) as reader:
        result = slides.classify(reader, nuclei, SCALE)
    assert isinstance(result, slides.Whole)
    assert [w.split(":")[0] for w in result.warnings] == ["smaller_than_tile"]

    declared = tiling.Scale(image_size=48, threshold=0.5, tile_px=SIDE, tile_mpp=0.5)
    with readers.open_reader(path) as reader:
        tiled = slides.classify(reader, nuclei, declared)
    assert isinstance(tiled, tiling.TiledResult)
    assert [w.split(":")[0] for w in tiled.warnings] == ["mpp_unknown_image"]


def test_an_image_without_tissue_is_refused_with_a_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "glass.png"
    Image.fromarray(np.clip(GLASS + rng.normal(0, 3, (400, 600, 3)), 0, 255).astype(np.uint8)).save(path)
    with readers.open_reader(path) as reader, pytest.raises(ImageError) as info:
        slides.classify(reader, nuclei, SCALE)
    assert info.value.reason == "no_tissue"


def test_a_field_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    path, _ = field_png(tmp_path, rows=2, cols=2)
    with pytest.raises(ImageError) as info:
        readers.open_reader(path, max_pixels=100)
    assert info.value.reason == "too_many_pixels"


def test_stop_between_batches_returns_nothing_and_progress_counts_up(tmp_path: Path) -> None:
    path, truth = field_png(tmp_path)
    seen: list[tuple[int, int]] = []
    with readers.open_reader(path) as reader:
        slides.classify(reader, nuclei, SCALE, batch_size=5, progress=lambda d, t: seen.append((d, t)))
        assert seen[-1] == (len(truth), len(truth))
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        with pytest.raises(slides.StoppedError):
            slides.classify(reader, nuclei, SCALE, batch_size=5, stop=lambda: True)


def test_progress_of_a_tiled_image_goes_to_the_log_as_tiles_done_of_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slides, "PROGRESS_EVERY_S", 0.0)  # every batch, rather than every 10 s
    path, truth = field_png(tmp_path)
    with readers.open_reader(path) as reader, capture_logs() as logs:
        slides.classify(reader, nuclei, SCALE, batch_size=5)
    progress = [(e["done"], e["total"]) for e in logs if e["event"] == "tiles.progress"]
    assert progress == [(min(d, len(truth)), len(truth)) for d in range(5, len(truth) + 5, 5)]
    assert {e["name"] for e in logs if e["event"] == "tiles.progress"} == {str(path)}


# --- slides -------------------------------------------------------------------------------------------------------


@needs_openslide
def test_a_pyramidal_tiff_is_read_through_openslide_at_the_level_of_the_models_microns(tmp_path: Path) -> None:
    image, _ = mosaic(6, 8, seed=1, side=2 * SIDE)  # scanned at twice the model's magnification
    levels = pyramid(tmp_path / "slide.tif", image, mpp=0.25)
    model = tiling.Scale(image_size=48, threshold=0.5, tile_px=SIDE, tile_mpp=0.5)
    with readers.open_reader(tmp_path / "slide.tif") as reader:
        assert isinstance(reader, readers.SlideReader)
        assert reader.mpp == pytest.approx(0.25)
        assert reader.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        result = slides.classify(reader, nuclei, model)
    assert isinstance(result, tiling.TiledResult)
    assert result.level == 1 and result.tile_side == 2 * SIDE and result.warnings == ()
    assert set(result.x.tolist()) <= set(range(0, image.shape[1], 2 * SIDE))
    # the same tiles, cut from level 1 held in memory, get the same p's
    Image.fromarray(levels[1]).save(tmp_path / "level1.png")
    with readers.open_reader(tmp_path / "level1.png") as reader:
        flat = slides.classify(reader, nuclei, tiling.Scale(48, 0.5, SIDE))
    assert isinstance(flat, tiling.TiledResult)
    np.testing.assert_array_equal(flat.x * 2, result.x)
    np.testing.assert_array_equal(flat.p, result.p)
    assert result.malignant_area_mm2 == pytest.approx(result.aggregate.malignant_area_px * 0.25**2 / 1e6)


@needs_openslide
def test_a_slide_whose_model_has_no_microns_is_tiled_at_its_base_level_with_a_warning(tmp_path: Path) -> None:
    image, truth = mosaic(4, 6, seed=2)
    pyramid(tmp_path / "slide.tif", image, mpp=0.5, levels=2)
    with readers.open_reader(tmp_path / "slide.tif") as reader:
        result = slides.classify(reader, nuclei, SCALE)
    assert isinstance(result, tiling.TiledResult)
    assert result.level == 0
    assert {(int(x), int(y)) for x, y in zip(result.x, result.y, strict=True)} == set(truth)
    assert [w.split(":")[0] for w in result.warnings] == ["mpp_unknown_model"]


@needs_openslide
def test_a_slide_coarser_than_the_model_is_tiled_with_enlarged_tiles_and_a_warning(tmp_path: Path) -> None:
    image, truth = mosaic(4, 6, seed=4)  # scanned at half the model's magnification: a tile is SIDE / 2 px
    pyramid(tmp_path / "slide.tif", image, mpp=1.0, levels=2)
    model = tiling.Scale(image_size=48, threshold=0.5, tile_px=2 * SIDE, tile_mpp=0.5)
    with readers.open_reader(tmp_path / "slide.tif") as reader, capture_logs() as logs:
        result = slides.classify(reader, nuclei, model)
    assert isinstance(result, tiling.TiledResult)
    assert result.level == 0 and result.tile_side == SIDE
    assert {(int(x), int(y)) for x, y in zip(result.x, result.y, strict=True)} == set(truth)
    assert [w.split(":")[0] for w in result.warnings] == ["coarser_than_model"]
    assert [e["warning"].split(":")[0] for e in logs if e["event"] == "tiles.scale"] == ["coarser_than_model"]


class _Counting(readers.SlideReader):
    """A SlideReader that notes the size of every region it reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[tuple[int, int, int]] = []

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        self.reads.append((level, width, height))
        return super().read(level, x, y, width, height)


@needs_openslide
def test_a_slide_is_streamed_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slides, "BLOCK_PX", 4 * SIDE)  # the tiles' blocks
    monkeypatch.setattr(readers, "BLOCK_PX", 4 * SIDE)  # the thumbnail's strips
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


@needs_openslide
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
        readers.open_reader(tmp_path / name)
    assert info.value.reason in reasons


@needs_openslide
def test_a_truncated_pyramid_fails_with_a_reason_not_a_crash(tmp_path: Path) -> None:
    image, _ = mosaic(6, 8, seed=4)
    pyramid(tmp_path / "whole.tif", image, mpp=0.5)
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError), readers.open_reader(tmp_path / "cut.tif") as reader:
        slides.classify(reader, nuclei, SCALE)


@needs_openslide
def test_missing_and_linked_slides_follow_the_imaging_rules(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        readers.open_reader(tmp_path / "gone.svs")
    assert info.value.reason == "missing"
    image, _ = mosaic(2, 2)
    pyramid(tmp_path / "real.tif", image, mpp=0.5, levels=1)
    (tmp_path / "link.tif").symlink_to(tmp_path / "real.tif")
    with pytest.raises(ImageError) as info:
        readers.open_reader(tmp_path / "link.tif", follow_symlinks=False)
    assert info.value.reason == "symlink"


def test_a_striped_tiff_is_a_field_not_a_slide(tmp_path: Path) -> None:
    image, _ = mosaic(2, 3)
    Image.fromarray(image).save(tmp_path / "plain.tif")
    with readers.open_reader(tmp_path / "plain.tif") as reader:
        assert isinstance(reader, readers.ImageReader)
        assert reader.dimensions == (3 * SIDE, 2 * SIDE)


@needs_openslide
def test_thumbnail_of_a_slide_reads_strips_of_a_level(tmp_path: Path) -> None:
    image, _ = mosaic(4, 6, seed=5)
    pyramid(tmp_path / "slide.tif", image, mpp=0.5)
    with readers.open_reader(tmp_path / "slide.tif") as reader:
        thumb = reader.thumbnail(96, 64)
    assert thumb.shape == (64, 96, 3)
    expected = np.asarray(Image.fromarray(image).resize((96, 64), Image.Resampling.BOX)).astype(int)
    assert np.abs(thumb.astype(int) - expected).mean() < 8


# --- judged by content; the slides extra absent ---------------------------------------------------------------


@needs_openslide
def test_a_pyramidal_tiff_under_an_image_name_is_read_as_a_slide(tmp_path: Path) -> None:
    image, truth = mosaic(4, 6, seed=7)
    pyramid(tmp_path / "scan.png", image, mpp=None, levels=2)
    with readers.open_reader(tmp_path / "scan.png") as reader:
        assert isinstance(reader, readers.SlideReader)
        result = slides.classify(reader, nuclei, SCALE)
    assert isinstance(result, tiling.TiledResult) and result.aggregate.n_tissue == len(truth)


def test_image_files_are_read_by_content_whatever_their_name(tmp_path: Path) -> None:
    path, _ = field_png(tmp_path, rows=3, cols=4)
    (tmp_path / "field.tif").write_bytes(path.read_bytes())  # a PNG named .tif: not for OpenSlide
    results = []
    for name in ("field.png", "field.tif"):
        with readers.open_reader(tmp_path / name) as reader:
            assert isinstance(reader, readers.ImageReader)
            results.append(slides.classify(reader, nuclei, SCALE))
    a, b = results
    assert isinstance(a, tiling.TiledResult) and isinstance(b, tiling.TiledResult)
    np.testing.assert_array_equal(a.p, b.p)
    Image.fromarray(np.asarray(Image.open(path))).save(tmp_path / "field.gif")
    (tmp_path / "gif.png").write_bytes((tmp_path / "field.gif").read_bytes())
    with pytest.raises(ImageError) as info:
        readers.open_reader(tmp_path / "gif.png")
    assert info.value.reason == "unsupported_format"


def test_without_the_slides_extra_a_slide_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "_openslide", lambda: None)  # as if openslide-python were not installed
    (tmp_path / "scan.svs").write_bytes(b"II*\x00" + bytes(8))
    with pytest.raises(ImageError) as info:
        readers.open_reader(tmp_path / "scan.svs")
    assert info.value.reason == "unsupported" and "pip install 'histod[slides]'" in str(info.value)
    image, _ = mosaic(4, 6, seed=8)
    Image.fromarray(image).save(tmp_path / "big.tif", compression="tiff_deflate")
    with pytest.raises(ImageError) as info:
        readers.open_reader(tmp_path / "big.tif", max_bytes=1000)
    assert info.value.reason == "too_large" and "pip install 'histod[slides]'" in str(info.value)
    with readers.open_reader(tmp_path / "big.tif") as reader:  # within the limits: an image like any other
        assert isinstance(reader, readers.ImageReader)
