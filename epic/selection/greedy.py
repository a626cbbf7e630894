"""The greedy engine: batched facility-location greedy over a group of padded problems.

:func:`solve` packs the problems (classes, or partitions of large classes) into groups whose
padded kernels fit the memory bound and runs one batched greedy loop per group
(:func:`solve_group`). :class:`Coverage` holds each problem's coverage and every candidate's
marginal gain, kept up to date incrementally; :meth:`Coverage.best` makes naive greedy's choice
from them, and :func:`stochastic_step` the stochastic-greedy one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from epic.selection.kernel import CACHE_ELEMENTS, SEGMENT, group_kernel, padded
from epic.selection.partition import kd_order
from epic.selection.timing import phase

__all__ = ["Coverage", "Problem", "solve", "solve_group", "stochastic_step"]

# Problems with more rows are put in k-d tree order before their kernel is built; for smaller
# ones, like the 1,000-row partitions of a large class, ordering costs more than it saves.
_ORDER_ROWS = 2048


@dataclass
class Problem:
    """One greedy subproblem: a class, or one partition of a large class."""

    rows: Tensor  # (n,) int64 row indices into x
    k: int


def _rounding(dtype: torch.dtype, n: int) -> float:
    """Generous relative rounding error of a sum of ``n`` non-negative terms in ``dtype``."""
    return 64 * torch.finfo(dtype).eps * math.log2(n + 1)


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
    rows = torch.full((g, n), x.shape[0], dtype=torch.long, device=device)
    orders = []  # column of each of the problem's rows
    for j, p in enumerate(group):
        rows[j, : p.rows.numel()] = p.rows[pos[j]]
        orders.append(torch.empty_like(pos[j]).scatter_(0, pos[j], torch.arange(
            p.rows.numel(), device=device)))
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


# Columns per problem compared afresh when known gains are within rounding of each other.
_NEAR = 4


class Coverage:
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
        self.peak = peak  # (G, n, n / SEGMENT) segment maxima of the kernel rows
        self.taken = ~valid  # selected or padded columns
        self.cur = torch.zeros(self.g, self.n, dtype=kern.dtype, device=kern.device)
        self.owner = torch.zeros(self.g, self.n, dtype=torch.long, device=kern.device)
        chunk = max(self.g, CACHE_ELEMENTS // self.n)
        self._scratch = torch.empty(chunk, self.n, dtype=kern.dtype, device=kern.device)
        self._rows = int(valid.sum())
        self.known: Tensor | None = None
        self._slack = 0.0  # how far ``known`` may be from naive greedy's sums, absolute
        self._settled = False  # whether ``known`` was summed afresh since coverage last rose
        if first is not None:  # summed blockwise in the kernel dtype, naive's sums by rows
            self._know(first.to(torch.float64), _rounding(kern.dtype, self.n))
            self._drop = torch.empty(self.g, self.n, dtype=torch.float64, device=kern.device)
            step = CACHE_ELEMENTS // SEGMENT
            self._segments = torch.empty(step, SEGMENT, dtype=kern.dtype, device=kern.device)
            self._wide = torch.empty(step, SEGMENT, dtype=torch.float64, device=kern.device)

    @phase("fresh_pass")
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

    @phase("choose")
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

    @phase("updates")
    def _lower(self, rows: Tensor, prob: Tensor, old: Tensor, new: Tensor) -> None:
        """Lower the known gains for the coverage of flat ``rows`` (of problems ``prob``)
        rising from ``old`` to ``new``. Only the segments of their kernel rows whose largest
        similarity beats ``old`` are read (the others add nothing), a cache-sized batch at a
        time, and the drops are summed in float64."""
        assert self.known is not None
        per_row = self.n // SEGMENT
        peak = torch.index_select(self.peak.view(-1, per_row), 0, rows)
        pick = torch.index_select  # much cheaper than advanced indexing for 1-D gathers
        row, seg = (peak > old[:, None]).nonzero(as_tuple=True)
        where = pick(rows, 0, row) * per_row + seg  # in the kernel viewed as segments
        into = pick(prob, 0, row) * per_row + seg  # in the drops viewed as segments
        kern = self.kern.view(-1, SEGMENT)
        drop, wide = self._drop.zero_(), self._wide
        step = wide.shape[0]
        for lo in range(0, where.numel(), step):
            part = where[lo : lo + step]
            block = pick(kern, 0, part, out=self._segments[: part.numel()])
            r = row[lo : lo + step]
            torch.minimum(block, pick(new, 0, r)[:, None], out=block)
            block.sub_(pick(old, 0, r)[:, None]).clamp_(min=0.0)
            drop.view(-1, SEGMENT).index_add_(0, into[lo : lo + step],
                                               wide[: part.numel()].copy_(block))
        self.known.sub_(drop)


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
