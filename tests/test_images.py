from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epic.errors import EpicError
from epic.images import read_image_folder, read_npz

from .imagefiles import png_header_only, save


def _rgb(seed: int, h: int = 12, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_folder_reads_sorted_classes_and_files_in_dataset_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    arrays = {"zebra/b.png": _rgb(0), "zebra/a.png": _rgb(1), "ant/x/deep.bmp": _rgb(2),
              "ant/top.png": _rgb(3), "moth/only.gif": _rgb(4)}
    for name, array in arrays.items():
        save(tmp_path / name, array)
    folder = read_image_folder(tmp_path)
    assert folder.data.classes == ("ant", "moth", "zebra")
    assert folder.files == ("ant/top.png", "ant/x/deep.bmp", "moth/only.gif", "zebra/a.png",
                            "zebra/b.png")
    assert folder.data.labels.tolist() == [0, 0, 1, 2, 2]
    assert folder.data.images.shape == (5, 3, 12, 12) and folder.skipped == ()
    for i, name in enumerate(folder.files):
        if not name.endswith(".gif"):  # a GIF is palette-quantised: not lossless
            assert torch.equal(folder.data.images[i],
                               torch.from_numpy(arrays[name]).permute(2, 0, 1))


def test_images_are_resized_to_the_most_common_size_or_the_one_asked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    save(tmp_path / "a/1.png", _rgb(0, 10, 20))
    save(tmp_path / "a/2.jpg", _rgb(1, 10, 20))
    save(tmp_path / "b/3.png", _rgb(2, 30, 30))
    assert read_image_folder(tmp_path).data.shape == (3, 10, 20)
    assert read_image_folder(tmp_path, image_size=8).data.shape == (3, 8, 8)
    assert read_image_folder(tmp_path, image_size=(6, 9)).data.shape == (3, 6, 9)


def test_grayscale_only_when_every_image_is(tmp_path) -> None:  # type: ignore[no-untyped-def]
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    save(tmp_path / "a/1.png", gray)
    save(tmp_path / "b/2.jpg", gray)
    data = read_image_folder(tmp_path).data
    assert data.shape == (1, 8, 8) and len(data.mean) == 1
    assert torch.equal(data.images[0, 0], torch.from_numpy(gray))
    save(tmp_path / "b/3.png", _rgb(0, 8, 8))
    data = read_image_folder(tmp_path).data
    assert data.shape == (3, 8, 8)
    assert all(torch.equal(data.images[0, c], torch.from_numpy(gray)) for c in range(3))


def test_every_bad_file_is_skipped_with_its_name_and_reason(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    png = io.BytesIO()
    Image.fromarray(_rgb(0)).save(png, "PNG")
    jpeg = io.BytesIO()
    Image.fromarray(_rgb(1)).save(jpeg, "JPEG")
    good = png.getvalue()
    save(tmp_path / "a/good.png", _rgb(2))
    save(tmp_path / "b/good.jpg", _rgb(3))
    save(tmp_path / "b/noise.png", _rgb(4, 64, 64))  # about 12 kB of incompressible pixels
    bad = {
        "a/corrupt.png": good[:60] + bytes(40) + good[100:],
        "a/truncated.png": good[: len(good) // 2],
        "a/truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "a/empty.png": b"",
        "a/text.png": b"just some text, not an image\n",
        "b/huge.png": png_header_only(100_000, 100_000),  # Pillow's DecompressionBombError
        "b/bomb.png": png_header_only(10_000, 10_000),  # Pillow's DecompressionBombWarning
        "b/big.png": png_header_only(7_000, 7_000),  # over max_pixels only
        "loose.png": good,
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    save(tmp_path / "b/image.tiff", _rgb(5))
    os.symlink("/etc/passwd", tmp_path / "a/link.png")
    with caplog.at_level(logging.WARNING, logger="epic.images"):
        folder = read_image_folder(tmp_path, max_file_bytes=8_000)
    assert folder.files == ("a/good.png", "b/good.jpg")
    reasons = {s.file: s.reason for s in folder.skipped}
    assert list(reasons) == sorted(reasons)
    expected = {
        "a/corrupt.png": "corrupt or truncated", "a/truncated.png": "corrupt or truncated",
        "a/truncated.jpg": "corrupt or truncated", "a/empty.png": "an empty file",
        "a/text.png": "not a PNG, JPEG, BMP, GIF or WEBP image",
        "b/huge.png": "decompression bomb", "b/bomb.png": "decompression bomb",
        "b/big.png": "7000 x 7000 = 49,000,000 pixels, over the limit of 40,000,000",
        "b/noise.png": "bytes, over the limit of 8,000", "loose.png": "not in a class sub-folder",
        "b/image.tiff": "not a PNG, JPEG, BMP, GIF or WEBP image",
        "a/link.png": "a symbolic link (links are not followed)",
    }
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])
        assert any(name in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records), name


@pytest.mark.parametrize(("layout", "message"), [
    ({}, "has 0 class sub-folders"),
    ({"loose.png": True}, "has 0 class sub-folders"),
    ({"only/1.png": True, "only/2.png": True}, "has 1 class sub-folder;"),
    ({"a/1.png": False, "b/2.png": False}, "holds no readable image (2 files skipped; first: "
                                           "a/1.png: not a PNG"),
    ({"a/1.png": True, "b/2.png": False}, "has readable images in 1 class sub-folder;"),
])
def test_folders_without_two_readable_classes_are_errors(tmp_path, layout, message) -> None:  # type: ignore[no-untyped-def]
    for name, readable in layout.items():
        if readable:
            save(tmp_path / name, _rgb(0))
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("not an image")
    with pytest.raises(ValueError, match=re.escape(message)):
        read_image_folder(tmp_path)


def test_missing_folder_and_oversized_set_are_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_image_folder(tmp_path / "nowhere")
    save(tmp_path / "a/1.png", _rgb(0))
    save(tmp_path / "b/1.png", _rgb(1))
    with pytest.raises(EpicError, match=r"need 864 bytes .*choose a smaller image_size") as err:
        read_image_folder(tmp_path, max_total_bytes=800)
    assert err.value.worded(lambda o: "--" + o.replace("_", "-")).endswith(
        "choose a smaller --image-size")  # as the command line says it


# ----------------------------------------------------------------------------- npz


@pytest.mark.parametrize(("shape", "expect"), [
    ((6, 5, 7), (6, 1, 5, 7)), ((6, 5, 7, 3), (6, 3, 5, 7)), ((6, 3, 5, 7), (6, 3, 5, 7)),
    ((6, 5, 7, 1), (6, 1, 5, 7)),
])
def test_npz_layouts(tmp_path, shape, expect) -> None:  # type: ignore[no-untyped-def]
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    data = read_npz(tmp_path / "set.npz")
    assert data.images.shape == expect and data.classes == ("0", "1", "2")
    assert data.labels.tolist() == labels.tolist()
    np.savez_compressed(tmp_path / "named.npz", images=images, labels=labels,
                        classes=np.array(["cat", "dog", "eel"]))
    assert read_npz(tmp_path / "named.npz").classes == ("cat", "dog", "eel")


def _bad_npz(path: Path, case: str) -> None:
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1])
    arrays: dict[str, np.ndarray] = {"images": images, "labels": labels}
    if case == "no labels":
        del arrays["labels"]
    elif case == "float images":
        arrays["images"] = images.astype(np.float32)
    elif case == "2-d images":
        arrays["images"] = images.reshape(4, -1)
    elif case == "4 channels":
        arrays["images"] = np.zeros((4, 8, 8, 4), dtype=np.uint8)
    elif case == "labels shape":
        arrays["labels"] = labels[:3]
    elif case == "float labels":
        arrays["labels"] = labels.astype(np.float64)
    elif case == "labels range":
        arrays["labels"] = np.array([0, 1, 0, 7])
    elif case == "negative label":
        arrays["labels"] = np.array([0, 1, -1, 1])
    elif case == "one class":
        arrays["labels"] = np.zeros(4, dtype=np.int64)
    elif case == "object classes":
        arrays["classes"] = np.array(["a", 1], dtype=object)
    np.savez(path, **arrays)


