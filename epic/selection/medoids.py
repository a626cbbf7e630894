"""The public API of the selection: :func:`select_medoids`, :func:`find_isolated`,
:func:`isolated_medoids`, :func:`facility_location_value`, the :class:`Medoids` result and the
option types, with the checks of every input. :func:`select_medoids` plans the greedy problems
(one per class, or per partition of a class too large for one dense kernel), has the engine
solve them and puts the answers together.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from epic.selection.greedy import Problem, solve
from epic.selection.kernel import (
    BLOCK_BYTES,
    SEGMENT,
    max_pairwise_distance,
    similarity_matrix,
)
from epic.selection.partition import apportion, merge_partitions, nearest_medoid, partition

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "Medoids",
    "Method",
    "PerClass",
    "Similarity",
    "as_fraction",
    "facility_location_value",
    "find_isolated",
    "isolated_medoids",
    "select_medoids",
]

logger = logging.getLogger("epic.selection")


def as_fraction(value: object, name: str = "fraction") -> float:
    """``value`` as a share in (0, 1] (any real number: a Python, numpy or 0-d tensor one),
    or a ValueError naming ``name``; ``True`` is not a number here. A float32 ``0.2`` means
    0.2, not 0.2000000030 (which would round ``0.2 * 25`` medoids up to 6)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.detach().cpu().numpy().reshape(())[()]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if isinstance(value, (np.float32, np.float16)):  # its shortest decimal, as written
        value = float(np.format_float_positional(value, unique=True))
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def as_cluster_size(value: object, name: str = "max_cluster_size") -> int:
    """``value`` as a cluster size of at least 1 (an integer: Python, numpy or a 0-d tensor),
    or a ValueError naming ``name``. Every cluster holds its medoid, so a limit below 1 would
    flag nothing: a defense that silently does nothing."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = value.detach().cpu().numpy().reshape(())[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1 (every cluster holds its medoid: a smaller "
                         f"limit drops nothing), got {value!r}")
    return int(value)


Similarity = Literal["exp", "linear", "cosine"]
Method = Literal["lazy", "stochastic", "naive"]
PerClass = Literal["proportional", "equal"]

_SIMILARITIES = get_args(Similarity)
_METHODS = get_args(Method)
_PER_CLASS = get_args(PerClass)
DEFAULT_MAX_MEMORY = 1 << 30
# Rows per partition of a class too large for one dense kernel (see partition_size).
DEFAULT_PARTITION_ROWS = 1000
# Each partition of a large class runs greedy to this many times its proportional budget;
# the class then keeps the picks with the largest gains over all partitions.
_OVERSELECT = 2
# Partitioned classes are re-assigned to their nearest medoid over the whole class when
# rows x medoids is at most this; otherwise rows keep the nearest medoid of their partition.
_ASSIGN_PAIRS = 1 << 31


@dataclass(frozen=True)
class Medoids:
    """Result of :func:`select_medoids`.

    Attributes:
        indices: (M,) int64 row indices into ``x`` of the medoids, grouped by class (ascending
            label), in greedy order within each class.
        assignment: (N,) int64; for every row of ``x`` the row index of its medoid.
        cluster_sizes: (M,) int64; number of rows assigned to ``indices[j]``, itself included.
    """

    indices: Tensor
    assignment: Tensor
    cluster_sizes: Tensor



def select_medoids(
    x: Tensor,
    labels: Tensor,
    fraction: float,
    *,
    per_class: PerClass = "proportional",
    similarity: Similarity = "exp",
    method: Method = "lazy",
    epsilon: float = 0.01,
    generator: torch.Generator | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    partition_size: int | None = None,
) -> Medoids:
    """Select per-class medoids by greedy facility-location maximization.

    (Long for its arguments' documentation; the work is in ``_plan``, ``solve`` and
    ``_assign_partitioned``.)

    Args:
        x: (N, D) float embeddings, e.g. last-layer gradients ``softmax(z) - onehot(y)``.
        labels: (N,) integer class labels; the classes are the labels present.
        fraction: share of each class to select, in (0, 1].
        per_class: ``"proportional"``: ``k_c = ceil(fraction * n_c)``; ``"equal"``:
            ``k_c = min(ceil(fraction * N / C), n_c)`` with C the number of classes present.
        similarity: kernel, ``"exp"`` (default, submodlib's euclidean kernel), ``"linear"`` or
            ``"cosine"``; see the module docstring.
        method: ``"lazy"`` (exact), ``"stochastic"`` or ``"naive"`` (exact reference).
        epsilon: stochastic greedy accuracy parameter, in (0, 1).
        generator: random source of stochastic greedy; the global torch RNG when None.
        max_memory: bytes allowed for similarity matrices held at once; larger classes are
            partitioned (see module docstring).
        partition_size: classes with more rows are split into partitions of at most this many
            rows. Default (None): classes whose kernel fits ``max_memory`` are solved whole
            (exact greedy), larger ones in partitions of 1,000 rows. Smaller partitions are
            faster (time grows with N * partition_size) at a small cost in F.

    Returns:
        The medoids, the assignment of every row and the cluster sizes.

    Raises:
        ValueError: on non-finite rows (named), a fraction outside (0, 1], mismatched shapes
            or invalid options.
    """
    fraction = as_fraction(fraction)
    x, labels = _validate(x, labels, per_class, similarity, method, epsilon)
    if max_memory <= 0:
        raise ValueError(f"max_memory must be positive, got {max_memory}")
    if partition_size is not None and partition_size < 2:
        raise ValueError(f"partition_size must be at least 2, got {partition_size}")
    n_total = x.shape[0]
    device = x.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if n_total == 0:
        return Medoids(empty, empty.clone(), empty.clone())

    classes = class_rows(labels)
    budgets = _budgets([int(r.numel()) for r in classes], fraction, per_class)
    itemsize = x.element_size()
    max_rows = _max_dense_rows(max_memory, itemsize)
    if partition_size is not None:
        max_rows = min(max_rows, partition_size)
    part_rows = min(max_rows, partition_size or DEFAULT_PARTITION_ROWS)

    problems, class_problems = _plan(x, classes, budgets, max_rows, part_rows)
    selected, assigned, gains = solve(
        x, problems, similarity, method, epsilon, generator, max_memory
    )

    assignment = torch.empty(n_total, dtype=torch.long, device=device)
    chosen: list[Tensor] = []
    for rows, k, mine in zip(classes, budgets, class_problems, strict=True):
        if len(mine) == 1:
            chosen.append(selected[mine[0]])
            assignment[rows] = assigned[mine[0]]
            continue
        kept = merge_partitions([selected[i] for i in mine], [gains[i] for i in mine], k)
        chosen.append(torch.cat(kept))
        _assign_partitioned(x, rows, kept, [problems[i].rows for i in mine], similarity,
                            assignment)
    indices = torch.cat(chosen)
    assignment[indices] = indices
    return Medoids(indices, assignment, _cluster_sizes(indices, assignment))


def _plan(x: Tensor, classes: list[Tensor], budgets: list[int], max_rows: int,
          part_rows: int) -> tuple[list[Problem], list[list[int]]]:
    """The greedy problems to solve: a class whose kernel fits in ``max_rows`` rows whole, a
    larger one in partitions of ``part_rows`` that over-select; and, per class, the positions
    of its problems."""
    problems: list[Problem] = []
    class_problems: list[list[int]] = []
    for rows, k in zip(classes, budgets, strict=True):
        parts = [rows] if rows.numel() <= max_rows else partition(x, rows, part_rows)
        if len(parts) > 1:
            logger.info("class of %d rows split into %d partitions", rows.numel(), len(parts))
        quotas = apportion(k, [int(p.numel()) for p in parts])
        class_problems.append(list(range(len(problems), len(problems) + len(parts))))
        for part, quota in zip(parts, quotas, strict=True):
            run = quota if len(parts) == 1 else min(part.numel(), _OVERSELECT * quota)
            problems.append(Problem(part, run))
    return problems, class_problems


def _assign_partitioned(x: Tensor, rows: Tensor, kept: list[Tensor], parts: list[Tensor],
                        similarity: Similarity, assignment: Tensor) -> None:
    """Assign the ``rows`` of a partitioned class to their nearest medoid (``kept``: the
    medoids each partition kept): among all of the class's medoids when that is affordable,
    else among their own partition's (all of them where it kept none)."""
    medoids = torch.cat(kept)
    if rows.numel() * medoids.numel() <= _ASSIGN_PAIRS:
        assignment[rows] = nearest_medoid(x, rows, medoids, similarity)
        return
    for part, own in zip(parts, kept, strict=True):
        assignment[part] = nearest_medoid(x, part, own if own.numel() else medoids, similarity)


def find_isolated(
    x: Tensor,
    labels: Tensor,
    fraction: float,
    max_cluster_size: int = 1,
    *,
    per_class: PerClass = "proportional",
    similarity: Similarity = "exp",
    method: Method = "lazy",
    epsilon: float = 0.01,
    generator: torch.Generator | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    partition_size: int | None = None,
) -> Tensor:
    """Flag isolated medoids: medoids whose cluster holds at most ``max_cluster_size`` rows.

    Only the medoids themselves are flagged (EPIC, Alg. 1 drops medoids with ``gamma_j == 1``).

    Args:
        x: (N, D) float embeddings.
        labels: (N,) integer class labels.
        fraction: share of each class selected as medoids, in (0, 1].
        max_cluster_size: clusters with at most this many rows (medoid included) are isolated.
        per_class, similarity, method, epsilon, generator, max_memory, partition_size: as in
            :func:`select_medoids`.

    Returns:
        (N,) bool tensor, True for rows to drop.
    """
    max_cluster_size = as_cluster_size(max_cluster_size)  # before any work
    med = select_medoids(
        x,
        labels,
        fraction,
        per_class=per_class,
        similarity=similarity,
        method=method,
        epsilon=epsilon,
        generator=generator,
        max_memory=max_memory,
        partition_size=partition_size,
    )
    drop = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    drop[isolated_medoids(x, labels, med, max_cluster_size)] = True
    return drop


def isolated_medoids(x: Tensor, labels: Tensor, medoids: Medoids, max_cluster_size: int = 1
                     ) -> Tensor:
    """Row indices of the medoids whose cluster holds at most ``max_cluster_size`` rows, less
    those with an exact copy in their class: a row that another row of its class duplicates
    is not isolated, even where greedy picked both copies (a zero-gain pick, once a class
    has fewer distinct rows than medoids) and the copy's cluster holds only itself."""
    small = medoids.indices[medoids.cluster_sizes <= as_cluster_size(max_cluster_size)]
    if small.numel() == 0:
        return small
    keyed = torch.cat([labels.to(x.dtype)[:, None], x], dim=1)
    _, inverse, counts = torch.unique(keyed, dim=0, return_inverse=True, return_counts=True)
    return small[counts[inverse[small]] == 1]


def facility_location_value(
    x: Tensor,
    labels: Tensor,
    indices: Tensor,
    *,
    similarity: Similarity = "exp",
) -> float:
    """Facility-location value of a selection, summed over classes.

    ``F = sum_c sum_{i in V_c} max_{j in S_c} s_ij`` where ``S_c`` are the selected rows of class
    ``c``. Rows of a class without selected rows contribute 0. Computed blockwise in float64 with
    bounded memory; ``"linear"`` needs the largest pairwise distance per class (O(n_c^2) time).

    Args:
        x: (N, D) float embeddings.
        labels: (N,) integer class labels.
        indices: (M,) row indices of the selected medoids.
        similarity: kernel, as in :func:`select_medoids`.

    Returns:
        The objective value.
    """
    x, labels = _validate(x, labels, "proportional", similarity, "lazy", 0.5)
    x = x.double()
    indices = torch.as_tensor(indices, dtype=torch.long, device=x.device)
    is_sel = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    is_sel[indices] = True
    total = 0.0
    for rows in class_rows(labels):
        med = rows[is_sel[rows]]
        if med.numel() == 0:
            continue
        xc, xm = x[rows], x[med]
        c0 = max_pairwise_distance(xc) if similarity == "linear" else 0.0
        step = max(1, BLOCK_BYTES // (8 * med.numel()))
        for start in range(0, rows.numel(), step):
            s = similarity_matrix(xc[start : start + step], xm, similarity, c0)
            total += float(s.max(dim=1).values.sum())
    return total


# --------------------------------------------------------------------------- validation


def _validate(
    x: Tensor,
    labels: Tensor,
    per_class: str,
    similarity: str,
    method: str,
    epsilon: float,
) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    labels = torch.as_tensor(labels, device=x.device)
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must have shape ({x.shape[0]},) to match x, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if per_class not in _PER_CLASS:
        raise ValueError(f"per_class must be one of {_PER_CLASS}, got {per_class!r}")
    if similarity not in _SIMILARITIES:
        raise ValueError(f"similarity must be one of {_SIMILARITIES}, got {similarity!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()
    if bad.numel():
        shown = ", ".join(str(i) for i in bad[:5].tolist())
        more = ", ..." if bad.numel() > 5 else ""
        raise ValueError(f"x has {bad.numel()} row(s) with NaN or inf values: rows {shown}{more}")
    return x, labels.long()


def class_rows(labels: Tensor) -> list[Tensor]:
    """Row indices of every class present, by ascending label (each ascending)."""
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return list(torch.split(order, counts.tolist()))


def _budgets(sizes: list[int], fraction: float, per_class: str) -> list[int]:
    if per_class == "equal":
        k = max(1, math.ceil(fraction * sum(sizes) / len(sizes) - 1e-9))
        return [min(k, n) for n in sizes]
    return [min(max(1, math.ceil(fraction * n - 1e-9)), n) for n in sizes]


def _max_dense_rows(max_memory: int, itemsize: int) -> int:
    """Largest class size whose padded kernel and segment maxima fit ``max_memory`` (at least
    2 rows)."""
    side = math.isqrt(max_memory * SEGMENT // ((SEGMENT + 1) * itemsize))
    return max(2, side // SEGMENT * SEGMENT)


def _cluster_sizes(indices: Tensor, assignment: Tensor) -> Tensor:
    counts = torch.bincount(assignment, minlength=assignment.numel())
    return counts[indices]
