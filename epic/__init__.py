"""epic: robust training against data poisoning (EPIC, Yang et al., ICML 2022).

Example:
    >>> import epic
    >>> defense = epic.EPIC(fraction=0.1, warmup=10, every=2)

The package's top level holds EPIC itself, for a training loop of your own: the defense, the
selection it runs and the samplers that follow its keep-mask. The rest lives in its package:
data in :mod:`epic.data`, models in :mod:`epic.models`, the trainer in :mod:`epic.training`,
poison sets in :mod:`epic.poisons`, the baselines in :mod:`epic.defenses`, the attacks in
:mod:`epic.attacks`.
"""

import importlib
import warnings
from typing import Any

from epic.defenses import EPIC, EpicRound, EpicSettings, find_poisons
from epic.errors import EpicError
from epic.gradients import gradient_embeddings
from epic.sampler import DistributedKeepSampler, KeepSampler
from epic.selection import Medoids, find_isolated, select_medoids

__all__ = [
    "EPIC",
    "DistributedKeepSampler",
    "EpicError",
    "EpicRound",
    "EpicSettings",
    "KeepSampler",
    "Medoids",
    "find_isolated",
    "find_poisons",
    "gradient_embeddings",
    "select_medoids",
]

__version__ = "0.2.0"

# Submodules that `import epic` does not load (they pull in Pillow, matplotlib or the attacks),
# loaded when first named: `epic.images.read_image_folder(...)` works after `import epic`.
_SUBMODULES = frozenset({"analysis", "attacks", "bench", "formats", "images", "integrations",
                         "io", "scan", "setups"})


# Exported here up to 0.1 and found in their packages since 0.2: still served, with a warning
_MOVED = {name: package for package, names in (
    ("epic.data", ("Augment", "ImageData", "iterate_batches", "load_cifar", "load_dataset",
                   "load_digits")),
    ("epic.models", ("Classifier", "build_model")),
    ("epic.poisons", ("PoisonSet", "PoisonSetError")),
    ("epic.training", ("TrainConfig", "TrainResult", "evaluate", "train")),
) for name in names}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"epic.{name}")
    if name in _MOVED:
        warnings.warn(f"epic.{name} is {_MOVED[name]}.{name} since epic 0.2",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'epic' has no attribute {name!r}")
