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
benchmark it read more of the kernel and needed more tensor operations per step, and took
2.1 s against 1.2-1.4 s (docs/selection.md).

Memory: classes whose dense similarity matrix exceeds ``max_memory`` bytes (or with more than
``partition_size`` rows) are split into spatially coherent partitions of ``partition_size``
rows (default 1,000, where time per row stays small) (recursive median splits
along the coordinate of largest range, like a k-d tree). Each partition runs greedy up to twice
its proportional share of the class budget, and the class keeps the picks with the largest
marginal gains over all partitions (exactly global greedy if the partitions did not interact;
GreeDi-style, without a second stage). See docs/selection.md for the measured objective
relative to dense greedy.

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

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Medoids",
    "Method",
    "isolated_medoids",
    "PerClass",
    "Similarity",
    "facility_location_value",
    "find_isolated",
    "select_medoids",
]

logger = logging.getLogger(__name__)

Similarity = Literal["exp", "linear", "cosine"]
Method = Literal["lazy", "stochastic", "naive"]
PerClass = Literal["proportional", "equal"]

_SIMILARITIES = ("exp", "linear", "cosine")
_METHODS = ("lazy", "stochastic", "naive")
_PER_CLASS = ("proportional", "equal")
DEFAULT_MAX_MEMORY = 1 << 30
# Rows per partition of a class too large for one dense kernel (see partition_size).
DEFAULT_PARTITION_ROWS = 1000
# Scratch memory (bytes) for blockwise work that is not the similarity matrix itself.
_BLOCK_BYTES = 64 << 20
# exp(-d / D) is computed as exp2(-d * log2(e) / D): the same values, 2-3x faster on CPUs.
_LOG2_E = math.log2(math.e)
# Problems with more rows are put in k-d tree order before their kernel is built; for smaller
# ones, like the 1,000-row partitions of a large class, ordering costs more than it saves.
_ORDER_ROWS = 2048
# Columns per segment of a kernel row; a segment whose largest similarity does not beat a
# row's coverage holds no pair that still contributes.
_SEGMENT = 64
# Elements per block of the blocked kernel passes (pieces that stay in cache).
_CACHE_ELEMENTS = 1 << 18
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


