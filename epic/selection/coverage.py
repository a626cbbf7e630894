"""Coverage state and marginal gains of a group of padded facility-location problems.

:class:`Coverage` holds each problem's coverage and every candidate's marginal gain, kept up to
date incrementally as medoids are selected; :meth:`Coverage.best` makes naive greedy's choice
from them, ties and near ties included. The greedy loop around it is in
:mod:`epic.selection.greedy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from epic.selection.kernel import CACHE_ELEMENTS, SEGMENT
from epic.selection.timing import phase

__all__ = ["Coverage"]


def _rounding(dtype: torch.dtype, n: int) -> float:
    """Generous relative rounding error of a sum of ``n`` non-negative terms in ``dtype``."""
    return 64 * torch.finfo(dtype).eps * math.log2(n + 1)


# Columns per problem compared afresh when known gains are within rounding of each other.
_NEAR = 4


@dataclass
class _Top:
    """The known gains of some problems as :meth:`Coverage.best` reads them: ``score`` (P, C),
    its ``_NEAR`` highest ``vals`` in columns ``cols``, the ``floor`` (P, 1) above which a
    gain may be the best by naive greedy's sums, the candidate columns ``cand`` (None: all)."""

    score: Tensor
    vals: Tensor
    cols: Tensor
    floor: Tensor
    cand: Tensor | None
    slack: float

    def crowded_near_zero(self) -> bool:
        """Whether some problem's highest gains are all near its best and a best is near 0."""
        ties = int((self.vals >= self.floor).sum(dim=1).max())
        return ties == self.vals.shape[1] and bool((self.vals[:, 0] <= self.slack).any())

    def subset(self, rows: Tensor) -> _Top:
        """The same for the problems where ``rows``."""
        return _Top(self.score[rows], self.vals[rows], self.cols[rows], self.floor[rows],
                    None if self.cand is None else self.cand[rows], self.slack)


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
        lowest data row on ties.

        1. Take each problem's ``_NEAR`` highest known gains.
        2. If, in some problem, all of those are within rounding of a best that is itself
           within rounding of 0 (duplicated rows, or more medoids than distinct rows), sum
           every gain afresh in float64 first, once per rise in coverage: a gain of 0 is then
           exactly 0.
        3. After that, a problem whose best gain is exactly 0 takes its lowest zero-gain row.
        4. The others: if every problem has a single known gain within rounding of its best,
           that one; else the gains within rounding of the best (all of them if more than
           ``_NEAR`` are) are summed afresh the way naive greedy sums them, and the highest
           wins, the lowest data row on ties.
        """
        top = self._top(act, cand, use)
        if top.crowded_near_zero() and not self._settled:
            self._refresh()
            top = self._top(act, cand, use)
        if not (top.crowded_near_zero() and self._settled):
            return self._sum_near(act, top)
        zero = top.vals[:, 0] == 0
        choice = torch.empty_like(act)
        gain = torch.zeros(act.numel(), dtype=self.kern.dtype, device=act.device)
        some = None if top.cand is None else top.cand[zero]
        choice[zero] = self.first_row(act[zero], top.score[zero] == 0, some)
        rest = ~zero
        if bool(rest.any()):
            choice[rest], gain[rest] = self._sum_near(act[rest], top.subset(rest))
        return choice, gain

    def _top(self, act: Tensor, cand: Tensor | None, use: Tensor | None) -> _Top:
        """Step 1 of :meth:`best`: the known gains of problems ``act`` and their highest."""
        assert self.known is not None
        if cand is None:
            score = self.known if act.numel() == self.g else self.known[act]
        else:
            assert use is not None
            score = self.known[act[:, None], cand].masked_fill_(~use, -math.inf)
        vals, pos = score.topk(min(_NEAR, score.shape[1]), dim=1)
        best = vals[:, :1]
        # Gains within this of the best may be the best by naive greedy's sums.
        floor = best - torch.clamp(best.abs() * _rounding(self.kern.dtype, self.n),
                                   min=self._slack)
        return _Top(score, vals, pos if cand is None else cand.gather(1, pos), floor, cand,
                    self._slack)

    def _sum_near(self, act: Tensor, top: _Top) -> tuple[Tensor, Tensor]:
        """Step 4 of :meth:`best`."""
        near = top.vals >= top.floor
        ties = int(near.sum(dim=1).max())
        if ties == 1:
            return top.cols[:, 0], top.vals[:, 0].to(self.kern.dtype)
        cols = top.cols
        if ties == top.vals.shape[1]:  # maybe more near ties than looked at: compare them all
            cand = top.cand
            if cand is None:
                cand = torch.arange(self.n, device=act.device).expand_as(top.score)
            near = top.score >= top.floor
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
