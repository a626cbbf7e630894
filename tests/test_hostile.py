"""Careless and hostile input on the command line: every bad value is a short error naming it,
before any work starts; never a traceback, never silent nonsense."""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

import pytest
import torch

from epic.cli import main


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The error ``epic argv`` stops with (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["train", "--batch-size", "-5"], "argument --batch-size: must be >= 1, got -5"),
    (["train", "--lr", "nan"], "argument --lr: must be finite, got nan"),
    (["train", "--lr", "0"], "argument --lr: must be in (0, inf], got 0"),
    (["train", "--subset", "0"], "argument --subset: must be >= 1, got 0"),
    (["train", "--test-subset", "0"], "argument --test-subset: must be >= 1, got 0"),
    (["train", "--fraction", "1.5"], "argument --fraction: must be in (0, 1], got 1.5"),
    (["train", "--epochs", "ten"], "argument --epochs: expected an integer, got 'ten'"),
    (["craft", "--attack", "bp", "--out", "x", "--adversarial-class", "-1"],
     "argument --adversarial-class: must be >= 0, got -1"),
    (["craft", "--attack", "bp", "--out", "x", "--budget", "-1"],
     "argument --budget: must be in (0, inf], got -1"),
    (["craft", "--attack", "bp", "--out", "x", "--eps", "300"],
     "argument --eps: must be in [1, 255], got 300"),
    (["craft", "--attack", "bp", "--out", "x", "--eps", "0.001"],  # would change no pixel
     "argument --eps: must be in [1, 255], got 0.001"),
])
def test_nonsense_values_are_refused_by_name(args, message, capsys) -> None:  # type: ignore[no-untyped-def]
    assert fails(args, capsys).endswith(message)


def test_output_folders_that_cannot_be(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert fails(["train", "--out", str(a_file)], capsys) == (
        f"epic: error: --out {a_file}: is a file, not a folder")
    assert fails(["train", "--out", str(a_file / "run")], capsys).startswith(
        f"epic: error: --out {a_file / 'run'}: cannot create it")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert fails(["train", "--device", "cuda", "--out", str(tmp_path)], capsys) == (
        "epic: error: --device cuda: CUDA is not available on this machine")
    assert fails(["train", "--device", "gpu7", "--out", str(tmp_path)], capsys).startswith(
        "epic: error: --device gpu7: not a device name")


def test_craft_checks_the_target_before_training_anything(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "poisons"
    assert fails(["craft", "--attack", "bp", "--target-index", "99999", "--out", str(out)],
                 capsys) == "epic: error: --target-index 99999: the test set has 450 images"
    assert fails(["craft", "--attack", "sa", "--source-class", "10", "--out", str(out)],
                 capsys) == "epic: error: --source-class 10: the data has classes 0..9"
    assert not (out / "clean_model").exists()


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def test_a_hostile_cifar_batch_is_named(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                 "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(_Payload()))
    err = fails(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "run")], capsys)
    assert err.startswith(f"epic: error: {folder / 'data_batch_1'}: ")
    assert "posix.system" in err or "os.system" in err


def test_a_truncated_pickle_is_named(tmp_path: Path) -> None:
    from epic.io.safe_pickle import UnsafePickleError, safe_load

    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"labels": list(range(100))})[:-20])
    with open(path, "rb") as f, pytest.raises(UnsafePickleError, match=f"{path}: not a readable"):
        safe_load(f)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_of_every_pickle_protocol_load(protocol: int) -> None:
    import io

    import numpy as np

    from epic.io.safe_pickle import safe_load

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = safe_load(io.BytesIO(pickle.dumps({"x": a, "n": np.int64(3)}, protocol=protocol)))
    assert type(back["x"]) is np.ndarray and np.array_equal(back["x"], a) and back["n"] == 3


@pytest.mark.parametrize("call", ["reconstruct", "ndarray"])
def test_a_tiny_pickle_cannot_ask_for_a_huge_array(call: str) -> None:
    import io

    from epic.io.safe_pickle import UnsafePickleError, safe_load

    shape = b"(J\x00\x00\x00\x40t"  # the tuple (2**30,); as 8-byte floats, 8 GiB
    f8 = b"cnumpy\ndtype\n(X\x02\x00\x00\x00f8tR"  # numpy.dtype("f8")
    if call == "reconstruct":  # _reconstruct(ndarray, shape, dtype), as array pickles begin
        body = b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + shape + f8 + b"tR."
    else:  # ndarray(shape, dtype)
        body = b"cnumpy\nndarray\n(" + shape + f8 + b"tR."
    assert len(body) < 120
    with pytest.raises(UnsafePickleError, match="over the limit"):
        safe_load(io.BytesIO(body))


