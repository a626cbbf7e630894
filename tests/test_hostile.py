"""Careless and hostile input on the command line: every bad value is a short error naming it,
before any work starts; never a traceback, never silent nonsense."""

from __future__ import annotations

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
     "argument --eps: must be in (0, 255], got 300"),
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
    from epic.safe_pickle import UnsafePickleError, safe_load

    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"labels": list(range(100))})[:-20])
    with open(path, "rb") as f, pytest.raises(UnsafePickleError, match=f"{path}: not a readable"):
        safe_load(f)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_of_every_pickle_protocol_load(protocol: int) -> None:
    import io

    import numpy as np

    from epic.safe_pickle import safe_load

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = safe_load(io.BytesIO(pickle.dumps({"x": a, "n": np.int64(3)}, protocol=protocol)))
    assert type(back["x"]) is np.ndarray and np.array_equal(back["x"], a) and back["n"] == 3


@pytest.mark.parametrize("call", ["reconstruct", "ndarray"])
def test_a_tiny_pickle_cannot_ask_for_a_huge_array(call: str) -> None:
    import io

    from epic.safe_pickle import UnsafePickleError, safe_load

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
