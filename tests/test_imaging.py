"""The hostile corpus against histod.imaging: every file is generated here (no binary fixtures), and each gets
its exact outcome: a stable ImageError reason, or a correct RGB array."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from histod.errors import ImageError
from histod.imaging import DEFAULT_MAX_PIXELS, decode, load, longest_side, read_file

pytestmark = pytest.mark.timeout(20)  # a FIFO that blocks would hang here: fail instead

SIZE = 32
WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


# --- makers -----------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise(size: int = 96, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, colour)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, depth: int, colour_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb_png(side: int = 30_000) -> bytes:
    """A valid 1-bit side x side PNG of zeros (~110 KB, ~900 megapixels) without compressing 112 MB: after a
    full flush a deflate block of N zero rows is self-contained, so the same bytes repeat."""
    row = 1 + (side + 7) // 8  # filter byte + packed bits
    rows_per_block = 1000
    assert side % rows_per_block == 0
    chunk = bytes(row * rows_per_block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(side // rows_per_block):
        adler = zlib.adler32(chunk, adler)
    stream = b"\x78\xda" + block * (side // rows_per_block) + deflate.flush() + struct.pack(">I", adler)
    return png(side, side, 1, 0, stream)


def png16_rgb(pixels: NDArray[np.uint16]) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot save one)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return png(width, height, 16, 2, zlib.compress(raw))


TEXT_PBM = b"P1\n4 4\n0 1 0 1\n1 0 1 0\n0 1 0 1\n1 0 1 0\n"
"""a plain-text netpbm bitmap: an image format, but not one histod reads"""
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
"""Encapsulated PostScript: Pillow would hand it to Ghostscript to draw"""


def float_tiff(values: NDArray[np.float32]) -> bytes:
    """A 32-bit float grayscale TIFF (mode F) holding exactly ``values``."""
    img = Image.fromarray(values.astype(np.float32))
    assert img.mode == "F"
    return encode(img, "TIFF")


def nan_tiff(side: int = 8) -> bytes:
    return float_tiff(np.full((side, side), np.nan, dtype=np.float32))


def corner_marked(width: int, height: int) -> Image.Image:
    """White, with a red block in the top-left corner."""
    img = solid(WHITE, (width, height))
    img.paste(RED, (0, 0, width // 4, height // 4))
    return img


def assert_colour(array: NDArray[np.uint8], colour: tuple[int, int, int], tolerance: int = 12) -> None:
    mean = array.reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(mean - np.array(colour)) <= tolerance), f"mean colour {mean} is not {colour}"


def reason_of(path: Path, **kwargs: object) -> str:
    with pytest.raises(ImageError) as info:
        load(path, SIZE, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


# --- refused, with a reason --------------------------------------------------------------------------
def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    assert reason_of(path) == "empty"
    with pytest.raises(ImageError, match="empty"):
        decode(b"", SIZE)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated(tmp_path: Path, fmt: str, keep: float) -> None:
    data = encode(noise(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    assert reason_of(path) == "truncated"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_inside_the_header(fmt: str) -> None:
    data = encode(noise(), fmt)
    with pytest.raises(ImageError) as info:
        decode(data[:40], SIZE)
    assert info.value.reason in ("truncated", "corrupt")  # never "not_an_image": the signature is there


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.jpg", b"just some text, not a picture\n" * 10),
        ("page.png", b"<!DOCTYPE html><html><body><img src='x.png'></body></html>\n"),
        ("random.tif", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))),
    ],
)
def test_not_an_image(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert reason_of(path) == "not_an_image"


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        ("bitmap.png", TEXT_PBM, "PPM"),
        ("drawing.png", EPS, "EPS"),
        ("frames.gif", encode(solid(RED), "GIF"), "GIF"),
        ("animation.png", encode(solid(RED), "GIF"), "GIF"),
        ("photo.jpg", encode(solid(RED), "WEBP"), "WEBP"),
        ("icon.bmp", encode(solid(RED), "ICO"), "ICO"),
    ],
    ids=["text-pbm-as-png", "eps-as-png", "gif", "gif-as-png", "webp-as-jpg", "ico-as-bmp"],
)
def test_formats_outside_the_allowlist_are_refused_by_content(
    tmp_path: Path, name: str, content: bytes, named: str
) -> None:
    """Only PNG, JPEG, TIFF and BMP are decoded, judged by the bytes: another image format is refused whatever
    its name, and the message says what it is."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        load(path, SIZE)
    assert info.value.reason == "unsupported_format"
    assert named in str(info.value) and "PNG, JPEG, TIFF, BMP" in str(info.value)


