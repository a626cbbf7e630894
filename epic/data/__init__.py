"""Image data: in-memory uint8 datasets with batch augmentation on tensors
(``imagedata.py``), and the data sets known by name with their readers (``datasets.py``).

Images stay uint8 ``(N, C, H, W)`` until a batch is drawn; a batch is float in ``[0, 1]``.
Per-channel normalization lives inside the models (see :mod:`epic.models`), so attacks and
defenses work in pixel space where an l-infinity budget of 8/255 means what it says.

Readers: scikit-learn's digits (the embedded default), CIFAR-10 and CIFAR-100 from the standard
python folders or their ``.tar.gz`` (read through a restricted unpickler), with an optional
checksum-verified download.
"""

from epic.data.datasets import (
    DATASETS,
    download_cifar,
    load_cifar,
    load_dataset,
    load_digits,
)
from epic.data.imagedata import (
    Augment,
    ImageData,
    augment_batch,
    batch_indices,
    channels_last_on_cpu,
    inference_batch_size,
    iterate_batches,
)

__all__ = [
    "Augment",
    "ImageData",
    "augment_batch",
    "batch_indices",
    "channels_last_on_cpu",
    "download_cifar",
    "inference_batch_size",
    "iterate_batches",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "DATASETS",
]
