"""Exchange formats: benchmark layout, MetaPoison-style pickle, and hostile pickles."""

from __future__ import annotations

import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from epic.cli import main
from epic.data import ImageData, load_digits
from epic.formats import (
    FORMATS,
    PilStandIn,
    export_benchmark,
    export_metapoison,
    import_benchmark,
    import_metapoison,
    read_poisons,
    read_untrusted_pickle,
)
from epic.io.safe_pickle import UnsafePickleError
from epic.poisons import PoisonSet, PoisonSetError


def _train(channels: int = 3, n: int = 40, side: int = 8) -> ImageData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, side, side), generator=g).to(torch.uint8)
    labels = torch.arange(n) % 4
    return ImageData.from_arrays(images, labels, ("a", "b", "c", "d"))


def _poisons(train: ImageData, *, trigger: bool = False, relabel: bool = False) -> PoisonSet:
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([1, 5, 9, 13])  # all of class 1
    base = train.images[idx].short()
    noise = torch.randint(-8, 9, base.shape, generator=g).short()
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    c = train.shape[0]
    return PoisonSet(
        indices=idx, images=images,
        target_images=torch.zeros((0, *train.shape), dtype=torch.uint8) if trigger
        else train.images[2:3].clone(),
        target_class=2 if not trigger else 0, adversarial_class=1, eps=8 / 255,
        labels=torch.full((4,), 3) if relabel else None,
        trigger=torch.full((c, 2, 2), 255, dtype=torch.uint8) if trigger else None,
        metadata={"attack": "test", "seed": 3, "clean_label": not relabel})


def _same(a: PoisonSet, b: PoisonSet) -> None:
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.target_images, b.target_images)
    assert (a.target_class, a.adversarial_class, a.eps) == (b.target_class, b.adversarial_class,
                                                            b.eps)
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert b.labels is not None and torch.equal(a.labels, b.labels)
    assert (a.trigger is None) == (b.trigger is None)
    if a.trigger is not None:
        assert b.trigger is not None and torch.equal(a.trigger, b.trigger)
    assert a.metadata == b.metadata


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("pil", [True, False])
@pytest.mark.parametrize("kind", ["targeted", "backdoor", "relabelled"])
def test_benchmark_round_trip_is_identical(tmp_path: Path, channels: int, pil: bool,
                                           kind: str) -> None:
    if pil:
        pytest.importorskip("PIL")
    train = _train(channels)
    ps = _poisons(train, trigger=kind == "backdoor", relabel=kind == "relabelled")
    export_benchmark(ps, tmp_path, pil=pil)
    assert {"poisons.pickle", "base_indices.pickle"} <= set(os.listdir(tmp_path))
    _same(ps, import_benchmark(tmp_path, train))
    _same(ps, import_benchmark(tmp_path))


