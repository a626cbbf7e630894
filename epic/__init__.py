"""epic: robust training against data poisoning (EPIC, Yang et al., ICML 2022).

Example:
    >>> import epic
    >>> defense = epic.EPIC(fraction=0.1, warmup=10, every=2)
"""

import importlib
from typing import Any

from epic.data import Augment, ImageData, iterate_batches, load_cifar, load_dataset, load_digits
from epic.defenses import EPIC, EpicRound, EpicSettings, find_poisons
from epic.errors import EpicError
from epic.gradients import gradient_embeddings
from epic.models import Classifier, build_model
from epic.poisons import PoisonSet, PoisonSetError
from epic.sampler import DistributedKeepSampler, KeepSampler
from epic.selection import Medoids, find_isolated, select_medoids
from epic.training import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "EPIC",
    "EpicError",
    "Augment",
    "Classifier",
    "DistributedKeepSampler",
    "EpicRound",
    "EpicSettings",
    "ImageData",
    "KeepSampler",
    "Medoids",
    "PoisonSet",
    "PoisonSetError",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "find_isolated",
    "find_poisons",
    "gradient_embeddings",
    "iterate_batches",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "select_medoids",
    "train",
]

__version__ = "0.1.0"

# Submodules that `import epic` does not load (they pull in Pillow, matplotlib or the attacks),
# loaded when first named: `epic.images.read_image_folder(...)` works after `import epic`.
_SUBMODULES = frozenset({"analysis", "attacks", "bench", "formats", "images", "integrations",
                         "io", "scan", "setups"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"epic.{name}")
    raise AttributeError(f"module 'epic' has no attribute {name!r}")
