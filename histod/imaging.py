"""Read, decode, orient, convert and resize one image: the ONE function the trainer, the exporter's parity
check, `histod predict` and the service all use, so training and serving cannot disagree.

Only the formats of :data:`FORMATS` (PNG, JPEG, TIFF, BMP) are decoded, judged by the bytes, never by the file
name: Pillow is asked to try those plugins alone, so another format (EPS, which Pillow would hand to
Ghostscript; netpbm, GIF, WebP, ...) is never parsed beyond its signature. The trainer discovers files by the
same formats' suffixes (:data:`EXTENSIONS`, the default ``extensions`` setting of the service).

Every failure is an :class:`~histod.errors.ImageError` with a short stable ``reason`` code:

==================  ===============================================================
reason              meaning
==================  ===============================================================
``missing``         the path does not exist (any more)
``not_a_file``      a directory, FIFO, socket or device
``symlink``         a symbolic link, when links are not followed (the service); or a loop of links
``unreadable``      permission denied or another OS error while reading
``empty``           zero bytes
``too_large``       more bytes than ``max_bytes``
``not_an_image``    no image format recognised (text, HTML, ... under an image name)
``unsupported_format`` an image format histod does not read (EPS, netpbm, GIF, WebP, ...), whatever
                    the name
``too_many_pixels`` width x height above ``max_pixels`` (decompression-bomb guard)
``truncated``       the data ends before the image does
``corrupt``         the decoder failed for another reason (also: a known signature whose header
                    cannot be read)
``non_finite_pixels`` a floating-point image (32-bit float TIFF) with NaN or infinite values
==================  ===============================================================

High-bit-depth images are scaled by fixed rules (16-bit by 65535, floats as 0..1), never stretched per image.
A damaged EXIF block does not refuse an image: it is used as stored. Nothing here changes global state at call
time (no ``warnings.catch_warnings``), so ``decode`` is safe in a thread pool.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from histod.errors import ImageError

DEFAULT_MAX_PIXELS = 50_000_000
"""About 7,000 x 7,000: far above a histology tile, far below a decompression bomb."""
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp",),
}
"""The image formats histod decodes (Pillow's format ids), and the file suffixes that name them."""
EXTENSIONS: tuple[str, ...] = tuple(ext for suffixes in FORMATS.values() for ext in suffixes)
_ALLOWED = tuple(FORMATS)
_ALLOWED_TEXT = ", ".join(("PNG", "JPEG", "TIFF", "BMP"))

# We enforce our own pixel cap (``max_pixels``) from the header, before any pixel is decoded. Pillow's global guard
# stays as a second line for sizes only known while loading (GIF frames, TIFF tiles): it raises
# DecompressionBombError above twice this value. Its DecompressionBombWarning is NOT turned into an error with
# warnings.catch_warnings(): that is not thread-safe, and decode() runs in a thread pool.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, DEFAULT_MAX_PIXELS)

_BACKGROUND = (255, 255, 255)  # slides are white where they are empty: transparent pixels become white


def _open_file(path: Path, follow_symlinks: bool) -> int:
    """A read-only descriptor of ``path``, with O_NONBLOCK so that a FIFO can never hang the caller; every failure
    an ImageError with its reason."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        return os.open(path, flags)
    except FileNotFoundError as exc:
        raise ImageError("missing", f"{path} does not exist") from exc
    except PermissionError as exc:
        raise ImageError("unreadable", f"permission denied reading {path}") from exc
    except IsADirectoryError as exc:
        raise ImageError("not_a_file", f"{path} is a directory") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            if follow_symlinks:
                raise ImageError("symlink", f"{path}: too many levels of symbolic links") from exc
            raise ImageError("symlink", f"{path} is a symbolic link; links are not followed") from exc
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):  # a socket, or a device without a driver
            raise ImageError("not_a_file", f"{path} is not a regular file ({exc.strerror})") from exc
        raise ImageError("unreadable", f"cannot open {path}: {exc.strerror}") from exc


def _check_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ImageError("not_a_file", f"{path} is {kind}")
    if st.st_size == 0:
        raise ImageError("empty", f"{path} is empty (0 bytes)")


def read_file(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, follow_symlinks: bool = True) -> bytes:
    """Return the bytes of a regular file, refusing links (unless followed), FIFOs, folders and huge files.

    Opens with O_NONBLOCK so that a FIFO can never hang the caller.
    """
    fd = _open_file(path, follow_symlinks)
    try:
        st = os.fstat(fd)
        _check_regular(path, st)
        if st.st_size > max_bytes:
            raise ImageError("too_large", f"{path} has {st.st_size} bytes, above the limit of {max_bytes}")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise ImageError("too_large", f"{path} grew past the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        raise ImageError("empty", f"{path} is empty (0 bytes)")
    return data


def hash_file(path: Path, *, follow_symlinks: bool = True) -> tuple[str, int]:
    """The sha256 and size of a regular file of any size, read in 1 MiB blocks (a whole-slide image is never held
    in memory), with the refusals of :func:`read_file` but its size limit."""
    fd = _open_file(path, follow_symlinks)
    digest = hashlib.sha256()
    total = 0
    try:
        _check_regular(path, os.fstat(fd))
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
            total += len(chunk)
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if total == 0:
        raise ImageError("empty", f"{path} is empty (0 bytes)")
    return digest.hexdigest(), total


def decode(
    data: bytes,
    size: int | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str = "image",
    on_size: Callable[[int, int], None] | None = None,
) -> NDArray[np.uint8]:
    """Decode image bytes to RGB uint8 of shape (size, size, 3) (or the native size when ``size`` is None).

    EXIF orientation is applied; the first frame of a multi-frame file is used; 16-bit, grayscale,
    palette, CMYK and alpha images become 8-bit RGB (transparency over white). ``on_size(width, height)`` is
    called with the native size read from the header, before any pixel is decoded (what it raises is raised).
    """
    with _open(data, name, max_pixels) as img:
        if on_size is not None:
            on_size(*img.size)
        try:
            img.seek(0)
            if size is not None and img.format == "JPEG":
                img.draft("RGB", (size, size))  # let libjpeg decode at a reduced scale: much faster
            img.load()
            out = _to_rgb(_oriented(img), name)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError("too_many_pixels", f"{name}: {exc}") from exc
        except (OSError, EOFError) as exc:
            reason = "truncated" if _looks_truncated(exc) else "corrupt"
            raise ImageError(reason, f"{name}: {exc or type(exc).__name__}") from exc
        except Exception as exc:
            raise ImageError("corrupt", f"{name}: the decoder failed ({type(exc).__name__}: {exc})") from exc
    if size is not None and out.size != (size, size):
        out = out.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(out, dtype=np.uint8)
    if array.shape[-1] != 3 or array.ndim != 3:  # pragma: no cover - _to_rgb guarantees RGB
        raise ImageError("corrupt", f"{name}: unexpected decoded shape {array.shape}")
    return array


def longest_side(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> int:
    """The longer side in pixels of the image :func:`decode` would return at its native size, read from the
    header alone (no pixel is decoded; a side does not change under EXIF rotation). Raises the ImageError that
    :func:`decode` would raise for the header (its format, its size against ``max_pixels``)."""
    with _open(data, name, max_pixels) as img:
        return max(img.size)


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The image's header, opened by the allowed formats' plugins only and checked against ``max_pixels``;
    every failure an ImageError."""
    if not data:
        raise ImageError("empty", f"{name} is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=_ALLOWED)
    except UnidentifiedImageError as exc:
        fmt = signature(data)
        if fmt is not None:  # an image that starts right but whose header is cut short or damaged
            raise ImageError("corrupt", f"{name} starts like a {fmt} file but its header cannot be read") from exc
        other = _other_format(data)
        if other is not None:
            raise ImageError(
                "unsupported_format", f"{name} is a {other} image; histod reads {_ALLOWED_TEXT} only"
            ) from exc
        raise ImageError("not_an_image", f"{name} is not an image in a format we can read") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"{name}: {exc}") from exc
    except Exception as exc:  # Pillow's plugins raise many types on hostile headers
        reason = "truncated" if _looks_truncated(exc) else "corrupt"
        raise ImageError(reason, f"{name}: cannot read the image header ({exc})") from exc
    width, height = img.size
    if width < 1 or height < 1:
        img.close()
        raise ImageError("corrupt", f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        img.close()
        raise ImageError(
            "too_many_pixels", f"{name} is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    return img


def load(
    path: Path,
    size: int | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    follow_symlinks: bool = True,
) -> NDArray[np.uint8]:
    """Read and decode ``path`` (see :func:`read_file` and :func:`decode`)."""
    data = read_file(path, max_bytes=max_bytes, follow_symlinks=follow_symlinks)
    return decode(data, size, max_pixels=max_pixels, name=str(path))


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)


def signature(data: bytes) -> str | None:
    """The decoded format (a :data:`FORMATS` key) whose magic bytes ``data`` starts with, if any."""
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _other_format(data: bytes) -> str | None:
    """The name of another image format ``data`` starts like, for the message: only Pillow's signature checks
    (``accept`` on the first 16 bytes) run, never a plugin's parser."""
    Image.init()
    prefix = data[:16]
    for fmt, (_factory, accept) in Image.OPEN.items():
        if fmt in FORMATS or accept is None:
            continue
        try:
            if accept(prefix):  # True, or a text saying this Pillow lacks the codec: that format either way
                return str(fmt)
        except Exception:  # a signature check that cannot handle these bytes: not this format
            continue
    return None


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text


def _oriented(img: Image.Image) -> Image.Image:
    """A copy turned upright by its EXIF orientation. Orientation is metadata: if the EXIF block is too damaged
    to apply it, the pixels are still good, so the image is used as stored rather than refused."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img.copy()


def _full_scale(mode: str, peak: float) -> float:
    """The value that maps to 255 for a high-bit-depth mode."""
    if mode == "F":
        return 1.0 if peak <= 1.0 else 255.0
    return 65535.0 if peak <= 65535.0 else peak


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Fixed scales, never per-image contrast stretching (training and serving must map a value alike):
        # 16-bit and 32-bit integers as 16-bit (above that, the largest value), floats as 0..1 (or 0..255).
        values = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():  # NaN or inf has no brightness: refused, never guessed as black or white
            bad = int(values.size - np.count_nonzero(finite))
            raise ImageError(
                "non_finite_pixels", f"{name} has {bad} of {values.size} pixel values that are NaN or infinite"
            )
        peak = float(values.max()) if values.size else 0.0
        top = _full_scale(mode, peak)
        scaled = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
