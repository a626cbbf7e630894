"""The shape shared by the feature-space filters (Deep k-NN, Spectral Signatures, Activation
Clustering): embed the kept examples with the model's penultimate features, flag outliers."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from epic.defenses.base import ScheduledDefense
from epic.gradients import Examples, feature_embeddings


class FeatureFilter(ScheduledDefense):
    """A defense that drops feature-space outliers; by default once, before epoch ``warmup``.

    Subclasses implement :meth:`outliers`.
    """

    def __init__(self, *, warmup: int = 10, every: int = 1, until: int | None = 11,
                 num_examples: int | None = None, batch_size: int | None = None) -> None:
        super().__init__(warmup=warmup, every=every, until=until, num_examples=num_examples,
                         batch_size=batch_size)

    def outliers(self, features: Tensor, labels: Tensor, n: int) -> Tensor:
        """Bool mask over the rows of ``features`` ``(M, F)``, True = drop; ``n`` is the size
        of the whole training set."""
        raise NotImplementedError

    def embed(self, model: nn.Module, data: Examples, keep: Tensor,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return feature_embeddings(model, data, keep=keep, batch_size=self.batch_size,
                                  features=features)

    def drop_rows(self, embeddings: Tensor, labels: Tensor, keep: Tensor
                  ) -> tuple[Tensor, dict[str, Any]]:
        return self.outliers(embeddings, labels, len(keep)), {}