@pytest.mark.parametrize(("case", "message"), [
    ("no labels", "lacks labels"), ("float images", "images must be uint8"),
    ("2-d images", "images must be uint8"), ("4 channels", "neither 1 nor 3 channels"),
    ("labels shape", r"labels must be integers \(4,\)"),
    ("float labels", r"labels must be integers \(4,\)"), ("labels range", r"lie in 0\.\.3"),
    ("negative label", r"lie in 0\.\.1"), ("one class", "holds 1 classes"),
    ("object classes", "Python objects"),
])
def test_bad_npz_is_a_clear_error_naming_the_file(tmp_path, case, message) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.npz"
    _bad_npz(path, case)
    with pytest.raises(ValueError, match=message) as exc:
        read_npz(path)
    assert str(path) in str(exc.value)


def test_npz_size_is_checked_from_the_header_before_reading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A header that claims a terabyte of images is refused before any allocation."""
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("images.npy", "w") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 3, 32, 32)})
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="over the limit of 1,073,741,824 bytes"):
        read_npz(path)


def test_not_an_npz_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with open(tmp_path / "plain.npz", "wb") as f:
        np.save(f, np.zeros(3))  # an .npy under an .npz name
    with pytest.raises(ValueError, match="plain.npz is not an .npz"):
        read_npz(tmp_path / "plain.npz")
    with pytest.raises(FileNotFoundError):
        read_npz(tmp_path / "missing.npz")