def test_eps_never_reaches_ghostscript(tmp_path: Path) -> None:
    """An EPS named .png is refused before any PostScript interpreter runs: a `gs` on PATH that would leave a
    mark shows whether it was started (in a fresh process, so Pillow has not looked for Ghostscript yet)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = tmp_path / "gs-ran"
    for tool in ("gs", "gswin32c", "gswin64c"):
        fake = bin_dir / tool
        fake.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
        fake.chmod(0o755)
    path = tmp_path / "upload.png"
    path.write_bytes(EPS)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from histod.errors import ImageError\n"
        "from histod.imaging import load\n"
        "try:\n"
        "    load(Path(sys.argv[1]), 32)\n"
        "    print('decoded')\n"
        "except ImageError as exc:\n"
        "    print(exc.reason)\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "unsupported_format", out.stdout + out.stderr
    assert not mark.exists(), "Ghostscript was started on an uploaded file"


@pytest.mark.parametrize(
    "values",
    [
        np.full((8, 8), np.nan),
        np.array([[0.2, 0.4], [np.nan, 0.6]]),
        np.array([[0.2, np.inf], [0.4, 0.6]]),
        np.array([[0.2, -np.inf], [0.4, 0.6]]),
    ],
    ids=["all-nan", "one-nan", "inf", "minus-inf"],
)
def test_non_finite_float_pixels_are_refused(tmp_path: Path, values: NDArray[np.float64]) -> None:
    path = tmp_path / "scan.tif"
    path.write_bytes(float_tiff(values.astype(np.float32)))
    with pytest.raises(ImageError) as info:
        load(path, SIZE)
    assert info.value.reason == "non_finite_pixels"
    assert "scan.tif" in str(info.value)


def test_an_allowed_format_under_another_name_is_judged_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "really a png.jpg"
    path.write_bytes(encode(solid(RED), "PNG"))
    assert_colour(load(path, SIZE), RED, tolerance=0)


def test_training_and_serving_take_the_same_formats() -> None:
    """The suffixes the trainer discovers are exactly those of the formats decode accepts (the service watches
    those and the single-file slide formats, which OpenSlide reads), and each decodes when Pillow writes it in the
    format its suffix names."""
    from histod.imaging import FORMATS
    from histod.readers import SINGLE_FILE_SLIDES
    from histod.settings import IMAGE_EXTENSIONS, Settings
    from histod.trainer.data import is_image

    assert set(IMAGE_EXTENSIONS) == {ext for exts in FORMATS.values() for ext in exts}
    assert Settings().extensions == [*IMAGE_EXTENSIONS, *SINGLE_FILE_SLIDES]
    registered = Image.registered_extensions()
    for ext in IMAGE_EXTENSIONS:
        assert is_image(Path(f"x{ext}")) and is_image(Path(f"x{ext.upper()}"))
        assert registered[ext] in FORMATS, ext
        assert_colour(decode(encode(solid(BLUE, (20, 20)), registered[ext]), SIZE), BLUE, tolerance=8)
    assert not is_image(Path("x.gif"))


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    data = bomb_png()
    assert len(data) < 200_000
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    assert reason_of(path) == "too_many_pixels"
    # and without allocating: in a fresh process the peak memory stays far below the 900 MB of pixels.
    # VmHWM belongs to the new process image; ru_maxrss would carry the forking parent's peak (pytest with
    # TensorFlow loaded) across fork and exec.
    code = (
        "import re, sys\n"
        "from pathlib import Path\n"
        "from histod.errors import ImageError\n"
        "from histod.imaging import load\n"
        "try:\n"
        "    load(Path(sys.argv[1]), 224)\n"
        "except ImageError as exc:\n"
        "    hwm = re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())\n"
        "    print(exc.reason, hwm.group(1) if hwm else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    reason, peak_kib = out.stdout.split()
    assert reason == "too_many_pixels"
    assert int(peak_kib) < 300 * 1024, f"peak RSS {int(peak_kib) // 1024} MiB"


def _patched_jpeg(width: int, height: int) -> bytes:
    data = bytearray(encode(solid(RED, (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _patched_gif(width: int, height: int) -> bytes:
    data = bytearray(encode(solid(RED, (16, 16)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [_patched_jpeg(60_000, 60_000), _patched_jpeg(9_000, 9_000)],
    ids=["jpeg-60000", "jpeg-9000"],
)
def test_bomb_headers_of_other_formats(data: bytes) -> None:
    """Small files whose headers claim huge images: refused before any pixel is decoded."""
    with pytest.raises(ImageError) as info:
        decode(data, SIZE)
    assert info.value.reason == "too_many_pixels"


def test_a_gif_bomb_header_is_never_opened() -> None:
    with pytest.raises(ImageError) as info:
        decode(_patched_gif(65_535, 65_535), SIZE)
    assert info.value.reason == "unsupported_format"


def test_pixel_cap_is_configurable() -> None:
    data = encode(noise(64), "PNG")
    with pytest.raises(ImageError, match="too_many_pixels"):
        decode(data, SIZE, max_pixels=64 * 64 - 1)
    assert decode(data, SIZE, max_pixels=64 * 64).shape == (SIZE, SIZE, 3)


def test_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(noise(), "PNG"))
    assert reason_of(path, max_bytes=100) == "too_large"


def test_missing(tmp_path: Path) -> None:
    assert reason_of(tmp_path / "gone.png") == "missing"


def test_symlink_pointing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "secret.png"
    target.write_bytes(encode(solid(RED), "PNG"))
    watch = tmp_path / "watch"
    watch.mkdir()
    link = watch / "link.png"
    link.symlink_to(target)
    assert reason_of(link, follow_symlinks=False) == "symlink"
    assert_colour(load(link, SIZE, follow_symlinks=True), RED)  # the trainer follows links
    dangling = watch / "dangling.png"
    dangling.symlink_to(outside / "nothing.png")
    assert reason_of(dangling, follow_symlinks=False) == "symlink"
    assert reason_of(dangling, follow_symlinks=True) == "missing"


def test_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # no writer: a blocking open for reading would wait forever
    assert reason_of(fifo) == "not_a_file"
    assert reason_of(fifo, follow_symlinks=False) == "not_a_file"


def test_directory_named_like_an_image(tmp_path: Path) -> None:
    folder = tmp_path / "x.jpg"
    folder.mkdir()
    assert reason_of(folder) == "not_a_file"


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: permission bits do not stop root from reading")
def test_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    path.write_bytes(encode(solid(RED), "PNG"))
    path.chmod(0)
    try:
        assert reason_of(path) == "unreadable"
    finally:
        path.chmod(0o600)


def test_permission_denied_maps_to_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same path as test_unreadable, reached even as root by making open() refuse."""
    path = tmp_path / "locked.png"
    path.write_bytes(encode(solid(RED), "PNG"))

    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    assert reason_of(path) == "unreadable"


