"""Large classes: spatially coherent partitions, k-d ordering, and their picks merged.

A class whose dense kernel would not fit the memory bound is split by :func:`partition`
(recursive median splits, :func:`kd_order`) into parts solved as separate problems; each part
gets its share of the budget (:func:`apportion`, times an overselection), the class keeps the
picks with the largest marginal gains (:func:`merge_partitions`), and its rows go to their
nearest medoid (:func:`nearest_medoid`). The greedy engine also puts the rows of large problems
in k-d order, so that the pairs of a row that still contribute sit in few kernel segments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from epic.selection.kernel import BLOCK_BYTES, similarity_matrix
from epic.selection.timing import phase

__all__ = ["apportion", "kd_order", "merge_partitions", "nearest_medoid", "partition"]


def apportion(k: int, sizes: list[int]) -> list[int]:
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


def merge_partitions(selected: list[Tensor], gains: list[Tensor], k: int) -> list[Tensor]:
    """Keep the ``k`` picks with the largest marginal gains over all partitions of a class.

    Each partition's picks are in greedy order, so a partition keeps a prefix of its picks.
    Were the partitions independent (F separable over them), this is exactly global greedy.
    """
    part = torch.cat([torch.full_like(s, i) for i, s in enumerate(selected)])
    top = torch.argsort(torch.cat(gains), descending=True, stable=True)[:k]
    counts = torch.bincount(part[top], minlength=len(selected)).tolist()
    return [s[:c] for s, c in zip(selected, counts, strict=True)]


def partition(x: Tensor, rows: Tensor, max_rows: int) -> list[Tensor]:
    """Split ``rows`` into spatially coherent parts of at most ``max_rows`` rows."""
    levels = math.ceil(math.log2(rows.numel() / max_rows))
    zero = torch.zeros(rows.numel(), dtype=torch.long, device=x.device)
    perm, leaf = kd_order(x[rows], zero, levels)
    counts = torch.bincount(leaf, minlength=1 << levels)
    return list(torch.split(rows[perm], counts.tolist()))


@phase("order")
def kd_order(xs: Tensor, seg: Tensor, levels: int) -> tuple[Tensor, Tensor]:
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


def nearest_medoid(x: Tensor, rows: Tensor, medoids: Tensor, similarity: str) -> Tensor:
    """Row index of the most similar medoid for every row of ``rows`` (first on ties)."""
    xm = x[medoids]
    neg_sq = -(xm * xm).sum(-1)
    out = torch.empty(rows.numel(), dtype=torch.long, device=x.device)
    step = max(1, BLOCK_BYTES // (x.element_size() * medoids.numel()))
    for start in range(0, rows.numel(), step):
        xb = x[rows[start : start + step]]
        if similarity == "cosine":
            score = similarity_matrix(xb, xm, similarity, 0.0)
        else:  # exp and linear both decrease with distance: maximize 2 a.b - |b|^2
            score = torch.addmm(neg_sq, xb, xm.T, alpha=2.0)
        out[start : start + step] = medoids[score.argmax(dim=1)]
    return out