def test_benchmark_files_hold_what_the_benchmark_expects(tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    train = _train(3)
    ps = _poisons(train)
    export_benchmark(ps, tmp_path)
    with open(tmp_path / "poisons.pickle", "rb") as f:
        raw = pickle.load(f)  # trusted here: we wrote it
    assert isinstance(raw, list) and len(raw) == 4
    img, label = raw[0]
    assert isinstance(img, image_mod.Image) and img.size == (8, 8) and label == 1
    assert np.array_equal(np.asarray(img), ps.images[0].numpy().transpose(1, 2, 0))
    with open(tmp_path / "base_indices.pickle", "rb") as f:
        assert list(pickle.load(f)) == [1, 5, 9, 13]
    with open(tmp_path / "target.pickle", "rb") as f:
        timg, tlabel = pickle.load(f)
    assert tlabel == 2 and np.array_equal(np.asarray(timg),
                                          train.images[2].numpy().transpose(1, 2, 0))


def test_import_without_sidecar_infers_eps_and_classes(tmp_path: Path) -> None:
    train = _train(3)
    ps = _poisons(train)
    export_benchmark(ps, tmp_path, pil=False)
    (tmp_path / "epic.json").unlink()
    got = import_benchmark(tmp_path, train)
    assert got.adversarial_class == 1 and got.target_class == 2 and got.labels is None
    assert got.eps == 8 / 255  # the largest change of a pixel: the +-8 of _poisons' noise
    with pytest.raises(PoisonSetError, match="eps"):
        import_benchmark(tmp_path)


def test_import_rejects_poisons_outside_eps(tmp_path: Path) -> None:
    train = _train(3)
    ps = _poisons(train)
    export_benchmark(ps, tmp_path, pil=False)
    with open(tmp_path / "poisons.pickle", "rb") as f:
        raw = pickle.load(f)
    img = raw[0][0].copy()
    img[0, 0, 0] = 255 - train.images[1, 0, 0, 0].item()  # far from the base
    raw[0] = (img, raw[0][1])
    with open(tmp_path / "poisons.pickle", "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(PoisonSetError, match="exceed eps"):
        import_benchmark(tmp_path, train)


def test_import_rejects_changed_labels_of_a_clean_label_set(tmp_path: Path) -> None:
    train = _train(3)
    export_benchmark(_poisons(train), tmp_path, pil=False)
    with open(tmp_path / "poisons.pickle", "rb") as f:
        raw = pickle.load(f)
    raw[0] = (raw[0][0], 0)
    with open(tmp_path / "poisons.pickle", "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(PoisonSetError, match="label"):
        import_benchmark(tmp_path, train)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_raises_and_executes_nothing(tmp_path: Path) -> None:
    train = _train(3)
    export_benchmark(_poisons(train), tmp_path, pil=False)
    marker = tmp_path / "pwned"
    with open(tmp_path / "poisons.pickle", "wb") as f:
        pickle.dump([(_Evil(marker), 1)], f)
    with pytest.raises(UnsafePickleError):
        import_benchmark(tmp_path, train)
    assert not marker.exists()
    for proto in (0, 2, 4):
        path = tmp_path / f"evil{proto}.pickle"
        path.write_bytes(pickle.dumps({"xtrain": _Evil(marker)}, protocol=proto))
        with pytest.raises(UnsafePickleError):
            read_untrusted_pickle(path)
        with pytest.raises(UnsafePickleError):
            import_metapoison(path, train)
    assert not marker.exists()


def test_pil_stand_in_refuses_other_reconstructions(tmp_path: Path) -> None:
    # A pickle naming copyreg._reconstructor for anything but the PIL stand-in is refused.
    payload = (b"ccopyreg\n_reconstructor\n(cos\nsystem\nc__builtin__\nobject\nNtR.")
    path = tmp_path / "p.pickle"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError):
        read_untrusted_pickle(path)


@pytest.mark.parametrize("proto", [0, 2, 4])
def test_real_pil_pickles_load_as_arrays(tmp_path: Path, proto: int) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    path = tmp_path / "img.pickle"
    path.write_bytes(pickle.dumps([(image_mod.fromarray(arr), 7)], protocol=proto))
    (img, label), = read_untrusted_pickle(path)
    assert isinstance(img, PilStandIn) and label == 7
    assert np.array_equal(img.to_array(), arr)


@pytest.mark.parametrize("kind", ["targeted", "backdoor", "relabelled"])
def test_metapoison_round_trip(tmp_path: Path, kind: str) -> None:
    train = _train(3)
    ps = _poisons(train, trigger=kind == "backdoor", relabel=kind == "relabelled")
    path = export_metapoison(ps, train, tmp_path / "mp.pickle")
    record = read_untrusted_pickle(path)
    assert record["xtrain"].shape == (40, 8, 8, 3)
    _same(ps, import_metapoison(path, train))
    # without the index list, poisons are found by comparison with the clean set
    del record["poison_indices"]
    with open(path, "wb") as f:
        pickle.dump(record, f)
    got = import_metapoison(path, train)
    changed = (ps.images != train.images[ps.indices]).flatten(1).any(1)
    if kind == "relabelled":
        changed |= True
    assert torch.equal(got.indices, ps.indices[changed])


def test_wrong_kinds_of_fields_are_refused_by_file_and_field(tmp_path: Path) -> None:
    """Float indices were truncated, a sidecar without a key or a list for it was a KeyError
    or TypeError, MetaPoison's float labels were cast: each is now an error naming both."""
    train = _train(3)
    ps = _poisons(train)
    export_benchmark(ps, tmp_path, pil=False)
    good = (tmp_path / "base_indices.pickle").read_bytes()
    (tmp_path / "base_indices.pickle").write_bytes(pickle.dumps(np.array([0.5, 2.7, 4.0])))
    refused = re.escape(f"{tmp_path}: base_indices.pickle must be integers")
    with pytest.raises(PoisonSetError, match=refused):
        import_benchmark(tmp_path, train)
    (tmp_path / "base_indices.pickle").write_bytes(good)
    for side, message in (('{"eps": 0.03}', "lacks 'target_class'"),
                          ("[1, 2]", "must hold an object"),
                          ('{"eps": 0.03, "target_class": "2", "adversarial_class": 1, '
                           '"relabelled": false}', "'target_class' must be an integer")):
        (tmp_path / "epic.json").write_text(side)
        with pytest.raises(PoisonSetError, match=re.escape(f"{tmp_path}: epic.json {message}")):
            import_benchmark(tmp_path, train)
    path = tmp_path / "mp.pkl"
    export_metapoison(ps, train, path)
    with open(path, "rb") as f:
        record = pickle.load(f)
    record["ytrain"] = record["ytrain"].astype(np.float32)
    path.write_bytes(pickle.dumps(record))
    with pytest.raises(PoisonSetError, match=re.escape(f"{path}: 'ytrain' must be integers")):
        import_metapoison(path, train)


# ----------------------------------------------------------------------------- the registry


def test_read_poisons_recognizes_every_built_in_format(tmp_path: Path) -> None:
    train, _ = load_digits()
    base = (train.labels == 1).nonzero().squeeze(1)[:5]  # a clean-label set's bases
    images = train.images[base].clone()
    images[:, :, 0, 0] = torch.where(images[:, :, 0, 0] > 100, images[:, :, 0, 0] - 3,
                                     images[:, :, 0, 0] + 3)
    poisons = PoisonSet(indices=base, images=images, target_images=train.images[7:8],
                        target_class=int(train.labels[7]), adversarial_class=1, eps=4 / 255)
    written = {"epic": poisons.save(tmp_path / "ours"),
               "benchmark": export_benchmark(poisons, tmp_path / "bench"),
               "metapoison": export_metapoison(poisons, train, tmp_path / "mp.pickle")}
    for name, path in written.items():
        back = read_poisons(path, train)
        assert torch.equal(back.images, poisons.images) and torch.equal(back.indices, base), name
        assert FORMATS[name].recognizes(Path(path))
    with pytest.raises(PoisonSetError, match="not a poison set in any known format.*epic: "):
        read_poisons(tmp_path, train)
    with pytest.raises(PoisonSetError, match="unknown poison format 'tar'"):
        read_poisons(tmp_path, train, format="tar")


@pytest.mark.usefixtures("registries")
def test_the_worked_example_format_needs_nothing_but_its_file(tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                              capsys) -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "attacks.md"
    source = next(block for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
                  if "register_format" in block)
    module = types.ModuleType("flat")
    monkeypatch.setitem(sys.modules, "flat", module)
    exec(compile(source, str(doc), "exec"), module.__dict__)  # noqa: S102
    assert main(["craft", "--attack", "bp", "--iterations", "2", "--epochs", "1", "--budget",
                 "6", "--export", "flat-npz", "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 0
    flat = tmp_path / "p" / "poisons_flat.npz"
    train, _ = load_digits()
    ours, theirs = PoisonSet.load(tmp_path / "p", train), read_poisons(flat, train)
    assert torch.equal(ours.images, theirs.images) and torch.equal(ours.indices, theirs.indices)
    assert (ours.target_class, ours.adversarial_class) == (theirs.target_class,
                                                           theirs.adversarial_class)
    capsys.readouterr()
    assert main(["train", "--poisons", str(flat), "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert "poisons dropped 0 of 6" in capsys.readouterr().out
