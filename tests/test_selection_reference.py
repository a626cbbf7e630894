"""The selection engine against a reference written without any of its code: float64, a dense
similarity matrix from ``torch.cdist``, plain greedy over it."""

from __future__ import annotations

import math

import pytest
import torch

from epic.selection import facility_location_value, find_isolated, select_medoids


def reference_similarity(x: torch.Tensor, similarity: str = "exp") -> torch.Tensor:
    """The dense (n, n) similarity matrix of one class, in float64."""
    x = x.double()
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    if similarity == "exp":
        return torch.exp(-d / x.shape[1])
    if similarity == "linear":
        return d.max() - d
    unit = x / x.norm(dim=1, keepdim=True)  # (1 + cos) / 2, exactly 1 for a row and its copies
    return 1 - torch.cdist(unit, unit, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / 4


def reference_greedy(x: torch.Tensor, k: int, similarity: str = "exp",
                     tolerance: float = 0.0) -> tuple[list[int], int]:
    """Greedy facility location; ties to the lowest index. Also returns how many of the first
    picks are unambiguous: no other gain within ``tolerance`` of the best, unless exactly equal
    (then the lowest index wins in any exact arithmetic)."""
    s = reference_similarity(x, similarity)
    cover = torch.zeros(len(x), dtype=torch.float64)
    chosen: list[int] = []
    clear = None
    for step in range(k):
        gains = torch.clamp(s - cover[:, None], min=0).sum(dim=0)
        gains[chosen] = -math.inf
        best = int(torch.argmax(gains))  # the first of equal maxima
        gap = gains[best] - gains
        if clear is None and bool(((gap > 0) & (gap <= tolerance)).any()):
            clear = step
        chosen.append(best)
        cover = torch.maximum(cover, s[:, best])
    return chosen, k if clear is None else clear


def reference_sizes(x: torch.Tensor, medoids: list[int], similarity: str = "exp",
                    tolerance: float = 0.0) -> list[int] | None:
    """Cluster sizes: every row to its most similar medoid, the first selected on ties; None
    if some row is within ``tolerance`` of two medoids without an exact tie."""
    s = reference_similarity(x, similarity)[:, medoids]
    top = s.max(dim=1, keepdim=True).values
    gap = top - s
    if bool(((gap > 0) & (gap <= tolerance)).any()):
        return None
    owner = s.argmax(dim=1)  # argmax returns the first of equal maxima
    owner[medoids] = torch.arange(len(medoids))
    return torch.bincount(owner, minlength=len(medoids)).tolist()


def gradients(n: int, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 3
    labels = torch.arange(n) % classes
    return torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels, classes)


def seeded_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Problem ``seed``: gradient-like rows in 1-4 classes of 1 to 120 rows, some of them exact
    duplicates, near duplicates (1e-6 apart) or rounded onto a coarse grid (many exact ties)."""
    g = torch.Generator().manual_seed(1000 + seed)
    classes = 1 + seed % 4
    sizes = [int(torch.randint(1, 4, (), generator=g)) if (seed + c) % 5 == 0
             else int(torch.randint(4, 121, (), generator=g)) for c in range(classes)]
    x = gradients(sum(sizes), 6, seed)
    kind = seed % 4
    if kind == 1:  # exact duplicates of earlier rows
        copies = torch.randint(0, len(x), (len(x) // 3,), generator=g)
        x[torch.randperm(len(x), generator=g)[: len(copies)]] = x[copies].clone()
    elif kind == 2:  # near duplicates
        near = torch.randperm(len(x), generator=g)[: len(x) // 3]
        x[near] = x[near.flip(0)] + 1e-6 * torch.randn(len(near), x.shape[1], generator=g)
    elif kind == 3:  # a coarse grid: exact ties between distances
        x = (x * 4).round() / 4 + 0.01
    labels = torch.repeat_interleave(torch.arange(classes), torch.tensor(sizes))
    fraction = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0][seed % 6]
    return x, labels[torch.randperm(len(x), generator=g)], fraction


SIMILARITIES = ["exp", "linear", "cosine"]


@pytest.mark.parametrize("dtype", [torch.float32,
                                   pytest.param(torch.float64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("seed", range(200))
def test_engine_matches_the_reference_on_seeded_problems(seed: int, dtype: torch.dtype) -> None:
    """Every pick up to the first near tie is the reference's, the objective is the
    reference's, and with the same picks so are the clusters."""
    x, labels, fraction = seeded_problem(seed)
    x = x.to(dtype)
    similarity = SIMILARITIES[seed % 3]
    method = "naive" if seed % 10 == 9 else "lazy"
    med = select_medoids(x, labels, fraction, method=method, similarity=similarity)
    # float32 similarities are within 2e-7 of float64's: a sum of n of them within n * 2e-7
    tolerance = (1e-9 if dtype == torch.float64 else 4e-7) * len(x)
    picked = labels[med.indices]
    want_all = []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        k = math.ceil(fraction * len(rows))
        want, clear = reference_greedy(x[rows], k, similarity, tolerance)
        got = torch.searchsorted(rows, med.indices[picked == c]).tolist()
        assert len(got) == k
        assert got[:clear] == want[:clear], (c, clear)
        if got == want:
            sizes = reference_sizes(x[rows], want, similarity, tolerance)
            if sizes is not None:
                assert med.cluster_sizes[picked == c].tolist() == sizes
        want_all.append(rows[want])
    want_idx = torch.cat(want_all)
    value = facility_location_value(x, labels, med.indices, similarity=similarity)
    reference = facility_location_value(x, labels, want_idx, similarity=similarity)
    assert value == pytest.approx(reference, rel=1e-6)


def test_near_ties_and_duplicates_follow_the_reference() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(30, 6, generator=g)
    x = torch.cat([base, base[:10] + 1e-6 * torch.randn(10, 6, generator=g), base[:5]])
    labels = torch.zeros(len(x), dtype=torch.long)
    for fraction in (0.1, 0.2, 0.5):
        med = select_medoids(x, labels, fraction)
        want, _ = reference_greedy(x, math.ceil(fraction * len(x)))
        assert facility_location_value(x, labels, med.indices) == pytest.approx(
            facility_location_value(x, labels, torch.tensor(want)), rel=1e-6)


def test_the_kernel_keeps_float32_precision() -> None:
    """Distances taken in float32 as |a|^2 + |b|^2 - 2ab lost up to 8e-4 of a similarity and
    made rows less similar to themselves than 1; now float32 keeps its 1e-7."""
    from epic.selection.kernel import similarity_matrix

    x = gradients(2000, 10, 0).float()
    exact = torch.exp(-torch.cdist(x.double(), x.double()) / 10)
    got = similarity_matrix(x, x, "exp", 0.0).double()
    assert float((got - exact).abs().max()) < 2e-7
    assert bool((got.diagonal() == 1).all())


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_the_kernel_keeps_float64_precision(similarity: str) -> None:
    """In float64 the matrix-product distances were 1e-8 off (a row 1 - 8e-11 similar to
    itself, which broke an exact tie the wrong way): float64 input keeps its own precision."""
    from epic.selection.kernel import similarity_matrix

    x = gradients(300, 10, 0).double()
    x[150:] = x[:150]  # copies: exactly as similar as a row to itself
    exact = reference_similarity(x, similarity)
    c0 = float(exact.max()) if similarity == "linear" else 0.0
    got = similarity_matrix(x, x, similarity, c0)
    assert float((got - exact).abs().max()) < 1e-14
    assert bool((got.diagonal() == exact.max()).all())
    assert torch.equal(got[:150, :150], got[150:, 150:])


def test_copies_of_a_kept_row_are_not_isolated() -> None:
    labels = torch.zeros(30, dtype=torch.long)
    assert int(find_isolated(torch.ones(30, 4), labels, 0.1).sum()) == 0
    x = gradients(60, 3, 1).float()
    y = torch.arange(60) % 3
    flagged = find_isolated(x, y, 1.0)  # every row its own medoid: all isolated
    assert bool(flagged.all())
    x[30] = x[0]  # the same class (0): both copies stay
    flagged = find_isolated(x, y, 1.0)
    assert not flagged[0] and not flagged[30] and int(flagged.sum()) == 58
    x[32] = x[1]  # rows 1 and 32 are in classes 1 and 2: copies across classes do not count
    assert bool(find_isolated(x, y, 1.0)[[1, 32]].all())