def test_socket_is_not_a_file(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        assert reason_of(path) == "not_a_file"


def test_symlink_loop(tmp_path: Path) -> None:
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    assert reason_of(loop, follow_symlinks=True) == "symlink"
    assert reason_of(loop, follow_symlinks=False) == "symlink"


# --- decoded, correctly -------------------------------------------------------------------------------
def test_one_pixel_image_is_resized() -> None:
    out = decode(encode(solid(BLUE, (1, 1)), "PNG"), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert_colour(out, BLUE, tolerance=0)


def test_native_size_when_size_is_none() -> None:
    assert decode(encode(solid(RED, (20, 10)), "PNG"), None).shape == (10, 20, 3)


def test_16_bit_grayscale_png() -> None:
    values = np.array([[0, 32768], [65535, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit
    out = decode(data, None)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 128], [255, 255]])
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_16_bit_dark_grayscale_is_not_stretched() -> None:
    """A dark 16-bit image stays dark: no per-image contrast stretch (training and serving must agree)."""
    values = np.full((4, 4), 1000, dtype=np.uint16)
    out = decode(encode(Image.fromarray(values), "PNG"), None)
    assert np.all(out == 4)  # 1000 / 65535 * 255


def test_32_bit_integer_and_float_tiffs() -> None:
    ints = np.array([[0, 65535]], dtype=np.int32)
    assert Image.fromarray(ints).mode == "I"
    np.testing.assert_array_equal(decode(encode(Image.fromarray(ints), "TIFF"), None)[..., 0], [[0, 255]])
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert Image.fromarray(floats).mode == "F"
    np.testing.assert_array_equal(decode(encode(Image.fromarray(floats), "TIFF"), None)[..., 0], [[0, 128, 255]])


def test_16_bit_rgb_png() -> None:
    pixels = np.zeros((4, 4, 3), dtype=np.uint16)
    pixels[..., 0] = 65535
    pixels[..., 2] = 32768
    out = decode(png16_rgb(pixels), None)
    assert out.shape == (4, 4, 3)
    assert_colour(out, (255, 0, 128), tolerance=1)


def test_grayscale() -> None:
    out = decode(encode(Image.new("L", (8, 8), 77), "PNG"), SIZE)
    assert out.shape == (SIZE, SIZE, 3)
    assert np.all(out == 77)


def test_one_bit() -> None:
    out = decode(encode(Image.new("1", (8, 8), 1), "PNG"), None)
    assert np.all(out == 255)


def test_palette() -> None:
    img = solid(RED, (8, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert img.mode == "P"
    assert_colour(decode(encode(img, "PNG"), SIZE), RED, tolerance=0)


def test_palette_with_transparency_becomes_white() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 255, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 4, 8))  # left half index 1 (red), right half index 0 (blue) made transparent
    data = encode(img, "PNG", transparency=0)
    out = decode(data, None)
    assert_colour(out[:, :4], RED, tolerance=0)
    assert_colour(out[:, 4:], WHITE, tolerance=0)


def test_rgba_over_white() -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :2] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 2:4] = (255, 0, 0, 0)  # fully transparent red: white
    rgba[:, 4:] = (0, 0, 0, 128)  # half transparent black: mid grey
    out = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"), None)
    assert_colour(out[:, :2], BLUE, tolerance=0)
    assert_colour(out[:, 2:4], WHITE, tolerance=0)
    assert_colour(out[:, 4:], (127, 127, 127), tolerance=2)


