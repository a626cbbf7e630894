"""The similarity kernel: blocked, exactly symmetric, with the segment maxima greedy reads.

:func:`similarity_matrix` gives the similarities between two sets of rows (``"exp"``,
``"linear"``, ``"cosine"``; see :mod:`epic.selection`), and :func:`group_kernel` the padded
kernels of a group of problems with their first gains and the largest similarity of every row
within each segment of :data:`SEGMENT` columns, which let the greedy engine
(:mod:`epic.selection.greedy`) skip the pairs that can no longer contribute.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from epic.selection.timing import phase

__all__ = ["BLOCK_BYTES", "CACHE_ELEMENTS", "SEGMENT", "group_kernel", "max_pairwise_distance",
           "padded", "similarity_matrix"]

# Scratch memory (bytes) for blockwise work that is not the similarity matrix itself.
BLOCK_BYTES = 64 << 20
# exp(-d / D) is computed as exp2(-d * log2(e) / D): the same values, faster on
# CPUs (docs/selection.md).
_LOG2_E = math.log2(math.e)
# Columns per segment of a kernel row; a segment whose largest similarity does not beat a
# row's coverage holds no pair that still contributes.
SEGMENT = 64
# Elements per block of the blocked kernel passes (pieces that stay in cache).
CACHE_ELEMENTS = 1 << 18


def similarity_matrix(a: Tensor, b: Tensor, similarity: str, c0: float) -> Tensor:
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

    For a float32 ``out``, squared distances via ``|a|^2 + |b|^2 - 2 a.b`` (one matrix
    product) in float64: in float32 the difference of those large terms loses up to 1e-3 of a
    near pair's similarity and makes a row less similar to itself than 1; in float64 its
    error, about 1e-8 of a row's norm once square-rooted, is below float32's resolution. A
    float64 ``out`` needs more than that and gets distances from direct differences (for
    ``"cosine"``, between the unit rows: a row and its copies are then exactly 1). ``a``,
    ``b`` and ``sq_*`` come in float64; the rest (square root, ``exp(-d / D)`` as
    ``exp2(-d * log2(e) / D)``) is done in ``out``'s dtype, which keeps its own precision
    (about 1e-7 relative in float32).
    """
    if out.dtype == torch.float64:
        out.copy_(torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist"))
        if similarity == "cosine":  # (1 + cos) / 2 = 1 - |a - b|^2 / 4 for unit rows
            return out.square_().mul_(-0.25).add_(1.0).clamp_(0.0, 1.0)
    elif similarity == "cosine":
        out.copy_(torch.mm(a, b.T))
        return out.add_(1.0).mul_(0.5).clamp_(0.0, 1.0)
    else:
        out.copy_(torch.addmm(sq_a[:, None] + sq_b[None, :], a, b.T, alpha=-2.0))
        out.clamp_(min=0.0).sqrt_()
    if similarity == "exp":
        out.mul_(-_LOG2_E / a.shape[-1]).exp2_()
    return out


def max_pairwise_distance(x: Tensor) -> float:
    """Largest Euclidean distance between two rows of ``x`` (n, D), blockwise."""
    step = max(1, BLOCK_BYTES // (x.element_size() * max(1, x.shape[0])))
    best = 0.0
    for start in range(0, x.shape[0], step):
        best = max(best, float(_distances(x[start : start + step], x).max()))
    return best


@phase("kernel")
def group_kernel(
    xg: Tensor, sizes: list[int], similarity: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Similarity of a padded group, its first greedy gains and its segment maxima.

    ``xg`` (G, n, D) holds problem ``j`` in its first ``sizes[j]`` rows, with ``n`` a multiple
    of ``SEGMENT``. Returns the (G, n, n) kernel, 0 on padded rows and columns; its (G, n)
    row sums, the gains of every column before any selection (-inf on padding), summed
    blockwise, so only up to rounding the way
    :meth:`~epic.selection.coverage.Coverage.all_gains` sums them; and the
    (G, n, n / SEGMENT) largest similarity of every row within each segment of
    ``SEGMENT`` columns. The kernel is built in cache-sized square blocks on and above the
    diagonal (one matrix product each), each mirrored below it, so it is exactly symmetric:
    a row is also a column. Sums and maxima are taken while blocks are hot, which is why the
    function is one long loop rather than passes over the kernel (each pass would read the
    whole kernel from memory again: ``benchmarks/selection_speed.py``).
    """
    g, n, _ = xg.shape
    kern = torch.empty(g, n, n, dtype=xg.dtype, device=xg.device)
    if kern.device.type == "cpu":
        # Fault the pages in with one cheap strided write: first touches from the threads of
        # the matrix products below contend and cost more than the products themselves.
        kern.view(-1)[:: 4096 // kern.element_size()].zero_()
    first = torch.zeros(g, n, dtype=xg.dtype, device=xg.device)
    peak = torch.empty(g, n, n // SEGMENT, dtype=xg.dtype, device=xg.device)
    xg = _wide(xg, similarity)
    sq = (xg * xg).sum(-1)
    side = math.isqrt(CACHE_ELEMENTS) // SEGMENT * SEGMENT
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
                    _segment_max(blk, peak[j, rows, lo2 // SEGMENT :])
                    if lo2 != lo:
                        first[j, cols] += blk.sum(dim=0)
                        _segment_max(kern[j, cols, rows], peak[j, cols, lo // SEGMENT :])
    if similarity == "linear":  # c0 - d needs the largest distance of the whole problem
        step = max(1, CACHE_ELEMENTS // n)
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
    """Largest value of each row of ``blk`` within each run of ``SEGMENT`` columns, written
    to the first columns of ``out``."""
    rows, width = blk.shape
    runs = blk.view(rows, width // SEGMENT, SEGMENT)
    torch.amax(runs, dim=-1, out=out[:, : width // SEGMENT])



def padded(rows: int) -> int:
    """Kernel side for a problem of ``rows`` rows: a whole number of segments."""
    return -(-rows // SEGMENT) * SEGMENT
