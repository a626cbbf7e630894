"""The greedy engine: batched facility-location greedy over a group of padded problems.

:func:`solve` packs the problems (classes, or partitions of large classes) into groups whose
padded kernels fit the memory bound and runs one batched greedy loop per group
(:func:`solve_group`): every step selects, for each active problem, the column
:meth:`~epic.selection.coverage.Coverage.best` names (naive greedy's choice), or
:func:`stochastic_step`'s (stochastic greedy's), and records it in the
:class:`~epic.selection.coverage.Coverage`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from epic.selection.coverage import Coverage
from epic.selection.kernel import SEGMENT, group_kernel, padded
from epic.selection.partition import kd_order

__all__ = ["Problem", "solve", "solve_group", "stochastic_step"]

# Problems with more rows are put in k-d tree order before their kernel is built; for smaller
# ones, like the 1,000-row partitions of a large class, ordering costs more than it saves.
_ORDER_ROWS = 2048


@dataclass
class Problem:
    """One greedy subproblem: a class, or one partition of a large class."""

    rows: Tensor  # (n,) int64 row indices into x
    k: int


def solve(
    x: Tensor,
    problems: list[Problem],
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
        out = solve_group(x, group, similarity, method, epsilon, generator)
        for j, i in enumerate(order[start:end]):
            selected[i], assigned[i], gains[i] = out[0][j], out[1][j], out[2][j]
        start = end
    return selected, assigned, gains


def _kernel_bytes(problem: Problem, itemsize: int) -> int:
    """Bytes of a problem's padded kernel and its segment maxima."""
    n = padded(problem.rows.numel())
    return n * (n + n // SEGMENT) * itemsize


def _layout(x: Tensor, group: list[Problem], sizes: Tensor, n: int
            ) -> tuple[Tensor, list[Tensor]]:
    """The group's rows padded to ``(G, n)`` (padding: ``len(x)``), and per problem the column
    of each of its rows."""
    device = x.device
    # The rows of a large problem go in k-d tree order, so that the pairs of a row that
    # still contribute sit in few segments of its kernel row. pos[j]: the position within
    # problem j of the row in each column.
    pos = [torch.arange(p.rows.numel(), device=device) for p in group]
    large = [j for j, p in enumerate(group) if p.rows.numel() > max(_ORDER_ROWS, SEGMENT)]
    if large:  # one k-d tree pass over all of them, down to leaves of at most a segment
        counts = sizes[large]
        owner = torch.repeat_interleave(torch.arange(len(large), device=device), counts)
        flat = torch.cat([group[j].rows for j in large])
        levels = math.ceil(math.log2(int(counts.max()) / SEGMENT))
        perm, _ = kd_order(x[flat], owner, levels)
        perm -= (torch.cumsum(counts, 0) - counts)[owner]  # -> position within its problem
        for j, order in zip(large, torch.split(perm, counts.tolist()), strict=True):
            pos[j] = order
    rows = torch.full((len(group), n), x.shape[0], dtype=torch.long, device=device)
    orders = []  # column of each of the problem's rows
    for j, p in enumerate(group):
        rows[j, : p.rows.numel()] = p.rows[pos[j]]
        orders.append(torch.empty_like(pos[j]).scatter_(0, pos[j], torch.arange(
            p.rows.numel(), device=device)))
    return rows, orders


def solve_group(
    x: Tensor,
    group: list[Problem],
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
    n = padded(int(sizes.max()))
    k_max = int(ks.max())
    valid = torch.arange(n, device=device)[None, :] < sizes[:, None]
    rows, orders = _layout(x, group, sizes, n)
    kern, first, peak = group_kernel(x[rows.clamp(max=x.shape[0] - 1)],
                                      [p.rows.numel() for p in group], similarity)
    cov = Coverage(kern, valid, rows, peak, None if method == "naive" else first)

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
            best, gain = stochastic_step(cov, act, n_samples, generator)
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


def stochastic_step(
    cov: Coverage,
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
