"""The hostile corpus through the RUNNING service (the live watcher, not --once): each entry is recorded as
`failed` with its specific reason, or classified where it is a valid image, and moved aside; the service keeps
running and takes the next good file. The decoding rules themselves are unit-tested in tests/test_imaging.py,
whose generators are reused here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histod.db.models import STATUS_CLASSIFIED, STATUS_FAILED
from tests.faults_support import account, report, wait_for
from tests.test_imaging import EPS, RED, TEXT_PBM, bomb_png, corner_marked, encode, nan_tiff, noise, png16_rgb, solid
from tests.test_service_support import row_count, rows, running_service, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

UNREADABLE = "no read permission.png"
CLASSIFIED = None  # expected "reason" of a valid image


def _corpus(watch: Path, outside: Path) -> dict[str, set[str | None]]:
    """Write the corpus into ``watch``; name -> the accepted error reasons (``{None}``: classified)."""
    good = encode(noise(48, seed=1), "PNG")
    jpeg = encode(noise(48, seed=2), "JPEG", quality=90)
    rgba = noise(48, seed=5).convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    frames = [solid(RED), solid((0, 0, 255)), solid((0, 255, 0))]
    files: dict[str, tuple[bytes, set[str | None]]] = {
        "zero bytes.png": (b"", {"empty"}),
        "truncated.png": (good[: len(good) // 2], {"truncated", "corrupt"}),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], {"truncated", "corrupt"}),
        "text.jpg": (b"this is a text file, not a JPEG\n", {"not_an_image"}),
        "page.png": (b"<!doctype html><html><body>404 Not Found</body></html>\n", {"not_an_image"}),
        "bomb.png": (bomb_png(30_000), {"too_many_pixels"}),
        "one pixel.png": (encode(solid((200, 30, 90), (1, 1)), "PNG"), {CLASSIFIED}),
        "sixteen bit.png": (
            png16_rgb(np.random.default_rng(3).integers(0, 65536, (40, 40, 3), dtype=np.uint16)),
            {CLASSIFIED},
        ),
        "grayscale.png": (encode(noise(48, seed=3).convert("L"), "PNG"), {CLASSIFIED}),
        "palette.png": (encode(noise(48, seed=4).convert("P"), "PNG"), {CLASSIFIED}),
        "rgba.png": (encode(rgba, "PNG"), {CLASSIFIED}),
        "cmyk.jpg": (encode(noise(48, seed=6).convert("CMYK"), "JPEG", quality=90), {CLASSIFIED}),
        "exif rotated.jpg": (encode(corner_marked(40, 20), "JPEG", quality=90, exif=exif.tobytes()), {CLASSIFIED}),
        "frames.tif": (encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), {CLASSIFIED}),
        "frames.gif": (encode(frames[1], "GIF", save_all=True, append_images=frames[2:]), {"unsupported_format"}),
        "text bitmap.png": (TEXT_PBM, {"unsupported_format"}),
        "postscript.png": (EPS, {"unsupported_format"}),
        "all nan.tif": (nan_tiff(), {"non_finite_pixels"}),
        "with  spaces .png": (encode(noise(48, seed=7), "PNG"), {CLASSIFIED}),
        "ünïcödé 病理.png": (encode(noise(48, seed=8), "PNG"), {CLASSIFIED}),
        "new\nline.png": (encode(noise(48, seed=9), "PNG"), {CLASSIFIED}),
        "same content A.png": (encode(noise(48, seed=10), "PNG"), {CLASSIFIED}),
        "same content B.png": (encode(noise(48, seed=10), "PNG"), {CLASSIFIED}),
        UNREADABLE: (encode(noise(48, seed=11), "PNG"), {"unreadable"}),
    }
    for name, (data, _) in files.items():
        (watch / name).write_bytes(data)
    expected = {name: reasons for name, (_, reasons) in files.items()}
    (watch / "outside.png").symlink_to(outside)
    expected["outside.png"] = {"symlink"}
    os.mkfifo(watch / "fifo.png")
    expected["fifo.png"] = {"not_a_file"}
    (watch / "x.jpg").mkdir()  # a folder with an image's name is a folder: walked into
    (watch / "x.jpg" / "inside.png").write_bytes(encode(noise(48, seed=15), "PNG"))
    expected["x.jpg/inside.png"] = {CLASSIFIED}
    return expected


def _files(folder: Path) -> list[Path]:
    """What is left in the watch folder, folders aside (an emptied case folder stays a while)."""
    return [p for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()]


@pytest.fixture
def refuse_reading(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests run as root, which reads any file: deny the open of UNREADABLE at the OS boundary, as EACCES."""
    real_open = os.open

    def guarded(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if isinstance(path, str | os.PathLike) and os.fspath(path).endswith(UNREADABLE):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", guarded)
    yield


def test_hostile_corpus_through_the_running_service(
    tiny_run_dir: Path, tmp_path: Path, refuse_reading: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # .gif is not among the default extensions: added here so that a GIF is taken, and refused by its content
    settings = service_settings(
        tmp_path, tiny_run_dir, stable_ms=200, extensions=[".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif"]
    )
    watch = settings.resolved_watch_dir
    watch.mkdir(parents=True)
    outside = tmp_path / "secret.png"
    outside.write_bytes(encode(noise(48, seed=12), "PNG"))
    thread, stop, errors = running_service(settings)
    try:
        (watch / "first.png").write_bytes(encode(noise(48, seed=13), "PNG"))
        wait_for(lambda: row_count(settings) == 1 or errors, 60, what="the service's first file")
        expected = _corpus(watch, outside)
        wait_for(
            lambda: (row_count(settings) == 1 + len(expected) and not _files(watch)) or errors,
            120,
            what=f"{len(expected)} hostile entries recorded and moved",
        )
        assert thread.is_alive() and errors == [], errors
        (watch / "after.png").write_bytes(encode(noise(48, seed=14), "PNG"))  # still serving
        wait_for(lambda: row_count(settings) == 2 + len(expected) or errors, 60, what="a good file after the corpus")
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive() and errors == []
    by_name = {r.name: r for r in rows(settings)}
    got = {name: by_name[name].error_reason for name in expected if name in by_name}
    wrong = {n: (got.get(n), sorted(map(str, want))) for n, want in expected.items() if got.get(n, "?") not in want}
    assert not wrong, wrong
    for name in expected:
        row = by_name[name]
        valid = expected[name] == {CLASSIFIED}
        assert row.status == (STATUS_CLASSIFIED if valid else STATUS_FAILED), name
        root = settings.processed_dir if valid else settings.failed_dir
        assert Path(row.stored_path).relative_to(root).parts[1:] == Path(name).parts, name
        assert valid or row.error, name
    a, b = by_name["same content A.png"], by_name["same content B.png"]
    assert a.sha256 == b.sha256 and b.duplicate_of == a.id and a.duplicate_of is None
    link = Path(by_name["outside.png"].stored_path)
    assert link.is_symlink() and link.readlink() == outside  # the link moved, never followed
    assert outside.read_bytes() == encode(noise(48, seed=12), "PNG")
    assert Path(by_name["x.jpg/inside.png"].stored_path).relative_to(settings.processed_dir).parts[1:] == (
        "x.jpg",
        "inside.png",
    )
    tally = account(settings, ["first.png", *expected, "after.png"])
    report(capsys, "hostile", tally, rounds=1, kinds=len(expected))
    tally.check()