def test_a_compressed_poison_set_cannot_ask_for_gigabytes(tmp_path, tiny_data) -> None:  # type: ignore[no-untyped-def]
    """A poisons.npz whose header promises 2 GiB: refused from the header, before reading."""
    import json
    import zipfile

    import numpy as np

    from epic.poisons import PoisonSet, PoisonSetError

    train, _ = tiny_data
    folder = tmp_path / "set"
    folder.mkdir()
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.uint8))
    header["shape"] = (2**31,)
    with zipfile.ZipFile(folder / "poisons.npz", "w", zipfile.ZIP_DEFLATED) as zf, \
            zf.open("images.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 1024)  # the data a reader would go on to inflate
    (folder / "poisons.json").write_text(json.dumps({"format": "epic-poisons", "version": 1}))
    assert (folder / "poisons.npz").stat().st_size < 10_000
    with pytest.raises(PoisonSetError, match="over the limit"):
        PoisonSet.load(folder, train)
    header["shape"] = (61, 3, 8, 8)  # more poisons than the 60 training images
    with zipfile.ZipFile(folder / "poisons.npz", "w") as zf, zf.open("images.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
    with pytest.raises(PoisonSetError, match="'images' has 61 rows, the training set 60"):
        PoisonSet.load(folder, train)


def test_fractions_of_every_numeric_kind_and_no_booleans() -> None:
    import numpy as np

    from epic import EPIC
    from epic.selection import find_isolated

    x, y = torch.randn(50, 4), torch.arange(50) % 2
    want = find_isolated(x, y, 0.2)
    for fraction in (np.float32(0.2), torch.tensor(0.2), np.float64(0.2)):
        assert torch.equal(find_isolated(x, y, fraction), want)  # type: ignore[arg-type]
        assert EPIC(fraction).fraction == 0.2  # type: ignore[arg-type]
    for bad in (True, "0.2", torch.tensor([0.2, 0.3]), 0.0, 1.5):
        with pytest.raises(ValueError, match="fraction must be"):
            find_isolated(x, y, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="fraction must be"):
            EPIC(bad)  # type: ignore[arg-type]


# --- every hostile file through every reader, under a memory and a time limit -------------

def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with one byte of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def _npz(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            with zf.open(name, "w", force_zip64=True) as f:
                f.write(data)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@functools.cache
def _many_scans_jpeg(size: int, repeats: int) -> bytes:
    """A progressive JPEG of ``size`` x ``size`` whose last scan is repeated ``repeats``
    times: every copy makes the decoder pass over the whole image again."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 200)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


def _inflating_pt(declared: int) -> bytes:
    """A ``torch.save`` archive whose tensor record claims ``declared`` bytes once
    inflated (a deflated record of zeros reaches about 1,000:1; here the size is forged)."""
    import io
    import struct
    import zipfile

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    data = bytearray(out.getvalue())
    at = data.index(b"PK\x01\x02")  # the central directory: the sizes readers trust
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46:at + 46 + name_len].endswith(b"data/0"):
            struct.pack_into("<I", data, at + 24, declared)
        at = data.find(b"PK\x01\x02", at + 46)
    return bytes(data)


def hostile_files(folder: Path, marker: Path) -> list[Path]:
    """Files a stranger may hand over, written into ``folder``: code in pickles, forged
    dtypes, exponential and deep nesting, shared references that copy into gigabytes, small
    files that ask for gigabytes, a JPEG that takes minutes to decode, special files (a FIFO,
    a link to ``/dev/zero``), broken archives and images, JSON of the wrong shape. Running any
    of them must not create ``marker``."""
    import numpy as np
    from PIL import Image

    from tests.test_safe_pickle import _ArrayOf, _Exploit, _ForgedDtype

    nest: list[object] = []
    for _ in range(60):
        nest = [nest, nest]
    f8 = b"cnumpy\ndtype\n(X\x02\x00\x00\x00f8tR"
    huge = b"(J\x00\x00\x00\x40t"  # the tuple (2**30,)
    one_image = np.zeros((100, 100, 3), np.float32)  # 120 KB; copied 200,000 times: 24 GB
    one_array = np.zeros(1_000_000, np.int64)  # 8 MB; in 1,000 setups: 8 GB
    one_pil = Image.new("RGB", (200, 200))  # 120 KB; copied 30,000 times: 3.6 GB
    files = {
        "special.fifo": b"",
        "special.devzero": b"",
        "shared_images.pkl": pickle.dumps([(one_image, 0)] * 200_000, protocol=4),
        "shared_pil_images.pkl": pickle.dumps([(one_pil, 0)] * 30_000, protocol=2),
        "shared_setups.pkl": pickle.dumps(
            [{"target class": 0, "base class": 1, "target index": 0, "base indices": one_array}]
            * 1_000, protocol=4),
        "many_scans.jpg": _many_scans_jpeg(6000, 3000),
        "zero_pixel_images.npz": _npz({"images.npy": _npy_header((2**28, 0, 0)),
                                       "labels.npy": _npy_header((2**28,), "<i8") + b"\0" * 64}),
        "inflating.pt": _inflating_pt(0xF000_0000),
        "code.pkl": pickle.dumps({"data": _Exploit(str(marker))}, protocol=2),
        "forged_dtype.pkl": pickle.dumps({"data": _ArrayOf(_ForgedDtype())}, protocol=2),
        "shared_dag.pkl": pickle.dumps(nest),
        "deep.pkl": b"(" * 200_000 + b"l" * 200_000 + b".",
        "huge_array.pkl": b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + huge
                          + f8 + b"tR.",
        "huge_bytes.pkl": b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"x" * 16,
        "huge_string.pkl": b"\x80\x04\x8d" + (1 << 40).to_bytes(8, "little") + b"x" * 16,
        "huge_long.pkl": b"\x80\x02\x8b\xff\xff\xff\x7f" + b"\x01" * 16,
        "truncated.pkl": pickle.dumps({"labels": list(range(100))})[:-20],
        "wrong_types.pkl": pickle.dumps({"data": "text", "labels": None, "xtrain": 3,
                                         "ytrain": [1.5], "poison_indices": "x"}),
        "list_of_junk.pkl": pickle.dumps([(1, 2, 3), ("a", None), [None, "b"]]),
        "float_indices.pkl": pickle.dumps(np.array([0.5, 1.7])),
        "empty": b"",
        "noise.bin": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "zeros_2gib.npz": _npz({"images.npy": _npy_header((2**31,)) + b"\0" * 4096}),
        "object_array.npz": _npz({"images.npy": _npy_header((4,), "|O") + b"\0" * 32}),
        "short_data.npz": _npz({"images.npy": _npy_header((5, 3, 8, 8)) + b"\0" * 10,
                                "labels.npy": _npy_header((5,), "<i8")}),
        "cut.npz": _npz({"images.npy": _npy_header((5, 3, 8, 8)) + b"\0" * 960})[:-30],
        "bomb.png": _png(65_000, 65_000),
        "cut.png": _png(8, 8)[:30],
        "list.json": b"[1, 2, 3]",
        "empty_object.json": b"{}",
        "deep.json": b"[" * 100_000 + b"]" * 100_000,
        "huge_number.json": b'{"eps": 1e999999, "target_class": 99999999999999999999}',
        "lines.jsonl": b'{}\n[]\n{"key": "k", "test_acc": null}\nnot json\n{"key"',
    }
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


LOADERS = ["safe_load", "metapoison", "setups", "npz", "result_store", "model_weights", "cifar",
           "benchmark", "poison_set", "image_folder"]


@pytest.mark.parametrize("loader", LOADERS)
def test_every_hostile_file_through_every_reader(loader: str, tmp_path: Path) -> None:
    """Each reader either reads a file (or skips it, saying so) or refuses it with an error
    that names it; never code run, a crash, a hang, a memory blow-up or a bare traceback."""
    import json
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    (tmp_path / "files").mkdir()
    files = hostile_files(tmp_path / "files", marker)
    script = Path(__file__).parent / "scripts" / "hostile_loaders.py"
    root = Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, str(script), loader, str(tmp_path / "work"), *map(str, files)],
        capture_output=True, text=True, timeout=600, cwd=root,
        env=os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    results = [r for r in lines if "outcome" in r]
    started = [r for r in lines if "start" in r]
    assert proc.returncode == 0, (f"the reader died (code {proc.returncode}) on "
                                  f"{started[-1] if started else '?'}: {proc.stderr[-2000:]}")
    assert len(results) == len(started) and len(results) >= len(files)
    assert not marker.exists()
    bad = []
    for r in results:
        where = r["slot"] or r["file"]
        if r["outcome"] == "timeout":
            bad.append(f"{r['file']} as {where}: no answer within the time limit")
        elif r["outcome"] == "error":
            # the path the reader was given, or within it the file that failed
            named = r["target"] in r["message"] or (not r["slot"] and r["file"] in r["message"])
            if not ({"ValueError", "OSError"} & set(r["bases"])) or not named:
                bad.append(f"{r['file']} as {where}: {r['type']}: {r['message'][:200]}")
    assert not bad, "\n".join(bad)


# --- second round: decode time, compressed and shared-reference bombs, special files -----

def _two_class_folder(root: Path) -> Path:
    from PIL import Image

    for name, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{i}.png")
    return root


def test_a_jpeg_that_repeats_a_scan_is_skipped_within_its_bound(tmp_path: Path) -> None:
    """Decoding a progressive JPEG passes over the whole image once per scan: 1,000 copies of
    a scan in 14 KB make a 2000 x 2000 image cost a thousand decodes. Scans x pixels is
    bounded (MAX_SCAN_PIXELS), so the file is skipped from its markers, before decoding; an
    ordinary progressive JPEG (10 scans) of the same size is read."""
    import time

    from epic.images import MAX_SCAN_PIXELS, read_image_folder

    root = _two_class_folder(tmp_path / "data")
    (root / "cat" / "scans.jpg").write_bytes(_many_scans_jpeg(2000, 1000))
    (root / "dog" / "plain.jpg").write_bytes(_many_scans_jpeg(2000, 0))
    assert 11 * 2000 * 2000 < MAX_SCAN_PIXELS < 1000 * 2000 * 2000
    start = time.perf_counter()
    folder = read_image_folder(root, image_size=16)
    seconds = time.perf_counter() - start
    assert [(s.file, s.reason.split(" JPEG")[0]) for s in folder.skipped] == [
        ("cat/scans.jpg", "1,010")]
    assert "dog/plain.jpg" in folder.files
    assert seconds < 10  # reading the 2000 x 2000 plain one included


def test_weights_whose_records_inflate_to_gigabytes_are_refused_unread(tmp_path: Path) -> None:
    """torch inflates a deflated record to the size the archive declares, with no limit: the
    declared sizes are checked against one first (--model, --pretrained)."""
    from epic.cli.common import _load_weights

    path = tmp_path / "model.pt"
    path.write_bytes(_inflating_pt(0xF000_0000))
    with pytest.raises(ValueError, match=f"{path}: its records declare 4,026,532,0.. bytes "
                                         "once inflated, over the limit of 2,147,483,648"):
        _load_weights(str(path))


def test_every_array_of_an_npz_counts_toward_its_limit(tmp_path: Path) -> None:
    """Zero-byte images of shape (2**28, 0, 0) pass a check of the images alone, and make
    the labels 2 GiB; every array is counted, and images need a pixel."""
    from epic.images import read_npz

    path = tmp_path / "set.npz"
    path.write_bytes(_npz({"images.npy": _npy_header((2**28, 0, 0)),
                           "labels.npy": _npy_header((2**28,), "<i8") + b"\0" * 64}))
    with pytest.raises(ValueError, match=r"set.npz: its arrays \(images \(268435456, 0, 0\), "
                                         r"labels \(268435456,\)\) declare 2,147,483,648 bytes"):
        read_npz(path)
    path.write_bytes(_npz({"images.npy": _npy_header((4, 0, 0)),
                           "labels.npy": _npy_header((4,), "<i8") + b"\0" * 32}))
    with pytest.raises(ValueError, match="with at least one pixel"):
        read_npz(path)


@pytest.mark.parametrize("kind", ["fifo", "devzero", "folder"])
def test_special_files_are_refused_by_every_opener(kind: str, tmp_path: Path) -> None:
    """A FIFO must not block, /dev/zero must not be read until memory runs out."""
    from epic.io.files import UntrustedFileError, read_json

    path = tmp_path / "poisons.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    with pytest.raises(UntrustedFileError, match=f"^{path}: not a regular file"):
        read_json(path)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from epic.images import read_image_folder

    for name, row in (("a", [0, 32896, 65535]), ("b", [65535, 257, 0])):
        (tmp_path / name).mkdir()
        img = Image.fromarray(np.array([row] * 3, dtype=np.uint16))
        assert img.mode.startswith("I")
        img.save(tmp_path / name / "wide.png")
    folder = read_image_folder(tmp_path)
    assert folder.data.images[:, 0, 0].tolist() == [[0, 128, 255], [255, 1, 0]]


def test_outputs_replace_a_planted_link_instead_of_writing_through_it(  # type: ignore[no-untyped-def]
        tmp_path, tiny_data) -> None:
    from epic.bench.report import write_report
    from epic.poisons import PoisonSet
    from epic.training import TrainConfig
    from epic.training import train as train_model
    from tests.conftest import seeded_convnet

    train, test = tiny_data
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    names = ("model.pt", "poisons.json", "poisons.npz", "report.html", "summary.md")
    for name in names:
        (out / name).symlink_to(victim)
    train_model(seeded_convnet(train), train, test, TrainConfig(epochs=1), out=out)
    PoisonSet(indices=torch.tensor([1]), images=train.images[[1]].clone(),
              target_images=train.images[:1].clone(), target_class=0, adversarial_class=1,
              eps=8 / 255).save(out)
    write_report([], out)
    assert victim.read_text() == "keep me"
    for name in names:
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name


def test_csv_cells_that_a_spreadsheet_runs_are_neutralized(tmp_path: Path) -> None:
    import csv

    from epic.scan import _write_rows

    names = ["\n=1+1", "\uff1dcmd()", "\uff0b1", "\uff20x", "=1", "plain",
             os.fsdecode(b"caf\xe9.png")]
    _write_rows(tmp_path / "x.csv", ("file",), [(n,) for n in names])
    raw = (tmp_path / "x.csv").read_bytes()
    assert b"caf\\xe9.png" in raw and b"\\udce9" not in raw
    with open(tmp_path / "x.csv", newline="", encoding="utf-8") as f:
        cells = [row[0] for row in csv.reader(f)][1:]
    assert cells == ["'\n=1+1", "'\uff1dcmd()", "'\uff0b1", "'\uff20x", "'=1", "plain",
                     "caf\\xe9.png"]


def _record(run_dir: str, **fields: object) -> str:
    import json

    record = {"key": "bp/transfer", "scenario": "transfer", "attack": "bp",
              "defense": "epic-0.1", "seed": 0, "poisons_dir": "p", "schedule": {},
              "config": {}, "run_dir": run_dir, "attack_success": 0.0, "test_acc": 0.5,
              "seconds": 1.0} | fields
    return json.dumps(record) + "\n"


def test_a_strangers_store_is_reported_from_its_own_folder_or_refused_by_name(  # type: ignore[no-untyped-def]
        tmp_path, capsys) -> None:
    store = tmp_path / "bench" / "results.jsonl"
    store.parent.mkdir()
    elsewhere = tmp_path / "elsewhere" / "run-1"
    elsewhere.mkdir(parents=True)
    (elsewhere / "defense.json").write_text('{"not": "rounds"}')
    store.write_text(_record(str(elsewhere)))
    report = ["bench", "report", str(store), "--out", str(tmp_path / "report")]
    assert main(report) == 0  # run_dir only names a folder of bench/trials/: none here
    capsys.readouterr()
    run = tmp_path / "bench" / "trials" / "run-1"
    run.mkdir(parents=True)
    (run / "defense.json").write_text('[{"epoch": "x", "dropped": []}]')
    assert fails(report, capsys) == (f"epic: error: {run / 'defense.json'}: round 0 'epoch' is "
                                     "missing or malformed")
    (run / "defense.json").unlink()
    os.mkfifo(run / "defense.json")
    assert fails(report, capsys) == (f"epic: error: {run / 'defense.json'}: not a regular file "
                                     "(a FIFO)")
    store.write_text(_record(str(elsewhere), dp_epsilon=[1]))
    assert fails(report, capsys) == f"epic: error: no records in {store}"


@pytest.mark.parametrize(("argv", "message"), [
    (["bench"], "'argv' is not an `epic bench run` command line: 'bench'"),
    (["train", "--epochs", "1"], "'argv' is not an `epic bench run` command line"),
    (["bench", "run", "--data-dir"], "'argv' ends at --data-dir"),
])
def test_a_malformed_stored_command_line_is_refused_by_name(  # type: ignore[no-untyped-def]
        argv, message, tmp_path, capsys) -> None:
    store = tmp_path / "results.jsonl"
    store.write_text(_record("run", argv=argv))
    err = fails(["bench", "rerun", str(store), "0", "--data-dir", str(tmp_path)], capsys)
    assert err.startswith(f"epic: error: row 0 of {store}: {message}")


@pytest.mark.parametrize(("dtype", "meta", "message"), [
    ("bool", {}, "'indices' must be integers, got torch.bool"),
    ("complex64", {}, "'indices' must be integers, got torch.complex64"),
    ("int64", {"setup": "x"}, "'metadata' 'setup' must be an object with an integer 'id'"),
    ("int64", {"setup": {"id": [0]}}, "'metadata' 'setup' must be an object with an integer"),
    ("int64", {"clean_label": "no"}, "'metadata' 'clean_label' must be true or false"),
])
def test_poison_sets_that_would_pass_silently_or_fail_after_training(  # type: ignore[no-untyped-def]
        dtype, meta, message, tmp_path, tiny_data) -> None:
    """Boolean or complex indices became integers; a malformed 'setup' trained a whole trial
    and then failed to store it, or was a TypeError."""
    import json

    import numpy as np

    from epic.poisons import PoisonSet, PoisonSetError

    train, _ = tiny_data
    folder = tmp_path / "set"
    PoisonSet(indices=torch.tensor([1, 2]), images=train.images[[1, 2]].clone(),
              target_images=train.images[:1].clone(), target_class=0, adversarial_class=1,
              eps=8 / 255, metadata=meta).save(folder)
    with np.load(folder / "poisons.npz") as npz:
        arrays = dict(npz)
    arrays["indices"] = np.array([1, 2]).astype(dtype)
    np.savez(folder / "poisons.npz", **arrays)
    assert json.loads((folder / "poisons.json").read_text())["metadata"] == meta
    with pytest.raises(PoisonSetError, match=f"{folder}: poisons.(npz|json) {message}"):
        PoisonSet.load(folder, train)


def test_labels_and_pixels_that_would_pass_silently(tiny_data) -> None:  # type: ignore[no-untyped-def]
    """Boolean labels became 0 and 1; NaN pixels became 0; text pixels were a numpy error."""
    import numpy as np

    from epic import gradient_embeddings
    from epic.data import ImageData
    from epic.formats.untrusted import to_chw
    from epic.poisons import PoisonSetError
    from tests.conftest import seeded_convnet

    train, _ = tiny_data
    with pytest.raises(ValueError, match="labels must be integers, got torch.bool"):
        ImageData.from_arrays(train.images.numpy(), np.arange(60) % 2 == 0)
    pairs = [(train.images[i].float() / 255, torch.tensor(True)) for i in range(4)]
    with pytest.raises(TypeError, match="labels must be a 1-d integer batch, got torch.bool"):
        gradient_embeddings(seeded_convnet(train), pairs)
    nan = np.full((8, 8, 3), 0.5, np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(PoisonSetError, match="finite numbers, got a float32 array .* with NaN"):
        to_chw(nan)
    with pytest.raises(PoisonSetError, match="finite numbers, got a \\|S1 array"):
        to_chw(np.full((8, 8, 3), b"a", "S1"))


def test_a_cluster_size_limit_that_drops_nothing_is_refused() -> None:
    from epic import EPIC
    from epic.selection import find_isolated

    x, y = torch.randn(40, 4), torch.arange(40) % 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_cluster_size must be"):
            find_isolated(x, y, 0.2, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_cluster_size must be"):
            EPIC(0.2, max_cluster_size=bad)  # type: ignore[arg-type]
    assert find_isolated(x, y, 0.2, 2).sum() >= find_isolated(x, y, 0.2, 1).sum()


def test_craft_and_defense_options_that_would_do_nothing_or_crash(  # type: ignore[no-untyped-def]
        tmp_path, capsys) -> None:
    out = tmp_path / "poisons"
    assert fails(["craft", "--attack", "patch", "--source-class", "1", "--adversarial-class",
                  "1", "--out", str(out)], capsys) == (
        "epic: error: --adversarial-class 1: the same class as --source-class; a backdoor "
        "moves one class to another")
    assert fails(["craft", "--attack", "bp", "--target-index", "0", "--adversarial-class",
                  "1", "--out", str(out)], capsys) == (  # test image 0 is a 1
        "epic: error: --adversarial-class 1: the target (--target-index 0) is of that class "
        "already")
    assert not (out / "clean_model").exists()
    assert fails(["train", "--defense", "epic", "--defense-option", "warmup=abc", "--out",
                  str(tmp_path / "run")], capsys) == (
        "epic: error: defense epic option warmup='abc': expected int or none")


def test_a_folder_nested_1500_deep_is_skipped_by_name(tmp_path: Path) -> None:
    """Walking it recursively overflowed the stack and failed the whole scan unnamed."""
    from epic.images import MAX_DEPTH, read_image_folder

    root = _two_class_folder(tmp_path / "data")
    made = [root / "cat"]
    for _ in range(1500):
        made.append(made[-1] / "d")
        made[-1].mkdir()
    try:
        folder = read_image_folder(root)
    finally:  # bottom up: removing it recursively (pytest's cleanup) overflows the stack too
        for path in reversed(made[1:]):
            path.rmdir()
    assert len(folder.files) == 4
    assert [(s.file, s.reason) for s in folder.skipped] == [
        ("cat" + "/d" * (MAX_DEPTH + 1), f"a folder nested over {MAX_DEPTH} deep: not read")]


def test_bench_run_on_a_poison_folder_holding_a_fifo_is_refused_by_name(  # type: ignore[no-untyped-def]
        tmp_path, capsys) -> None:
    (tmp_path / "p").mkdir()
    os.mkfifo(tmp_path / "p" / "poisons.json")
    (tmp_path / "p" / "poisons.npz").write_bytes(b"")
    err = fails(["bench", "run", "--poisons", str(tmp_path / "p"), "--defenses", "none",
                 "--out", str(tmp_path / "bench")], capsys)
    assert err.startswith(f"epic: error: cannot read a poison set at {tmp_path / 'p'}: ")
    assert err.endswith("poisons.json: not a regular file (a FIFO)")


def test_a_defended_run_that_cannot_defend_is_an_error(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """It trained undefended and exited 0 after a warning (the default until, the last
    milestone, is epoch 2 of 4 here); scan already made it an error."""
    assert fails(["train", "--epochs", "4", "--defense", "epic", "--warmup", "2", "--every",
                  "1", "--out", str(tmp_path / "run")], capsys) == (
        "epic: error: no epic round runs in 4 epochs: --warmup 2, --every 1, --until 2 "
        "(--until defaults to the last learning-rate milestone); train longer, or pass a "
        "smaller --warmup or a larger --until")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_train_reports_every_epoch_where_no_progress_bar_is_drawn(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Piped or logged (stderr not a terminal), it printed nothing until the end."""
    assert main(["train", "--epochs", "3", "--eval-every", "2", "--defense", "epic", "--warmup",
                 "1", "--every", "1", "--until", "3", "--out", str(tmp_path / "run")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split(", ")[0].split(" train loss ")[0] for line in lines] == [
        "epoch 0:", "epoch 1:", "epoch 2:"]
    assert "test accuracy" not in lines[0] and "test accuracy" in lines[1]
    assert "defense round" not in lines[0] and "defense round" in lines[1] + lines[2]


def test_update_errors_say_what_to_do(tiny_data) -> None:  # type: ignore[no-untyped-def]
    """String labels, (x, y, file name) items, a model returning a dict, a plain list of
    pairs and out-of-range labels surfaced torch's own words, or blamed the wrong thing."""
    import numpy as np

    from epic import EPIC, find_poisons
    from tests.conftest import seeded_convnet

    train, _ = tiny_data
    model = seeded_convnet(train)
    x = [train.images[i].float() / 255 for i in range(6)]

    class Items(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self, item):  # type: ignore[no-untyped-def]
            self.item = item

        def __len__(self) -> int:
            return 6

        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            return self.item(i)

    def update(data, m=model):  # type: ignore[no-untyped-def]
        EPIC(0.5, warmup=0, every=1, num_examples=6).update(m, data, 0)

    with pytest.raises(TypeError, match="labels must be integer class indices 0..C-1 \\(map "
                                        "class names to indices first\\); got str 'cat'"):
        update(Items(lambda i: (x[i], "cat")))
    with pytest.raises(TypeError, match="the third element must be the examples' integer "
                                        "indices .* got str 'a.png'"):
        update(Items(lambda i: (x[i], i % 3, "a.png")))
    with pytest.raises(TypeError, match="batch 0 is one example \\(x, y\\), not a batch: a list "
                                        "of examples is not a Dataset"):
        update([(x[i], i % 3) for i in range(6)])
    with pytest.raises(ValueError, match="label 7 is outside 0..2: the model gives 3 logits"):
        update(Items(lambda i: (x[i], 7)))

    class Dict(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x):  # type: ignore[no-untyped-def]
            return {"logits": self.net(x)}

    with pytest.raises(TypeError, match="the model returned a dict, not logits \\(B, C\\): pass "
                                        "logits_fn"):
        update(Items(lambda i: (x[i], i % 3)), Dict())
    probs = np.full((199, 2), 0.5)
    with pytest.raises(ValueError, match="pred_probs has 199 rows and labels 200"):
        find_poisons(np.arange(200) % 2, probs)


def test_scan_offers_only_what_it_does_and_its_page_wraps_names_between_parts(  # type: ignore[no-untyped-def]
        tmp_path, tiny_data, capsys) -> None:
    """--eval-every was offered though a scan evaluates no test set; file names broke
    mid-word; an empty skipped table was drawn."""
    from epic.scan import Flag, ScanResult, write_html

    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    assert "--eval-every" not in capsys.readouterr().out
    train, _ = tiny_data
    name = "a_very_long_folder-name/with.parts.png"
    result = ScanResult(train, tuple(f"f{i}" for i in range(60)),
                        (Flag(3, name, "r", 1, 1, 0),), ())
    write_html(result, tmp_path / "scan.html")
    page = (tmp_path / "scan.html").read_text()
    assert "a_<wbr>very_<wbr>long_<wbr>folder-<wbr>name/<wbr>with.<wbr>parts.<wbr>png" in page
    assert "overflow-wrap: anywhere" not in page
    assert "<p>No file was skipped.</p>" in page and "<th>reason</th>" not in page


def test_a_model_file_torch_refuses_is_named_in_a_whole_sentence(tmp_path: Path) -> None:
    import argparse

    from epic.cli.common import _load_weights

    path = tmp_path / "model.pt"
    torch.save({"w": argparse.Namespace()}, path)
    with pytest.raises(ValueError) as refused:
        _load_weights(str(path))
    assert str(refused.value) == (f"{path} is not a model file that torch.load reads safely "
                                  "(UnpicklingError: Weights only load failed.)")


def test_the_readme_s_submodule_names_work_after_import_epic() -> None:
    import subprocess
    import sys

    code = ("import epic; print(epic.images.read_image_folder.__name__, epic.scan.scan.__name__)"
            "; epic.nothing")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parent.parent,
                         env=os.environ | {"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert run.stdout.split() == ["read_image_folder", "scan"]
    assert run.stderr.strip().splitlines()[-1] == (
        "AttributeError: module 'epic' has no attribute 'nothing'")


def test_resuming_from_a_checkpoint_that_inflates_to_gigabytes_is_refused(  # type: ignore[no-untyped-def]
        tmp_path, tiny_data) -> None:
    from epic.io.safe_pickle import UnsafePickleError
    from epic.training import TrainConfig
    from epic.training import train as train_model
    from tests.conftest import seeded_convnet

    train, test = tiny_data
    (tmp_path / "checkpoint.pt").write_bytes(_inflating_pt(0xF000_0000))
    with pytest.raises(UnsafePickleError, match="checkpoint.pt: its records declare"):
        train_model(seeded_convnet(train), train, test, TrainConfig(epochs=1), out=tmp_path,
                    resume=True)