def test_grayscale_with_alpha() -> None:
    la = Image.new("LA", (4, 4), (0, 0))
    assert_colour(decode(encode(la, "PNG"), None), WHITE, tolerance=0)


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data, SIZE)
    assert out.shape == (SIZE, SIZE, 3)
    assert_colour(out, RED, tolerance=20)


def test_exif_orientation_is_applied() -> None:
    """Stored 40 wide x 20 high with the red corner top-left; orientation 6 means "rotate 90° clockwise to
    display", so the decoded image is 20 wide x 40 high with the red corner top-right."""
    img = corner_marked(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    out = decode(data, None)
    assert out.shape == (40, 20, 3)
    assert_colour(out[:8, -4:], RED, tolerance=40)
    assert_colour(out[:8, :4], WHITE, tolerance=40)
    assert_colour(out[-8:, -4:], WHITE, tolerance=40)
    # resized as well: the orientation survives JPEG draft decoding
    small = decode(data, 8)
    assert small[0, -1, 0] > 200 and small[0, -1, 1] < 120


def test_damaged_exif_still_decodes() -> None:
    """An EXIF block whose IFD offset points past its end: orientation cannot be read, the pixels are fine."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 6)
    tiff += struct.pack("<I", 0xFFFFFF)
    data = encode(corner_marked(40, 20), "JPEG", quality=95, exif=b"Exif\x00\x00" + tiff)
    out = decode(data, None)
    assert out.shape in ((20, 40, 3), (40, 20, 3))


def test_multi_frame_uses_the_first_frame() -> None:
    frames = [solid(RED), solid(BLUE), solid((0, 255, 0))]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(data)) as img:
        assert getattr(img, "n_frames", 1) == 3
    assert_colour(decode(data, SIZE), RED, tolerance=0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_every_served_format_decodes(fmt: str) -> None:
    out = decode(encode(solid(BLUE, (50, 30)), fmt), SIZE)
    assert out.shape == (SIZE, SIZE, 3)
    assert_colour(out, BLUE, tolerance=8)


@pytest.mark.parametrize("name", ["with spaces.png", "ünïcödé 病理.png", "new\nline.png", "-dash.png"])
def test_awkward_names(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(encode(solid(RED), "PNG"))
    assert read_file(path, follow_symlinks=False) == path.read_bytes()
    assert_colour(load(path, SIZE, follow_symlinks=False), RED, tolerance=0)


def test_error_message_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "named file.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ImageError) as info:
        load(path, SIZE)
    assert "named file.png" in str(info.value) and str(info.value).startswith("not_an_image: ")


def test_longest_side_reads_the_header_under_the_same_rules_as_decode() -> None:
    """What histod.readers asks of a file before deciding to tile it: the longer side decode would return
    (rotation does not change it), refused exactly as decode refuses the header."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(corner_marked(40, 20), "JPEG", quality=95, exif=exif.tobytes())
    assert longest_side(rotated) == max(decode(rotated, None).shape[:2]) == 40
    for data, cap in ((bomb_png(), DEFAULT_MAX_PIXELS), (encode(noise(64), "PNG"), 64 * 64 - 1)):
        with pytest.raises(ImageError) as info:
            longest_side(data, max_pixels=cap)
        assert info.value.reason == "too_many_pixels"
    with pytest.raises(ImageError) as info:
        longest_side(EPS)
    assert info.value.reason == "unsupported_format"
