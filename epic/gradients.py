"""Per-example gradients of the loss with respect to the last layer's output (the logits)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.data import ImageData, iterate_batches

__all__ = ["gradient_embeddings"]


@torch.no_grad()
def gradient_embeddings(
    model: nn.Module,
    data: ImageData,
    *,
    keep: Tensor | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
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
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    grads, labels = [], []
    try:
        for x, y, _ in iterate_batches(data, batch_size=batch_size, keep=keep, device=device):
            logits = model(x).float()
            g = torch.softmax(logits, dim=1)
            g -= F.one_hot(y, logits.shape[1]).to(g.dtype)
            grads.append(g)
            labels.append(y)
    finally:
        model.train(was_training)
    if not grads:
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(grads), torch.cat(labels)
