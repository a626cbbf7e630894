"""Tests of the per-class medoid selection engine (epic.selection)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import epic.selection.greedy as greedy
from epic.selection import Medoids, facility_location_value, find_isolated, select_medoids
from epic.selection.coverage import Coverage
from epic.selection.kernel import group_kernel
from epic.selection.partition import partition

KERNELS = ("exp", "linear", "cosine")


def blobs(n: int, classes: int, dim: int, *, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def planted(seed: int = 0):
    """10 classes of 500 Gaussian points plus 5 far-away planted points each."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, marks = [], [], []
    for c in range(10):
        center = 5.0 * torch.randn(8, generator=g)
        direction = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
        xs += [center + torch.randn(500, 8, generator=g), center + 30.0 * direction]
        ys.append(torch.full((505,), c))
        marks += [torch.zeros(500, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
    return torch.cat(xs), torch.cat(ys), torch.cat(marks)


def brute_force_best(x: torch.Tensor, k: int, similarity: str) -> float:
    y = torch.zeros(x.shape[0], dtype=torch.long)
    return max(
        facility_location_value(x, y, torch.tensor(s), similarity=similarity)
        for s in itertools.combinations(range(x.shape[0]), k)
    )


def check_consistent(med: Medoids, y: torch.Tensor) -> None:
    n = y.numel()
    assert med.indices.dtype == med.assignment.dtype == med.cluster_sizes.dtype == torch.long
    assert med.indices.unique().numel() == med.indices.numel()
    assert int(med.cluster_sizes.sum()) == n
    assert torch.equal(med.assignment[med.indices], med.indices)
    assert torch.isin(med.assignment, med.indices).all()
    assert torch.equal(y[med.assignment], y)
    expected = torch.bincount(med.assignment, minlength=n)[med.indices]
    assert torch.equal(med.cluster_sizes, expected)
    # grouped by ascending class
    assert torch.all(y[med.indices].diff() >= 0)


@pytest.fixture(params=["as given", "k-d order"])
def row_order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test as is, and with every problem's rows put in k-d tree order (which only
    problems of thousands of rows get by default)."""
    if request.param == "k-d order":
        monkeypatch.setattr(greedy, "_ORDER_ROWS", 0)


@pytest.mark.parametrize("similarity", KERNELS)
@pytest.mark.parametrize("seed", range(4))
def test_lazy_equals_naive(similarity: str, seed: int, row_order: None) -> None:
    x, y = blobs(400, 3, 5, seed=seed)
    naive = select_medoids(x, y, 0.3, similarity=similarity, method="naive")
    lazy = select_medoids(x, y, 0.3, similarity=similarity)
    assert torch.equal(lazy.indices, naive.indices)
    assert torch.equal(lazy.assignment, naive.assignment)
    assert torch.equal(lazy.cluster_sizes, naive.cluster_sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_gains_follow_fresh_sums(dtype: torch.dtype) -> None:
    # The incrementally updated gains equal gains summed afresh after every selection, to the
    # rounding of the kernel's terms.
    x, _ = blobs(300, 1, 4, seed=7, dtype=dtype)
    padded = torch.cat([x, torch.zeros(20, 4, dtype=dtype)])  # 320 = 5 segments of 64
    kern, first, peak = group_kernel(padded[None], [300], "exp")
    assert torch.equal(kern[0], kern[0].T)
    assert torch.equal(peak[0], kern[0].view(320, 5, 64).amax(-1))
    valid = (torch.arange(320) < 300)[None]
    cov = Coverage(kern, valid, torch.arange(320)[None], peak, first)
    act = torch.zeros(1, dtype=torch.long)
    for t in range(60):
        best, gain = cov.best(act)
        fresh = cov.all_gains(dtype=torch.float64).masked_fill_(cov.taken, -math.inf)
        assert int(best) == int(fresh.argmax())
        assert float(gain) == pytest.approx(float(fresh.max()), rel=1e-5)
        cov.add(act, best, t)
        assert cov.known is not None
        live = ~cov.taken
        fresh = cov.all_gains(dtype=torch.float64)
        eps = 64 * torch.finfo(dtype).eps
        atol = eps * float(first.max())
        assert torch.allclose(cov.known[live], fresh[live], rtol=eps, atol=atol)


def test_exact_ties_break_like_naive(row_order: None) -> None:
    # Pairs of points that only cover each other have exactly equal gains; lazy greedy picks
    # the lower index, as naive greedy does, although its gains are updated incrementally.
    g = torch.Generator().manual_seed(5)
    centers = 40.0 * torch.randn(30, 3, generator=g, dtype=torch.float64)
    offsets = 0.3 * torch.randn(30, 3, generator=g, dtype=torch.float64)
    x = torch.cat([centers, centers + offsets])[torch.randperm(60, generator=g)]
    y = torch.zeros(60, dtype=torch.long)
    for method in ("lazy", "stochastic"):
        gen = torch.Generator().manual_seed(1)
        got = select_medoids(x, y, 0.5, method=method, generator=gen)  # type: ignore[arg-type]
        assert got.indices.numel() == 30
    naive = select_medoids(x, y, 0.5, method="naive")
    lazy = select_medoids(x, y, 0.5)
    assert torch.equal(lazy.indices, naive.indices)
    assert torch.equal(lazy.assignment, naive.assignment)


def test_more_medoids_than_distinct_rows(row_order: None) -> None:
    # Like gradients of confidently classified examples, which are exactly 0: most rows are
    # duplicates, the budget exceeds the distinct rows, and the last picks all gain 0.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=g)[torch.randint(0, 7, (700,), generator=g)]
    x[::3] = 0.0
    y = torch.arange(700) % 2
    lazy = select_medoids(x, y, 0.1)
    naive = select_medoids(x, y, 0.1, method="naive")
    assert torch.equal(lazy.indices, naive.indices)
    assert torch.equal(lazy.assignment, naive.assignment)
    check_consistent(lazy, y)


@pytest.mark.parametrize("similarity", KERNELS)
def test_float32_lazy_equals_naive(similarity: str, row_order: None) -> None:
    # float32 input, spread-out points (kernel values far apart, so the drops are rounded)
    # and some duplicated rows (exact ties).
    x, y = blobs(600, 4, 10, seed=11, dtype=torch.float32)
    x = x * torch.linspace(0.5, 4.0, 600)[:, None]
    x[500:] = x[:100]
    lazy = select_medoids(x, y, 0.2, similarity=similarity)
    naive = select_medoids(x, y, 0.2, similarity=similarity, method="naive")
    assert torch.equal(lazy.indices, naive.indices)
    assert torch.equal(lazy.assignment, naive.assignment)


@pytest.mark.parametrize("similarity", KERNELS)
@pytest.mark.parametrize("seed", range(3))
def test_greedy_reaches_one_minus_one_over_e(similarity: str, seed: int) -> None:
    x, _ = blobs(11, 1, 3, seed=seed)
    y = torch.zeros(11, dtype=torch.long)
    k = 3
    best = brute_force_best(x, k, similarity)
    for method in ("lazy", "naive", "stochastic"):
        med = select_medoids(
            x, y, k / 11, similarity=similarity, method=method, generator=torch.Generator()
        )
        assert med.indices.numel() == k
        value = facility_location_value(x, y, med.indices, similarity=similarity)
        assert value >= (1 - 1 / math.e) * best - 1e-9


def test_stochastic_reproducible_with_generator() -> None:
    x, y = blobs(500, 3, 6, seed=2, dtype=torch.float32)

    def run(seed: int) -> Medoids:
        gen = torch.Generator().manual_seed(seed)
        return select_medoids(x, y, 0.1, method="stochastic", generator=gen)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.assignment, b.assignment)
    assert not torch.equal(a.indices, c.indices)
    check_consistent(c, y)
    exact = facility_location_value(x, y, select_medoids(x, y, 0.1).indices)
    assert facility_location_value(x, y, a.indices) >= 0.97 * exact


def toy_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: groups of 4 and 3 points and a loner; class 1: two groups of 3 (no exact
    ties)."""
    x = torch.tensor(
        [[0.0, 0.0], [0.4, 0.1], [0.2, 0.7], [1.0, 0.9], [5.0, 5.2], [5.3, 4.6], [4.1, 5.5],
         [9.0, 0.3], [2.0, 2.0], [2.6, 1.7], [3.1, 2.4], [7.5, 8.0], [7.9, 7.2], [8.6, 7.7]]
    )  # fmt: skip
    return x, torch.tensor([0] * 8 + [1] * 6)


def test_pinned_selection_on_toy_problem() -> None:
    x, y = toy_problem()
    med = select_medoids(x, y, 0.3)  # k = 3 and 2
    assert med.indices.tolist() == [1, 4, 7, 9, 12]
    assert med.assignment.tolist() == [1, 1, 1, 1, 4, 4, 4, 7, 9, 9, 9, 12, 12, 12]
    assert med.cluster_sizes.tolist() == [4, 3, 1, 3, 3]
    assert find_isolated(x, y, 0.3).nonzero().flatten().tolist() == [7]
    linear = select_medoids(x, y, 0.3, similarity="linear")
    assert linear.indices.tolist() == [3, 5, 7, 10, 12]


def test_planted_isolated_points_are_found(row_order: None) -> None:
    x, y, is_planted = planted()
    drop = find_isolated(x, y, fraction=0.1)
    assert drop.dtype == torch.bool and drop.shape == (x.shape[0],)
    assert drop[is_planted].all()
    assert drop[~is_planted].float().mean() <= 0.02


def test_find_isolated_threshold() -> None:
    # the toy problem's medoids 1, 4, 7, 9 and 12 hold clusters of 4, 3, 1, 3 and 3 rows
    x, y = toy_problem()
    flagged = {size: find_isolated(x, y, 0.3, max_cluster_size=size).nonzero().flatten()
               .tolist() for size in (1, 2, 3, 4)}
    assert flagged == {1: [7], 2: [7], 3: [4, 7, 9, 12], 4: [1, 4, 7, 9, 12]}


def test_invariants_and_budgets() -> None:
    x, y = blobs(503, 4, 6, seed=1, dtype=torch.float32)
    y[y == 2] = 7  # labels need not be contiguous
    med = select_medoids(x, y, 0.1)
    check_consistent(med, y)
    counts = torch.bincount(y[med.indices], minlength=8)
    for c in (0, 1, 3, 7):
        assert counts[c] == math.ceil(0.1 * int((y == c).sum()))
    equal = select_medoids(x, y, 0.1, per_class="equal")
    check_consistent(equal, y)
    k = math.ceil(0.1 * 503 / 4)
    assert torch.bincount(y[equal.indices], minlength=8)[[0, 1, 3, 7]].tolist() == [k] * 4


def test_small_classes_are_capped() -> None:
    x, _ = blobs(12, 1, 3, seed=0)
    y = torch.tensor([0] * 10 + [1, 2])
    med = select_medoids(x, y, 1.0)
    assert sorted(med.indices.tolist()) == list(range(12))
    assert med.cluster_sizes.tolist() == [1] * 12
    equal = select_medoids(x, y, 0.9, per_class="equal")  # ceil(0.9 * 12 / 3) = 4 per class
    assert torch.bincount(y[equal.indices]).tolist() == [4, 1, 1]
    assert find_isolated(x, y, 0.9, per_class="equal")[10:].all()


def test_empty_input() -> None:
    med = select_medoids(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 0.5)
    assert med.indices.numel() == med.assignment.numel() == med.cluster_sizes.numel() == 0
    assert find_isolated(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0


def test_validation_errors() -> None:
    x, y = blobs(20, 2, 3, seed=0)
    bad = x.clone()
    bad[3, 1] = float("nan")
    bad[11, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 row\(s\).*rows 3, 11"):
        select_medoids(bad, y, 0.5)
    many = x.clone()
    many[:8] = float("nan")
    with pytest.raises(ValueError, match=r"8 row\(s\).*rows 0, 1, 2, 3, 4, \.\.\."):
        find_isolated(many, y, 0.5)
    for fraction in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            select_medoids(x, y, fraction)
    with pytest.raises(ValueError, match="labels"):
        select_medoids(x, y[:-1], 0.5)
    with pytest.raises(ValueError, match="labels"):
        select_medoids(x, y.float(), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        select_medoids(x[:, 0], y, 0.5)
    with pytest.raises(ValueError, match="similarity"):
        select_medoids(x, y, 0.5, similarity="rbf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        select_medoids(x, y, 0.5, method="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_class"):
        select_medoids(x, y, 0.5, per_class="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epsilon"):
        select_medoids(x, y, 0.5, method="stochastic", epsilon=0.0)


def test_facility_location_value_matches_definition() -> None:
    x, y = blobs(40, 2, 3, seed=4)
    idx = torch.tensor([0, 5, 9, 17])
    total = 0.0
    for c in (0, 1):
        rows = (y == c).nonzero().flatten()
        med = idx[y[idx] == c]
        d = torch.cdist(x[rows], x[med])
        total += float(torch.exp(-d / 3).max(dim=1).values.sum())
    assert facility_location_value(x, y, idx) == pytest.approx(total, rel=1e-12)


def test_memory_bounded_partitioned_selection() -> None:
    x, _ = blobs(2000, 1, 4, seed=3, dtype=torch.float32)
    y = torch.zeros(2000, dtype=torch.long)
    dense = select_medoids(x, y, 0.1)
    small = select_medoids(x, y, 0.1, max_memory=400 * 400 * 5)  # partitions of <= 400 rows
    check_consistent(small, y)
    assert small.indices.numel() == dense.indices.numel() == 200
    ratio = facility_location_value(x, y, small.indices) / facility_location_value(
        x, y, dense.indices
    )
    assert ratio >= 0.98
    # rows are assigned to the nearest medoid over the whole class
    d = torch.cdist(x, x[small.indices])
    nearest = small.indices[d.argmin(dim=1)]
    assert (nearest == small.assignment).float().mean() > 0.99


def test_partition_is_balanced_and_complete() -> None:
    x, _ = blobs(1000, 1, 5, seed=0, dtype=torch.float32)
    rows = torch.arange(1000) * 2  # any row indices
    xx = torch.zeros(2000, 5)
    xx[rows] = x
    parts = partition(xx, rows, 130)
    assert len(parts) == 8
    assert all(p.numel() <= 130 for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, rows)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 60),
    classes=st.integers(1, 4),
    dim=st.integers(1, 5),
    fraction=st.floats(0.01, 1.0),
    similarity=st.sampled_from(KERNELS),
    seed=st.integers(0, 2**16),
)
def test_property_invariants(
    n: int, classes: int, dim: int, fraction: float, similarity: str, seed: int
) -> None:
    x, y = blobs(n, classes, dim, seed=seed)
    med = select_medoids(x, y, fraction, similarity=similarity)  # type: ignore[arg-type]
    check_consistent(med, y)
    for c in y.unique():
        n_c = int((y == c).sum())
        assert int((y[med.indices] == c).sum()) == min(
            n_c, max(1, math.ceil(fraction * n_c - 1e-9))
        )
    naive = select_medoids(x, y, fraction, similarity=similarity, method="naive")  # type: ignore[arg-type]
    assert torch.equal(med.indices, naive.indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu() -> None:
    x, y = blobs(800, 4, 10, seed=0)
    cpu = select_medoids(x, y, 0.1)
    gpu = select_medoids(x.cuda(), y.cuda(), 0.1)
    assert gpu.indices.device.type == "cuda"
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sto = select_medoids(x.cuda(), y.cuda(), 0.1, method="stochastic", generator=gen)
    check_consistent(Medoids(sto.indices.cpu(), sto.assignment.cpu(), sto.cluster_sizes.cpu()), y)


@pytest.mark.slow
def test_large_class_partitioned_quality() -> None:
    x, _ = blobs(20000, 1, 10, seed=0, dtype=torch.float32)
    y = torch.zeros(20000, dtype=torch.long)
    dense = select_medoids(x, y, 0.1)
    part = select_medoids(x, y, 0.1, max_memory=5000 * 5000 * 5)
    ratio = facility_location_value(x, y, part.indices) / facility_location_value(
        x, y, dense.indices
    )
    assert ratio >= 0.99
