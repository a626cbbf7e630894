"""Per-class gradient medoids by greedy facility-location maximization (EPIC, Alg. 1).

For every class ``c`` with rows ``V_c`` of the embedding matrix ``x`` (N, D), the engine
greedily maximizes the facility-location function

    F(S) = sum_{i in V_c} max_{j in S} s_ij,      S subset of V_c, |S| = k_c,

assigns every row to its most similar medoid and reports cluster sizes. Medoids whose
cluster holds only themselves are the isolated points EPIC drops.

Similarity kernels (``similarity=``):

* ``"exp"`` (default): ``s_ij = exp(-||x_i - x_j|| / D)`` with ``D`` the embedding dimension.
  This is submodlib's ``metric="euclidean"`` kernel, which the authors' code used.
* ``"linear"``: ``s_ij = c0 - ||x_i - x_j||`` with ``c0`` the largest pairwise distance in the
  class (Eq. 5 of the paper). ``c0`` changes F's value but never the greedy selection.
* ``"cosine"``: ``s_ij = (1 + cos(x_i, x_j)) / 2``, shifted into [0, 1] so F stays monotone.

All kernels are non-negative and F(empty set) = 0.

Greedy methods (``method=``):

* ``"lazy"`` (default): exact greedy, batched over classes, that never re-sums a gain a
  selection left unchanged: every gain is known and each selection lowers just the gains it
  changes (below). Returns the selection of ``"naive"``: the few gains within rounding of the
  best are summed afresh the way ``"naive"`` sums them, so ties and near-ties break the same
  way.
* ``"stochastic"``: stochastic greedy (Mirzasoleiman et al., 2015); every step takes the best
  of ``ceil(n / k * log(1 / epsilon))`` candidates drawn with ``generator``.
* ``"naive"``: plain greedy; sums the gain of every candidate afresh at every step (reference).

Ties between equal gains are broken towards the lowest row index within the class, by every
method. Rows equally similar to two medoids are assigned to the medoid that was selected first.

Known gains: the kernel is exactly symmetric, so the similarities of a row to every candidate
are a kernel row. When a selection raises the coverage of row ``i`` from ``a`` to ``b``, the
gain of candidate ``j`` drops by ``max(0, min(s_ij, b) - a)``: a step reads only the kernel
rows whose coverage rose, which are few once medoids are spread out, and of those only the
segments of 64 columns whose largest similarity beats ``a`` (rows of large problems are put
in k-d tree order so that these are few). The gains are summed afresh (in float64) only when
a selection raises most rows' coverage, as the first does. Minoux's lazy greedy instead
re-sums whole kernel rows of candidates whose stale upper bounds lead; on the CIFAR-sized
benchmark it read more of the kernel, needed more tensor operations per step and was slower
(figures and commands: docs/selection.md).

Memory: classes whose dense similarity matrix exceeds ``max_memory`` bytes (or with more than
``partition_size`` rows) are split into spatially coherent partitions of ``partition_size``
rows (default 1,000, where time per row stays small) (recursive median splits
along the coordinate of largest range, like a k-d tree). Each partition runs greedy up to twice
its proportional share of the class budget, and the class keeps the picks with the largest
marginal gains over all partitions (exactly global greedy if the partitions did not interact;
GreeDi-style, without a second stage). See docs/selection.md for the measured objective
relative to dense greedy.

Where each part lives: ``medoids.py`` the public API (:func:`select_medoids`,
:func:`find_isolated`, :func:`isolated_medoids`, :func:`facility_location_value`,
:class:`Medoids`, the option types) and the checks of every input; ``kernel.py`` the
similarity kernel (blocked, exactly symmetric, segment maxima); ``greedy.py`` the greedy
loop; ``coverage.py`` its state (:class:`~epic.selection.coverage.Coverage`: coverage, the
incrementally known gains and naive greedy's choice from them);
``partition.py`` the partitions of large classes and the k-d ordering of rows;
``timing.py`` an opt-in timer of the engine's phases (:func:`phase_times`). The package
imports nothing else from ``epic``.

Example:
    >>> import torch
    >>> from epic.selection import find_isolated, select_medoids
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 10, generator=g)
    >>> y = torch.arange(200) % 4
    >>> med = select_medoids(x, y, fraction=0.1)
    >>> med.indices.shape, int(med.cluster_sizes.sum())
    (torch.Size([20]), 200)
    >>> find_isolated(x, y, fraction=0.1).shape
    torch.Size([200])
"""

from epic.selection.medoids import (
    DEFAULT_MAX_MEMORY,
    Medoids,
    Method,
    PerClass,
    Similarity,
    as_cluster_size,
    as_fraction,
    class_rows,
    facility_location_value,
    find_isolated,
    isolated_medoids,
    select_medoids,
)
from epic.selection.timing import phase_times

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "Medoids",
    "Method",
    "PerClass",
    "Similarity",
    "as_cluster_size",
    "as_fraction",
    "class_rows",
    "facility_location_value",
    "find_isolated",
    "isolated_medoids",
    "phase_times",
    "select_medoids",
]
