"""Run one of epic's file readers over hostile files under a memory and a time limit.

Usage: ``python hostile_loaders.py LOADER WORKDIR FILE...``. For every file and every slot
of the loader's layout (e.g. ``poisons.pickle`` of a benchmark folder, the other slots holding
valid content), prints a JSON line ``{"file", "slot", "target", "outcome", "type", "bases",
"message"}`` (``target``: the path the reader was given) where
``outcome`` is ``"ok"`` (read, or skipped by the reader), ``"error"`` (an exception), or
``"timeout"``. A ``{"start": ...}`` line is printed and flushed before each attempt, so that
a crash names the file that caused it.

A file named ``*.fifo`` is placed as a FIFO with no writer, one named ``*.devzero`` as a link
to ``/dev/zero``: the special files a stranger's folder may hold where a file is expected.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

MEMORY_HEADROOM = 2 << 30  # bytes a reader may allocate beyond what the process has
SECONDS = 20  # per attempt


class Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: object) -> None:
    raise Timeout


def tiny_train():  # type: ignore[no-untyped-def]
    from epic.data import ImageData

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(20) % 2, ("a", "b"), (0.5,) * 3, (0.25,) * 3)


def _dump(obj: object, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar_layout(folder: Path) -> None:
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _dump({"label_names": [f"c{i}" for i in range(10)]}, root / "batches.meta")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _dump({"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
               "labels": list(range(10))}, root / name)


def benchmark_layout(folder: Path) -> None:
    train = tiny_train()
    folder.mkdir(parents=True)
    bases = [1, 3, 5]
    hwc = train.images.permute(0, 2, 3, 1).numpy()
    _dump([(hwc[i].copy(), int(train.labels[i])) for i in bases], folder / "poisons.pickle")
    _dump(np.array(bases), folder / "base_indices.pickle")
    _dump((hwc[0].copy(), 0), folder / "target.pickle")
    (folder / "epic.json").write_text(json.dumps(
        {"eps": 8 / 255, "target_class": 0, "adversarial_class": 1, "relabelled": False}))


def poison_set_layout(folder: Path) -> None:
    from epic.poisons import PoisonSet

    train = tiny_train()
    PoisonSet(indices=torch.tensor([1, 3]), images=train.images[[1, 3]].clone(),
              target_images=train.images[:1].clone(), target_class=0, adversarial_class=1,
              eps=8 / 255).save(folder)


def read_cifar(folder: Path) -> object:
    from epic.data.datasets import load_cifar

    return load_cifar("cifar10", folder)


def read_benchmark(folder: Path) -> object:
    from epic.formats import import_benchmark

    return import_benchmark(folder, tiny_train())


def read_poison_set(folder: Path) -> object:
    from epic.poisons import PoisonSet

    return PoisonSet.load(folder, tiny_train())


def read_image_folder(folder: Path) -> object:
    from epic.images import read_image_folder as read

    return read(folder)


def image_folder_layout(folder: Path) -> None:
    (folder / "cat").mkdir(parents=True)


def _safe_load(path: Path) -> object:
    from epic.io.files import open_untrusted
    from epic.io.safe_pickle import safe_load

    with open_untrusted(path) as f:
        return safe_load(f, name=str(path))


def _metapoison(path: Path) -> object:
    from epic.formats import import_metapoison

    return import_metapoison(path, tiny_train())


def _setups(path: Path) -> object:
    from epic.setups import load_setups

    return load_setups(path)


def _npz(path: Path) -> object:
    from epic.images import read_npz

    return read_npz(path)


def _store(path: Path) -> object:
    from epic.bench.store import ResultStore

    return ResultStore(path).load()


def _weights(path: Path) -> object:
    from epic.cli.common import _load_weights

    return _load_weights(str(path))


# loader -> (layout builder, or None for a single file; the slots the hostile file takes;
# the reader, of the file or of the folder)
LOADERS: dict[str, tuple[Callable[[Path], None] | None, list[str], Callable[[Path], object]]] = {
    "safe_load": (None, [""], _safe_load),
    "metapoison": (None, [""], _metapoison),
    "setups": (None, [""], _setups),
    "npz": (None, [""], _npz),
    "result_store": (None, [""], _store),
    "model_weights": (None, [""], _weights),
    "cifar": (cifar_layout, ["cifar-10-batches-py/data_batch_3",
                             "cifar-10-batches-py/batches.meta"], read_cifar),
    "benchmark": (benchmark_layout, ["poisons.pickle", "base_indices.pickle", "target.pickle",
                                     "epic.json"], read_benchmark),
    "poison_set": (poison_set_layout, ["poisons.npz", "poisons.json"], read_poison_set),
    "image_folder": (image_folder_layout, ["cat/image.png"], read_image_folder),
}


def place(file: Path, dest: Path) -> None:
    """``file`` at ``dest``: a copy, or the special file its name asks for."""
    dest.unlink(missing_ok=True)
    if file.suffix == ".fifo":
        os.mkfifo(dest)
    elif file.suffix == ".devzero":
        dest.symlink_to("/dev/zero")
    else:
        shutil.copyfile(file, dest)


def attempt(read: Callable[[Path], object], target: Path) -> dict[str, str]:
    signal.alarm(SECONDS)
    try:
        read(target)
        return {"outcome": "ok"}
    except Timeout:
        return {"outcome": "timeout"}
    except BaseException as exc:  # every kind is reported; the test judges it
        return {"outcome": "error", "type": type(exc).__name__,
                "bases": [c.__name__ for c in type(exc).__mro__],
                "message": str(exc)[:500]}
    finally:
        signal.alarm(0)


def main() -> None:
    loader, work = sys.argv[1], Path(sys.argv[2])
    files = [Path(f) for f in sys.argv[3:]]
    layout, slots, read = LOADERS[loader]
    tiny_train()  # imports done before the limit: they are not the reader's allocations
    import epic.bench.store  # noqa: F401
    import epic.cli.common  # noqa: F401
    import epic.formats  # noqa: F401
    import epic.images  # noqa: F401
    import epic.setups  # noqa: F401

    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_HEADROOM, size + MEMORY_HEADROOM))
    signal.signal(signal.SIGALRM, _on_alarm)
    for i, file in enumerate(files):
        for j, slot in enumerate(slots):
            print(json.dumps({"start": file.name, "slot": slot}), flush=True)
            folder = work / f"{i}-{j}"
            if layout is None:
                folder.mkdir(parents=True)
                target = folder / file.name
                place(file, target)
            else:
                layout(folder)
                place(file, folder / slot)
                target = folder
            print(json.dumps({"file": file.name, "slot": slot, "target": str(target)}
                             | attempt(read, target)), flush=True)


if __name__ == "__main__":
    main()
