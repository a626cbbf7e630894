from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
import torch

from epic.data import Augment, ImageData, augment_batch, iterate_batches, load_cifar, load_digits
from epic.io.safe_pickle import UnsafePickleError

from .conftest import cifar_root, requires_cifar


def _fake_cifar(folder, n=20, exploit=None):  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n)), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(exploit if (exploit is not None and name == "data_batch_3") else batch,
                        f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)


def test_digits_split_is_stratified_and_fixed() -> None:
    train, test = load_digits()
    assert len(train) + len(test) == 1797
    assert train.images.dtype == torch.uint8 and train.shape == (1, 8, 8)
    # a quarter of each class's 178, 182, 177, 183, 181, 182, 181, 179, 174 and 180 images
    per_class = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert torch.bincount(test.labels).tolist() == [44, 46, 44, 46, 45, 46, 45, 45, 44, 45]
    assert (torch.bincount(train.labels) + torch.bincount(test.labels)).tolist() == per_class
    # every image exactly once, in one of the two
    from sklearn.datasets import load_digits as sklearn_digits

    everything = sorted(tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(
        torch.cat([train.images, test.images]), torch.cat([train.labels, test.labels]),
        strict=True))
    raw = sklearn_digits()
    pixels = np.round(raw.images * (255 / 16)).astype(np.uint8).reshape(1797, 64)
    assert everything == sorted(tuple(x.tolist()) + (int(y),) for x, y in zip(
        pixels, raw.target, strict=True))
    again, _ = load_digits()
    assert torch.equal(train.images, again.images)
    assert test.mean == train.mean


def test_cifar_folder_and_archive_read_alike(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from epic.data import datasets

    _fake_cifar(tmp_path / "cifar-10-batches-py")
    train, test = load_cifar("cifar10", tmp_path)
    assert train.images.shape == (100, 3, 32, 32) and len(test) == 20
    assert train.classes[0] == "c0"
    (tmp_path / "arch").mkdir()
    archive = tmp_path / "arch" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(ValueError, match="not the published cifar-10-python.tar.gz"):
        load_cifar("cifar10", tmp_path / "arch")  # an archive that is not the published one
    spec = dataclasses.replace(datasets._CIFAR["cifar10"], md5=datasets._md5(archive))
    monkeypatch.setitem(datasets._CIFAR, "cifar10", spec)  # as if this one were published
    train2, _ = load_cifar("cifar10", tmp_path / "arch")
    assert torch.equal(train.images, train2.images)
    assert torch.equal(train.labels, train2.labels)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os
        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_batch_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    _fake_cifar(tmp_path / "cifar-10-batches-py", exploit=_Exploit(str(marker)))
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()


def test_missing_cifar_says_how_to_get_it(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """In the library's words (its parameter ``download``), and as a flag on the command line."""
    from epic.cli import main

    with pytest.raises(FileNotFoundError, match="set download to fetch it from https://") as e:
        load_cifar("cifar10", tmp_path)
    assert "--" not in str(e.value)
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1"])
    assert "set --download to fetch it" in capsys.readouterr().err


def test_download_that_fails_or_mismatches_leaves_nothing_behind(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import io
    import urllib.error
    import urllib.request

    from epic.data import download_cifar

    def offline(url: str, timeout: float) -> object:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="Without internet"):
        download_cifar("cifar10", tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not it"))
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        download_cifar("cifar10", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_augment_keeps_content_and_is_seeded() -> None:
    x = torch.rand(16, 3, 8, 8)
    a = augment_batch(x, Augment(crop_padding=2), generator=torch.Generator().manual_seed(1))
    b = augment_batch(x, Augment(crop_padding=2), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    # No padding, no flip: identity. Flip only: each image equals itself or its mirror.
    assert torch.equal(augment_batch(x, Augment(crop_padding=0, flip=False)), x)
    f = augment_batch(x, Augment(crop_padding=0, flip=True),
                      generator=torch.Generator().manual_seed(0))
    same = (f == x).flatten(1).all(1) | (f == x.flip(3)).flatten(1).all(1)
    assert same.all()


def test_crop_is_a_shifted_window_of_the_reflect_padded_image() -> None:
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(32, 1, 1, 1)
    out = augment_batch(x, Augment(crop_padding=2, flip=False),
                        generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x[:1], (2, 2, 2, 2), mode="reflect")[0, 0]
    windows = {tuple(padded[r:r + 8, c:c + 8].flatten().tolist())
               for r in range(5) for c in range(5)}
    assert all(tuple(o[0].flatten().tolist()) in windows for o in out)
    assert len({tuple(o[0].flatten().tolist()) for o in out}) > 3


def test_iterate_batches_respects_keep_mask(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    keep = torch.zeros(len(train), dtype=torch.bool)
    keep[::3] = True
    seen = torch.cat([idx for _, _, idx in iterate_batches(train, batch_size=7, keep=keep,
                                                           shuffle=True)])
    assert sorted(seen.tolist()) == list(range(0, len(train), 3))
    with pytest.raises(ValueError, match="bool mask"):
        next(iterate_batches(train, keep=keep.long()))


def test_select_classes_relabels_in_the_given_order() -> None:
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    data = ImageData(images, torch.tensor([0, 1, 2, 0, 1, 2]), ("a", "b", "c"), (0.5,), (0.2,))
    part = data.select_classes([2, 0])
    assert part.classes == ("c", "a")
    assert part.labels.tolist() == [1, 0, 1, 0]
    assert part.images[:, 0, 0, 0].tolist() == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="distinct labels"):
        data.select_classes([0, 0])
    with pytest.raises(ValueError, match="distinct labels"):
        data.select_classes([3])


def test_image_data_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ("a",), (0.5,) * 3,
                  (0.2,) * 3)


@requires_cifar
def test_real_cifar10_matches_its_readme() -> None:
    root = cifar_root()
    train, test = load_cifar("cifar10", root.parent.parent)  # type: ignore[union-attr]
    assert len(train) == 50000 and len(test) == 10000
    assert int(train.labels[0]) == 6 and train.classes[6] == "frog"
    mean = train.images[:, 0].double().mean() / 255
    assert abs(float(mean) - 0.49139968) < 1e-6