@dataclass
class _Problem:
    """One greedy subproblem: a class, or one partition of a large class."""

    rows: Tensor  # (n,) int64 row indices into x
    k: int


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
    x, labels = _validate(x, labels, fraction, per_class, similarity, method, epsilon)
    if max_memory <= 0:
        raise ValueError(f"max_memory must be positive, got {max_memory}")
    if partition_size is not None and partition_size < 2:
        raise ValueError(f"partition_size must be at least 2, got {partition_size}")
    n_total = x.shape[0]
    device = x.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if n_total == 0:
        return Medoids(empty, empty.clone(), empty.clone())

    classes = _class_rows(labels)
    budgets = _budgets([int(r.numel()) for r in classes], fraction, per_class)
    itemsize = x.element_size()
    max_rows = _max_dense_rows(max_memory, itemsize)
    if partition_size is not None:
        max_rows = min(max_rows, partition_size)
    part_rows = min(max_rows, partition_size or DEFAULT_PARTITION_ROWS)

    problems: list[_Problem] = []
    class_problems: list[list[int]] = []  # problem positions of every class
    for rows, k in zip(classes, budgets, strict=True):
        parts = [rows] if rows.numel() <= max_rows else _partition(x, rows, part_rows)
        if len(parts) > 1:
            logger.info("class of %d rows split into %d partitions", rows.numel(), len(parts))
        quotas = _apportion(k, [int(p.numel()) for p in parts])
        class_problems.append(list(range(len(problems), len(problems) + len(parts))))
        for part, quota in zip(parts, quotas, strict=True):
            run = quota if len(parts) == 1 else min(part.numel(), _OVERSELECT * quota)
            problems.append(_Problem(part, run))

    selected, assigned, gains = _solve(
        x, problems, similarity, method, epsilon, generator, max_memory
    )

    assignment = torch.empty(n_total, dtype=torch.long, device=device)
    chosen: list[Tensor] = []
    for rows, k, mine in zip(classes, budgets, class_problems, strict=True):
        if len(mine) == 1:
            chosen.append(selected[mine[0]])
            assignment[rows] = assigned[mine[0]]
            continue
        kept = _merge_partitions([selected[i] for i in mine], [gains[i] for i in mine], k)
        medoids = torch.cat(kept)
        chosen.append(medoids)
        if rows.numel() * medoids.numel() <= _ASSIGN_PAIRS:
            assignment[rows] = _nearest_medoid(x, rows, medoids, similarity)
            continue
        for i, own in zip(mine, kept, strict=True):
            part = problems[i].rows
            candidates = own if own.numel() else medoids
            assignment[part] = _nearest_medoid(x, part, candidates, similarity)
    indices = torch.cat(chosen)
    assignment[indices] = indices
    return Medoids(indices, assignment, _cluster_sizes(indices, assignment))


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
    small = medoids.indices[medoids.cluster_sizes <= max_cluster_size]
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
    x, labels = _validate(x, labels, 1.0, "proportional", similarity, "lazy", 0.5)
    x = x.double()
    indices = torch.as_tensor(indices, dtype=torch.long, device=x.device)
    is_sel = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    is_sel[indices] = True
    total = 0.0
    for rows in _class_rows(labels):
        med = rows[is_sel[rows]]
        if med.numel() == 0:
            continue
        xc, xm = x[rows], x[med]
        c0 = _max_pairwise_distance(xc) if similarity == "linear" else 0.0
        step = max(1, _BLOCK_BYTES // (8 * med.numel()))
        for start in range(0, rows.numel(), step):
            s = _similarity(xc[start : start + step], xm, similarity, c0)
            total += float(s.max(dim=1).values.sum())
    return total


# --------------------------------------------------------------------------- validation


def _validate(
    x: Tensor,
    labels: Tensor,
    fraction: float,
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
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
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


def _class_rows(labels: Tensor) -> list[Tensor]:
    """Row indices of every class present, by ascending label."""
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
    side = math.isqrt(max_memory * _SEGMENT // ((_SEGMENT + 1) * itemsize))
    return max(2, side // _SEGMENT * _SEGMENT)


def _apportion(k: int, sizes: list[int]) -> list[int]:
    """Split budget ``k`` over parts proportionally to ``sizes`` (largest remainder)."""
    n = sum(sizes)
    quotas = [k * s / n for s in sizes]
    out = [min(int(q), s) for q, s in zip(quotas, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    rest = k - sum(out)
    while rest > 0:
        for i in order:
            if rest and out[i] < sizes[i]:
                out[i] += 1
                rest -= 1
    return out


def _merge_partitions(selected: list[Tensor], gains: list[Tensor], k: int) -> list[Tensor]:
    """Keep the ``k`` picks with the largest marginal gains over all partitions of a class.

    Each partition's picks are in greedy order, so a partition keeps a prefix of its picks.
    Were the partitions independent (F separable over them), this is exactly global greedy.
    """
    part = torch.cat([torch.full_like(s, i) for i, s in enumerate(selected)])
    top = torch.argsort(torch.cat(gains), descending=True, stable=True)[:k]
    counts = torch.bincount(part[top], minlength=len(selected)).tolist()
    return [s[:c] for s, c in zip(selected, counts, strict=True)]


def _partition(x: Tensor, rows: Tensor, max_rows: int) -> list[Tensor]:
    """Split ``rows`` into spatially coherent parts of at most ``max_rows`` rows."""
    levels = math.ceil(math.log2(rows.numel() / max_rows))
    zero = torch.zeros(rows.numel(), dtype=torch.long, device=x.device)
    perm, leaf = _kd_order(x[rows], zero, levels)
    counts = torch.bincount(leaf, minlength=1 << levels)
    return list(torch.split(rows[perm], counts.tolist()))


def _kd_order(xs: Tensor, seg: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Order of the rows of ``xs`` by a balanced k-d tree of ``levels`` levels within each
    of the sets ``seg`` (non-decreasing ids 0, 1, ...), and the leaf of each ordered row.

    Recursive median splits along the coordinate of largest range, all nodes of a level (of
    every set) processed together; the sets stay in order, each contiguous.
    """
    n, dim = xs.shape
    perm = torch.arange(n, device=xs.device)
    sets = int(seg[-1]) + 1 if n else 0
    for level in range(levels):
        n_seg = sets << level
        pts = xs[perm]
        idx = seg[:, None].expand(-1, dim)
        hi = torch.full((n_seg, dim), -math.inf, dtype=xs.dtype, device=xs.device)
        lo = torch.full((n_seg, dim), math.inf, dtype=xs.dtype, device=xs.device)
        hi = hi.scatter_reduce(0, idx, pts, "amax")
        lo = lo.scatter_reduce(0, idx, pts, "amin")
        spread, axis = (hi - lo).max(dim=1)
        value = pts.gather(1, axis[seg][:, None]).squeeze(1)
        low = lo.gather(1, axis[:, None]).squeeze(1)
        # node id plus the position along the split axis scaled into [0, 0.5]: one sort
        key = seg.double() + 0.5 * ((value - low[seg]) / spread.clamp(min=1e-30)[seg]).double()
        order = torch.argsort(key)
        perm, seg = perm[order], seg[order]
        counts = torch.bincount(seg, minlength=n_seg)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(n, device=xs.device) - starts[seg]
        seg = 2 * seg + (pos >= counts[seg] // 2).long()
    return perm, seg


# --------------------------------------------------------------------------- kernels


def _similarity(a: Tensor, b: Tensor, similarity: str, c0: float) -> Tensor:
    """(n, m) similarity between rows of ``a`` (n, D) and ``b`` (m, D)."""
    out = torch.empty(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    a, b = _wide(a, similarity), _wide(b, similarity)
    _fill_kernel(out, a, b, (a * a).sum(-1), (b * b).sum(-1), similarity)
    return out.neg_().add_(c0) if similarity == "linear" else out


def _wide(x: Tensor, similarity: str) -> Tensor:
    """``x`` in float64 (normalized for ``"cosine"``), where :func:`_fill_kernel` takes the
    products whose differences become distances."""
    x = x.double()
    return torch.nn.functional.normalize(x, dim=-1) if similarity == "cosine" else x


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """(n, m) Euclidean distances between rows of ``a`` (n, D) and ``b`` (m, D)."""
    out = torch.empty(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    a, b = a.double(), b.double()
    return _fill_kernel(out, a, b, (a * a).sum(-1), (b * b).sum(-1), "linear")


def _fill_kernel(out: Tensor, a: Tensor, b: Tensor, sq_a: Tensor, sq_b: Tensor,
                 similarity: str) -> Tensor:
    """Write into ``out`` (n, m) the similarity between rows of ``a`` (n, D) and ``b`` (m, D),
    with ``sq_*`` their squared norms (for ``"cosine"``, ``a`` and ``b`` normalized); for
    ``"linear"`` the distance, from which ``c0 - d`` follows once ``c0`` is known.

    Squared distances via ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product) in float64: in
    float32 the difference of those large terms loses up to 1e-3 of a near pair's similarity
    and makes a row less similar to itself than 1. ``a``, ``b`` and ``sq_*`` come in float64;
    the rest (square root, ``exp(-d / D)`` as ``exp2(-d * log2(e) / D)``) is done in ``out``'s
    dtype, which keeps its own precision (about 1e-7 relative in float32).
    """
    if similarity == "cosine":
        out.copy_(torch.mm(a, b.T))
        return out.add_(1.0).mul_(0.5).clamp_(0.0, 1.0)
    out.copy_(torch.addmm(sq_a[:, None] + sq_b[None, :], a, b.T, alpha=-2.0))
    out.clamp_(min=0.0).sqrt_()
    if similarity == "exp":
        out.mul_(-_LOG2_E / a.shape[-1]).exp2_()
    return out


def _max_pairwise_distance(x: Tensor) -> float:
    """Largest Euclidean distance between two rows of ``x`` (n, D), blockwise."""
    step = max(1, _BLOCK_BYTES // (x.element_size() * max(1, x.shape[0])))
    best = 0.0
    for start in range(0, x.shape[0], step):
        best = max(best, float(_distances(x[start : start + step], x).max()))
    return best


def _rounding(dtype: torch.dtype, n: int) -> float:
    """Generous relative rounding error of a sum of ``n`` non-negative terms in ``dtype``."""
    return 64 * torch.finfo(dtype).eps * math.log2(n + 1)


def _group_kernel(
    xg: Tensor, sizes: list[int], similarity: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Similarity of a padded group, its first greedy gains and its segment maxima.

    ``xg`` (G, n, D) holds problem ``j`` in its first ``sizes[j]`` rows, with ``n`` a multiple
    of ``_SEGMENT``. Returns the (G, n, n) kernel, 0 on padded rows and columns; its (G, n)
    row sums, the gains of every column before any selection (-inf on padding), summed
    blockwise, so only up to rounding the way :meth:`_Coverage.all_gains` sums them; and the
    (G, n, n / _SEGMENT) largest similarity of every row within each segment of
    ``_SEGMENT`` columns. The kernel is built in cache-sized square blocks on and above the
    diagonal (one matrix product each), each mirrored below it, so it is exactly symmetric:
    a row is also a column. Sums and maxima are taken while blocks are hot.
    """
    g, n, _ = xg.shape
    kern = torch.empty(g, n, n, dtype=xg.dtype, device=xg.device)
    if kern.device.type == "cpu":
        # Fault the pages in with one cheap strided write: first touches from the threads of
        # the matrix products below contend and cost more than the products themselves.
        kern.view(-1)[:: 4096 // kern.element_size()].zero_()
    first = torch.zeros(g, n, dtype=xg.dtype, device=xg.device)
    peak = torch.empty(g, n, n // _SEGMENT, dtype=xg.dtype, device=xg.device)
    xg = _wide(xg, similarity)
    sq = (xg * xg).sum(-1)
    side = math.isqrt(_CACHE_ELEMENTS) // _SEGMENT * _SEGMENT
    c0 = [0.0] * g
    for j, m in enumerate(sizes):
        xj, sqj = xg[j], sq[j]
        for lo in range(0, n, side):
            rows = slice(lo, min(lo + side, n))
            for lo2 in range(lo, n, side):
                cols = slice(lo2, min(lo2 + side, n))
                blk = _fill_kernel(kern[j, rows, cols], xj[rows], xj[cols], sqj[rows],
                                   sqj[cols], similarity)
                if lo2 + blk.shape[1] > m:  # padding: 0 in padded rows and columns
                    blk[:, max(0, m - lo2) :].zero_()
                    blk[max(0, m - lo) :].zero_()
                if similarity == "linear":
                    c0[j] = max(c0[j], float(blk.max()))
                if lo2 == lo:  # the product is symmetric only up to rounding: mirror it
                    upper = torch.triu(blk, diagonal=1).T
                    blk.triu_().add_(upper)
                else:
                    kern[j, cols, rows].copy_(blk.T)
                if similarity != "linear":
                    first[j, rows] += blk.sum(dim=1)
                    _segment_max(blk, peak[j, rows, lo2 // _SEGMENT :])
                    if lo2 != lo:
                        first[j, cols] += blk.sum(dim=0)
                        _segment_max(kern[j, cols, rows], peak[j, cols, lo // _SEGMENT :])
    if similarity == "linear":  # c0 - d needs the largest distance of the whole problem
        step = max(1, _CACHE_ELEMENTS // n)
        for j, m in enumerate(sizes):
            for start in range(0, m, step):
                blk = kern[j, start : min(start + step, m), :m]
                blk.neg_().add_(c0[j])
                first[j, start : start + blk.shape[0]] = blk.sum(dim=1)
            for start in range(0, n, step):
                blk = kern[j, start : start + step]
                _segment_max(blk, peak[j, start : start + step])
    for j, m in enumerate(sizes):
        first[j, m:] = -math.inf
    return kern, first, peak


def _segment_max(blk: Tensor, out: Tensor) -> None:
    """Largest value of each row of ``blk`` within each run of ``_SEGMENT`` columns, written
    to the first columns of ``out``."""
    rows, width = blk.shape
    runs = blk.view(rows, width // _SEGMENT, _SEGMENT)
    torch.amax(runs, dim=-1, out=out[:, : width // _SEGMENT])


# --------------------------------------------------------------------------- greedy engine


def _solve(
    x: Tensor,
    problems: list[_Problem],
    similarity: str,
    method: str,
    epsilon: float,
    generator: torch.Generator | None,
    max_memory: int,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Greedy-solve every problem.

    Returns, per problem: the selected rows in greedy order, the medoid row of each of its rows
    and the marginal gain of each pick.

    Problems are sorted by size and packed into groups whose padded kernels fit ``max_memory``;
    a group is solved with one batched greedy loop.
    """
    selected: list[Tensor] = [torch.empty(0)] * len(problems)
    assigned: list[Tensor] = [torch.empty(0)] * len(problems)
    gains: list[Tensor] = [torch.empty(0)] * len(problems)
    order = sorted(range(len(problems)), key=lambda i: problems[i].rows.numel())
    itemsize = x.element_size()
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order):
            if (end + 1 - start) * _kernel_bytes(problems[order[end]], itemsize) > max_memory:
                break
            end += 1
        group = [problems[i] for i in order[start:end]]
        out = _solve_group(x, group, similarity, method, epsilon, generator)
        for j, i in enumerate(order[start:end]):
            selected[i], assigned[i], gains[i] = out[0][j], out[1][j], out[2][j]
        start = end
    return selected, assigned, gains


def _padded(rows: int) -> int:
    """Kernel side for a problem of ``rows`` rows: a whole number of segments."""
    return -(-rows // _SEGMENT) * _SEGMENT


def _kernel_bytes(problem: _Problem, itemsize: int) -> int:
    """Bytes of a problem's padded kernel and its segment maxima."""
    n = _padded(problem.rows.numel())
    return n * (n + n // _SEGMENT) * itemsize


def _solve_group(
    x: Tensor,
    group: list[_Problem],
    similarity: str,
    method: str,
    epsilon: float,
    generator: torch.Generator | None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Batched greedy over a group of problems padded to a common size."""
    device = x.device
    g = len(group)
    sizes = torch.tensor([p.rows.numel() for p in group], device=device)
    ks = torch.tensor([p.k for p in group], device=device)
    n = _padded(int(sizes.max()))
    k_max = int(ks.max())
    valid = torch.arange(n, device=device)[None, :] < sizes[:, None]
    # The rows of a large problem go in k-d tree order, so that the pairs of a row that
    # still contribute sit in few segments of its kernel row. pos[j]: the position within
    # problem j of the row in each column.
    pos = [torch.arange(p.rows.numel(), device=device) for p in group]
    large = [j for j, p in enumerate(group) if p.rows.numel() > max(_ORDER_ROWS, _SEGMENT)]
    if large:  # one k-d tree pass over all of them, down to leaves of at most a segment
        counts = sizes[large]
        owner = torch.repeat_interleave(torch.arange(len(large), device=device), counts)
        flat = torch.cat([group[j].rows for j in large])
        levels = math.ceil(math.log2(int(counts.max()) / _SEGMENT))
        perm, _ = _kd_order(x[flat], owner, levels)
        perm -= (torch.cumsum(counts, 0) - counts)[owner]  # -> position within its problem
        for j, order in zip(large, torch.split(perm, counts.tolist()), strict=True):
            pos[j] = order
    rows = torch.full((g, n), x.shape[0], dtype=torch.long, device=device)
    orders = []  # column of each of the problem's rows
    for j, p in enumerate(group):
        rows[j, : p.rows.numel()] = p.rows[pos[j]]
        orders.append(torch.empty_like(pos[j]).scatter_(0, pos[j], torch.arange(
            p.rows.numel(), device=device)))
    kern, first, peak = _group_kernel(x[rows.clamp(max=x.shape[0] - 1)],
                                      [p.rows.numel() for p in group], similarity)
    cov = _Coverage(kern, valid, rows, peak, None if method == "naive" else first)

    picks = torch.zeros(g, max(k_max, 1), dtype=torch.long, device=device)
    gain_of = torch.zeros(g, max(k_max, 1), dtype=x.dtype, device=device)
    n_samples = torch.ceil(sizes / ks.clamp(min=1) * math.log(1.0 / epsilon)).long()
    act = torch.arange(g, device=device)  # problems still selecting
    until = int(ks.min())  # the first step at which some problem of act is done
    for t in range(k_max):
        if t >= until:
            act = act[ks[act] > t]
            until = int(ks[act].min())
        if method == "lazy":
            best, gain = cov.best(act)
        elif method == "naive":
            gains = cov.all_gains()[act].masked_fill_(cov.taken[act], -math.inf)
            gain = gains.max(dim=1).values
            best = cov.first_row(act, gains == gain[:, None])
        else:
            best, gain = _stochastic_step(cov, act, n_samples, generator)
        picks[act, t] = best
        gain_of[act, t] = gain
        cov.add(act, best, t)

    sel = rows.gather(1, picks)
    asg = sel.gather(1, cov.owner)  # padded rows: any medoid, cut off below
    return (
        [sel[j, : p.k] for j, p in enumerate(group)],
        [asg[j, order] for j, order in enumerate(orders)],
        [gain_of[j, : p.k] for j, p in enumerate(group)],
    )


# Columns per problem compared afresh when known gains are within rounding of each other.
_NEAR = 4


class _Coverage:
    """Coverage state of a padded group of problems and its marginal gains.

    ``cur[g, i]`` is the best similarity of row ``i`` to a selected medoid (0 before any) and
    ``owner[g, i]`` the greedy step that selected that medoid. The gain of candidate ``j`` is
    ``sum_i max(0, s_ij - cur_i)``. The kernel is exactly symmetric, so a candidate's
    similarities are a kernel row, and so are a covered row's.

    ``known`` (float64; not kept for naive greedy) holds every gain, kept up to date
    incrementally: when a selection raises the coverage of row ``i`` from ``a`` to ``b``, the
    gain of every candidate ``j`` drops by ``max(0, min(s_ij, b) - a)``. So a step reads only
    the kernel rows whose coverage rose (few, once medoids are spread out), and of those only
    the segments whose largest similarity (``peak``) beats ``a``; no gain is re-summed from
    scratch, except when a selection raises the coverage of most rows (the first one does):
    then all are summed afresh, which costs no more.

    Rounding: ``known`` is accurate to float64 rounding, naive greedy's gains (summed afresh
    by :meth:`all_gains` in the kernel dtype) only to the kernel dtype's. :meth:`best` sums the
    few columns within that of the best afresh, the way naive greedy does: the same choice,
    ties included.
    """

    def __init__(self, kern: Tensor, valid: Tensor, rows: Tensor, peak: Tensor,
                 first: Tensor | None) -> None:
        self.kern = kern
        self.g, self.n = valid.shape
        self.valid = valid
        self.rows = rows  # the data row of every column: ties go to the lowest
        self.peak = peak  # (G, n, n / _SEGMENT) segment maxima of the kernel rows
        self.taken = ~valid  # selected or padded columns
        self.cur = torch.zeros(self.g, self.n, dtype=kern.dtype, device=kern.device)
        self.owner = torch.zeros(self.g, self.n, dtype=torch.long, device=kern.device)
        chunk = max(self.g, _CACHE_ELEMENTS // self.n)
        self._scratch = torch.empty(chunk, self.n, dtype=kern.dtype, device=kern.device)
        self._rows = int(valid.sum())
        self.known: Tensor | None = None
        self._slack = 0.0  # how far ``known`` may be from naive greedy's sums, absolute
        self._settled = False  # whether ``known`` was summed afresh since coverage last rose
        if first is not None:  # summed blockwise in the kernel dtype, naive's sums by rows
            self._know(first.to(torch.float64), _rounding(kern.dtype, self.n))
            self._drop = torch.empty(self.g, self.n, dtype=torch.float64, device=kern.device)
            step = _CACHE_ELEMENTS // _SEGMENT
            self._segments = torch.empty(step, _SEGMENT, dtype=kern.dtype, device=kern.device)
            self._wide = torch.empty(step, _SEGMENT, dtype=torch.float64, device=kern.device)

    def _refresh(self) -> None:
        """Sum every gain afresh, in float64: a gain of 0 is then exactly 0."""
        # Later drops are rounded to the kernel dtype, each relative to itself, and a
        # candidate's drops add up to at most its gain now.
        rounding = 2 * torch.finfo(self.kern.dtype).eps + _rounding(torch.float64, self.n)
        self._know(self.all_gains(dtype=torch.float64), rounding)
        self._settled = True

    def _know(self, gains: Tensor, rounding: float) -> None:
        """Take ``gains`` as the known gains, accurate to ``rounding`` relative to the largest
        (naive greedy's own rounding, relative to each gain, is added in :meth:`best`)."""
        self.known = gains.masked_fill_(self.taken, -math.inf)
        self._slack = rounding * max(1.0, float(self.known.max()))

    def all_gains(self, dtype: torch.dtype | None = None) -> Tensor:
        """(G, n) exact gains of every column, from the dense kernel in cache-sized row blocks,
        summed in ``dtype`` (default the kernel's); -inf on padding."""
        dtype = dtype or self.kern.dtype
        out = torch.empty(self.g, self.n, dtype=dtype, device=self.kern.device)
        step = self._scratch.shape[0]
        for j in range(self.g):
            kern, cur = self.kern[j], self.cur[j]
            for start in range(0, self.n, step):
                block = kern[start : start + step]
                diff = torch.sub(block, cur, out=self._scratch[: block.shape[0]]).clamp_(min=0.0)
                torch.sum(diff, dim=-1, dtype=dtype, out=out[j, start : start + step])
        return out.masked_fill_(~self.valid, -math.inf)

    def gains(self, prob: Tensor, cand: Tensor) -> Tensor:
        """(P, B) exact gains of candidate columns ``cand`` (P, B) of problems ``prob``, summed
        from the kernel as :meth:`all_gains` sums them."""
        # Rows gathered a cache-sized chunk of candidates at a time into one scratch buffer.
        kern, cur = self.kern.view(-1, self.n), self.cur[prob][:, None, :]
        out = torch.empty(cand.shape, dtype=kern.dtype, device=kern.device)
        step = max(1, self._scratch.shape[0] // prob.numel())
        for start in range(0, cand.shape[1], step):
            part = (prob[:, None] * self.n + cand[:, start : start + step]).flatten()
            rows = torch.index_select(kern, 0, part, out=self._scratch[: part.numel()])
            rows = rows.view(prob.numel(), -1, self.n).sub_(cur).clamp_(min=0.0)
            out[:, start : start + step] = rows.sum(-1)
        return out

    def best(self, act: Tensor, cand: Tensor | None = None,
             use: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Naive greedy's choice for problems ``act`` among columns ``cand`` (P, C) where
        ``use`` (default: among every column not taken), and its gain: the highest gain, the
        lowest data row on ties. Known gains within rounding of the best are summed afresh."""
        assert self.known is not None
        if cand is None:
            score = self.known if act.numel() == self.g else self.known[act]
        else:
            assert use is not None
            score = self.known[act[:, None], cand].masked_fill_(~use, -math.inf)
        vals, pos = score.topk(min(_NEAR, score.shape[1]), dim=1)
        cols = pos if cand is None else cand.gather(1, pos)
        top = vals[:, :1]
        # Gains within this of the best may be the best by naive greedy's sums.
        floor = top - torch.clamp(top.abs() * _rounding(self.kern.dtype, self.n),
                                  min=self._slack)
        near = vals >= floor
        ties = int(near.sum(dim=1).max())
        if ties == 1:
            return cols[:, 0], vals[:, 0].to(self.kern.dtype)
        if ties == vals.shape[1] and bool((top <= self._slack).any()):
            # Many gains near 0 (duplicated rows, or more medoids than distinct rows): those
            # that are exactly 0 need no summing, once rounding cannot blur them.
            if not self._settled:
                self._refresh()
                return self.best(act, cand, use)
            zero = top.squeeze(1) == 0
            if bool(zero.any()):
                choice = torch.empty_like(act)
                gain = torch.zeros(act.numel(), dtype=self.kern.dtype, device=act.device)
                some = None if cand is None else cand[zero]
                choice[zero] = self.first_row(act[zero], score[zero] == 0, some)
                if not bool(zero.all()):
                    rest = ~zero
                    choice[rest], gain[rest] = self.best(
                        act[rest], None if cand is None else cand[rest],
                        None if use is None else use[rest])
                return choice, gain
        if ties == vals.shape[1]:  # maybe more near ties than looked at: compare them all
            if cand is None:
                cand = torch.arange(self.n, device=act.device).expand_as(score)
            near = score >= floor
            width = int(near.sum(dim=1).max())
            cols = torch.where(near, cand, self.n).topk(width, dim=1, largest=False).values
            near = cols < self.n
            cols = cols.clamp(max=self.n - 1)
        fresh = self.gains(act, cols).masked_fill_(~near, -math.inf)
        gain = fresh.max(dim=1, keepdim=True).values
        return self.first_row(act, fresh == gain, cols), gain.squeeze(1)

    def first_row(self, act: Tensor, tied: Tensor, cols: Tensor | None = None) -> Tensor:
        """Of the columns ``cols`` (P, C) (default every column) of problems ``act`` where
        ``tied``, the one holding the lowest data row."""
        rows = self.rows[act] if cols is None else self.rows[act[:, None], cols]
        pos = rows.masked_fill(~tied, torch.iinfo(rows.dtype).max).argmin(dim=1)
        return pos if cols is None else cols.gather(1, pos[:, None]).squeeze(1)

    def add(self, act: Tensor, best: Tensor, t: int) -> None:
        """Record that problems ``act`` selected columns ``best`` at greedy step ``t``."""
        self.taken[act, best] = True
        new = self.kern[act, best]  # (P, n): the medoid's row, hence its column
        cur = self.cur if act.numel() == self.g else self.cur[act]
        rows = (new > cur).view(-1).nonzero().squeeze(1)
        new = torch.index_select(new.view(-1), 0, rows)
        prob = torch.div(rows, self.n, rounding_mode="floor")
        if act.numel() < self.g:  # rows of the active problems -> rows of all
            prob = torch.index_select(act, 0, prob)
            rows = rows % self.n + prob * self.n
        cur = self.cur.view(-1)
        old = torch.index_select(cur, 0, rows)
        cur[rows] = new
        self.owner.view(-1)[rows] = t
        if self.known is None:
            return
        if 2 * rows.numel() > self._rows:  # most rows: sum every gain afresh
            self._refresh()
        else:
            self.known[act, best] = -math.inf
            if rows.numel():
                self._lower(rows, prob, old, new)
                self._settled = False

    def _lower(self, rows: Tensor, prob: Tensor, old: Tensor, new: Tensor) -> None:
        """Lower the known gains for the coverage of flat ``rows`` (of problems ``prob``)
        rising from ``old`` to ``new``. Only the segments of their kernel rows whose largest
        similarity beats ``old`` are read (the others add nothing), a cache-sized batch at a
        time, and the drops are summed in float64."""
        assert self.known is not None
        per_row = self.n // _SEGMENT
        peak = torch.index_select(self.peak.view(-1, per_row), 0, rows)
        pick = torch.index_select  # much cheaper than advanced indexing for 1-D gathers
        row, seg = (peak > old[:, None]).nonzero(as_tuple=True)
        where = pick(rows, 0, row) * per_row + seg  # in the kernel viewed as segments
        into = pick(prob, 0, row) * per_row + seg  # in the drops viewed as segments
        kern = self.kern.view(-1, _SEGMENT)
        drop, wide = self._drop.zero_(), self._wide
        step = wide.shape[0]
        for lo in range(0, where.numel(), step):
            part = where[lo : lo + step]
            block = pick(kern, 0, part, out=self._segments[: part.numel()])
            r = row[lo : lo + step]
            torch.minimum(block, pick(new, 0, r)[:, None], out=block)
            block.sub_(pick(old, 0, r)[:, None]).clamp_(min=0.0)
            drop.view(-1, _SEGMENT).index_add_(0, into[lo : lo + step],
                                               wide[: part.numel()].copy_(block))
        self.known.sub_(drop)


def _stochastic_step(
    cov: _Coverage,
    act: Tensor,
    n_samples: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """One stochastic-greedy step: best of a uniform sample of unselected columns, its gain."""
    n = cov.n
    device = cov.kern.device
    s = int(n_samples[act].max().clamp(max=n))
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(act.numel(), n, generator=generator, device=gen_device).to(device)
    noise.masked_fill_(cov.taken[act], 2.0)
    vals, cand = noise.topk(s, dim=1, largest=False)  # random subset of untaken columns
    use = (vals <= 1.0) & (torch.arange(s, device=device)[None, :] < n_samples[act, None])
    return cov.best(act, cand, use)


# --------------------------------------------------------------------------- assignment


def _nearest_medoid(x: Tensor, rows: Tensor, medoids: Tensor, similarity: str) -> Tensor:
    """Row index of the most similar medoid for every row of ``rows`` (first on ties)."""
    xm = x[medoids]
    neg_sq = -(xm * xm).sum(-1)
    out = torch.empty(rows.numel(), dtype=torch.long, device=x.device)
    step = max(1, _BLOCK_BYTES // (x.element_size() * medoids.numel()))
    for start in range(0, rows.numel(), step):
        xb = x[rows[start : start + step]]
        if similarity == "cosine":
            score = _similarity(xb, xm, similarity, 0.0)
        else:  # exp and linear both decrease with distance: maximize 2 a.b - |b|^2
            score = torch.addmm(neg_sq, xb, xm.T, alpha=2.0)
        out[start : start + step] = medoids[score.argmax(dim=1)]
    return out


def _cluster_sizes(indices: Tensor, assignment: Tensor) -> Tensor:
    counts = torch.bincount(assignment, minlength=assignment.numel())
    return counts[indices]
