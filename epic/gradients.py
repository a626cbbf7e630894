"""Per-example embeddings from one eval-mode pass: last-layer gradients, features, logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.data import ImageData, iterate_batches

__all__ = ["feature_embeddings", "gradient_embeddings", "logit_embeddings"]


def _kept_features(data: ImageData, features: Tensor, keep: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
    """The rows of precomputed ``features`` ``(N, F)`` that ``keep`` selects, and their labels."""
    if features.shape[0] != len(data):
        raise ValueError(f"features cover {features.shape[0]} examples, data has {len(data)}")
    rows = torch.arange(len(data)) if keep is None else keep.cpu().nonzero().squeeze(1)
    return (features[rows.to(features.device)],
            data.labels[rows.to(data.labels.device)].to(features.device))


@torch.no_grad()
def _from_features(model: nn.Module, data: ImageData, features: Tensor,
                   fn: Callable[[Tensor, Tensor], Tensor], keep: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
    """``fn(logits, labels)`` from precomputed features: only ``model.classifier`` runs."""
    feats, labels = _kept_features(data, features, keep)
    head: nn.Module = getattr(model, "classifier")  # noqa: B009
    was_training = head.training
    head.eval()
    try:
        return fn(head(feats).float(), labels), labels
    finally:
        head.train(was_training)


@torch.no_grad()
def _embed(model: nn.Module, data: ImageData, fn: Callable[[Tensor, Tensor], Tensor], *,
           keep: Tensor | None, batch_size: int, device: torch.device | str | None
           ) -> tuple[Tensor, Tensor]:
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows, labels = [], []
    try:
        for x, y, _ in iterate_batches(data, batch_size=batch_size, keep=keep, device=device):
            rows.append(fn(x, y))
            labels.append(y)
    finally:
        model.train(was_training)
    if not rows:
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(rows), torch.cat(labels)


def gradient_embeddings(
    model: nn.Module,
    data: ImageData,
    *,
    keep: Tensor | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy gradients w.r.t. the logits, ``softmax(z_i) - onehot(y_i)``, per example.

    This is the last-layer gradient EPIC clusters (paper Sec. 3.5, after Katharopoulos & Fleuret
    2018): it upper-bounds the full gradient difference between examples up to a constant and
    costs one forward pass. The model runs in eval mode on un-augmented inputs; its training
    mode is restored afterwards. No parameter gradients are computed.

    Args:
        model: maps images in ``[0, 1]`` to logits ``(B, C)``.
        data: the examples.
        keep: optional bool mask ``(N,)``; only those examples are embedded.
        device: where to run (default: the model's device).
        features: optional ``model.features`` of every example of ``data``, ``(N, F)``,
            computed once for a frozen body (transfer learning); then only
            ``model.classifier`` runs (results on the features' device).

    Returns:
        ``(grads, labels)``: ``(M, C)`` float32 and ``(M,)`` int64, rows in index order of the
        kept examples, on the model's device.

    Example:
        >>> from epic.data import load_digits
        >>> from epic.models import build_model
        >>> train, _ = load_digits()
        >>> m = build_model("convnet", num_classes=10, in_channels=1, mean=train.mean,
        ...                 std=train.std)
        >>> g, y = gradient_embeddings(m, train)
        >>> g.shape
        torch.Size([1347, 10])
    """

    def from_logits(logits: Tensor, y: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)

    if features is not None:
        return _from_features(model, data, features, from_logits, keep)
    return _embed(model, data, lambda x, y: from_logits(model(x).float(), y), keep=keep,
                  batch_size=batch_size, device=device)


def feature_embeddings(
    model: nn.Module,
    data: ImageData,
    *,
    keep: Tensor | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Penultimate features ``model.features(x)``, ``(M, F)``, and labels ``(M,)``.

    Same conventions as :func:`gradient_embeddings`; ``model`` must have ``features``.
    """
    if features is not None:
        return _kept_features(data, features, keep)
    extract: Callable[[Tensor], Tensor] = getattr(model, "features")  # noqa: B009
    return _embed(model, data, lambda x, _: extract(x).float(), keep=keep,
                  batch_size=batch_size, device=device)


def logit_embeddings(
    model: nn.Module,
    data: ImageData,
    *,
    keep: Tensor | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Logits ``(M, C)`` and labels ``(M,)``; same conventions as :func:`gradient_embeddings`."""
    if features is not None:
        return _from_features(model, data, features, lambda logits, _: logits, keep)
    return _embed(model, data, lambda x, _: model(x).float(), keep=keep, batch_size=batch_size,
                  device=device)
