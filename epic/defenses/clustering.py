"""Activation Clustering (Chen et al., SafeAI 2019): split each class's activations in two and
drop the small cluster."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from epic.defenses.base import paper_schedule
from epic.defenses.filtering import FeatureFilter
from epic.protocol import RunFacts

log = logging.getLogger(__name__)
ICA_STEPS = 400


def activation_clusters(features: Tensor, labels: Tensor, *, components: int = 10,
                        size_threshold: float = 0.35, seed: int = 0) -> Tensor:
    """Bool mask ``(N,)``, True = in the smaller of its class's two activation clusters, when
    that cluster holds at most ``size_threshold`` of the class.

    Per class, features are reduced to ``components`` dimensions by independent component
    analysis and split by 2-means, as Chen et al. describe (scikit-learn, CPU). Where the
    analysis has not converged in :data:`ICA_STEPS` steps the split uses its last iterate,
    and one log line a call names those classes.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    x = features.detach().cpu().double().numpy()
    y = labels.cpu().numpy()
    drop = np.zeros(len(y), dtype=bool)
    unconverged = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) < max(4, components + 1):
            continue
        dims = min(components, x.shape[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            reduced = FastICA(n_components=dims, random_state=seed, max_iter=ICA_STEPS,
                              whiten="unit-variance").fit_transform(x[rows])
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            unconverged.append(int(c))
        for w in caught:  # the others go on as they came
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
        sizes = np.bincount(assign, minlength=2)
        small = int(sizes.argmin())
        if sizes[small] <= size_threshold * len(rows):
            drop[rows[assign == small]] = True
    if unconverged:
        log.info("activation clustering: ICA did not converge in %d steps for class(es) %s; "
                 "split on its last iterate", ICA_STEPS, unconverged)
    return torch.from_numpy(drop).to(features.device)


class ActivationClustering(FeatureFilter):
    """Activation clustering in the model's feature space, on a schedule."""

    SETTINGS = (*FeatureFilter.SCHEDULE, "components", "size_threshold", "seed")

    def __init__(self, *, components: int = 10, size_threshold: float = 0.35, seed: int = 0,
                 **schedule: Any) -> None:
        super().__init__(**schedule)
        self.components = components
        self.size_threshold = size_threshold
        self.seed = seed

    @classmethod
    def for_run(cls, run: RunFacts, *, size_threshold: float = 0.35, warmup: int | None = None,
                every: int | None = None, until: int | None = None) -> ActivationClustering:
        """One filtering round at ``warmup`` (default 10), k-means seeded by the run; a class's
        smaller cluster is dropped when it holds at most ``size_threshold`` of the class."""
        return cls(size_threshold=size_threshold, seed=run.seed,
                   **paper_schedule(run, warmup=warmup, every=every, until=until, once=True))

    def outliers(self, features: Tensor, labels: Tensor, n: int) -> Tensor:
        return activation_clusters(features, labels, components=self.components,
                                   size_threshold=self.size_threshold, seed=self.seed)
