"""Models: each is a :class:`Classifier` with ``features(x)`` and a last linear ``classifier``.

=================  ===================================================  =========
name               architecture                                         params
=================  ===================================================  =========
``resnet18``       ResNet-18, CIFAR stem (as in the paper)              11.2 M
``vgg16``          VGG-16 with batch norm (as in the paper)             14.7 M
``resnet18-small`` ResNet-18 layout at 1/4 width                        0.7 M
``vgg16-small``    VGG-16-BN at 1/4 width                               0.9 M
``convnet``        3-stage conv net, width 32 (seconds on a CPU)        0.1 M
``convnet-512``    ``convnet`` widened to 512 features by a 1x1 conv    0.2 M
``fastnet``        airbench's layout (Jordan 2024): 92% on CIFAR-10 in  0.57 M
                   half an hour of a 2-core CPU
=================  ===================================================  =========
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from epic.models.base import Classifier, Normalize, Scenario, eval_mode
from epic.models.fast import fast_body
from epic.models.resnet import resnet_body
from epic.models.small import convnet_body
from epic.models.vgg import vgg_body

__all__ = ["MODELS", "Classifier", "Normalize", "Scenario", "build_model", "eval_mode",
           "register_model"]

# name -> body builder: in_channels -> (the body, its feature width); see docs/models.md
Body = Callable[[int], tuple[nn.Module, int]]

MODELS: dict[str, Body] = {
    "resnet18": lambda c: resnet_body(c, width=64),
    "vgg16": lambda c: vgg_body(c, width=64),
    "resnet18-small": lambda c: resnet_body(c, width=16),
    "vgg16-small": lambda c: vgg_body(c, width=16),
    "convnet": lambda c: convnet_body(c, width=32),
    "convnet-512": lambda c: convnet_body(c, width=32, features=512),
    "fastnet": fast_body,
}


def register_model(name: str) -> Callable[[Body], Body]:
    """Decorator: make the body builder ``fn(in_channels) -> (body, feature_dim)`` a model
    named ``name`` (docs/models.md): :func:`build_model`, ``--model`` and ``--arch`` take it.

    Raises:
        ValueError: ``name`` is taken by another builder.
    """
    def register(fn: Body) -> Body:
        if name in MODELS and MODELS[name] is not fn:
            raise ValueError(f"model name {name!r} is taken")
        MODELS[name] = fn
        return fn
    return register


def build_model(name: str, *, num_classes: int, in_channels: int,
                mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """A fresh model by name (see :data:`MODELS`); ``mean``/``std`` are the data's statistics.

    Example:
        >>> m = build_model("convnet", num_classes=10, in_channels=3, mean=[0.5] * 3,
        ...                 std=[0.25] * 3)
        >>> m.features(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 128])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    body, dim = MODELS[name](in_channels)
    return Classifier(body, dim, num_classes, mean, std)
