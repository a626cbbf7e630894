"""The selection engine against a reference written without any of its code: float64, a dense
similarity matrix from ``torch.cdist``, plain greedy over it."""

from __future__ import annotations

import math

import pytest
import torch

from epic.selection import facility_location_value, find_isolated, select_medoids


def reference_greedy(x: torch.Tensor, k: int) -> list[int]:
    """Greedy facility location on ``exp(-d / D)``; ties to the lowest index."""
    s = torch.exp(-torch.cdist(x.double(), x.double()) / x.shape[1])
    cover = torch.zeros(len(x), dtype=torch.float64)
    chosen: list[int] = []
    for _ in range(k):
        best, best_gain = -1, -math.inf
        for j in range(len(x)):
            if j in chosen:
                continue
            gain = float(torch.clamp(s[:, j] - cover, min=0).sum())
            if gain > best_gain:
                best, best_gain = j, gain
        chosen.append(best)
        cover = torch.maximum(cover, s[:, best])
    return chosen


def reference_sizes(x: torch.Tensor, medoids: list[int]) -> list[int]:
    """Cluster sizes: every row to its most similar medoid, the first selected on ties."""
    s = torch.exp(-torch.cdist(x.double(), x[medoids].double()) / x.shape[1])
    owner = s.argmax(dim=1)  # argmax returns the first of equal maxima
    owner[medoids] = torch.arange(len(medoids))
    return torch.bincount(owner, minlength=len(medoids)).tolist()


def gradients(n: int, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 3
    labels = torch.arange(n) % classes
    return torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels, classes)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("method", ["lazy", "naive"])
def test_engine_matches_the_reference_on_seeded_problems(seed: int, method: str) -> None:
    n = [3, 1, 2, 40, 97, 150][seed % 6]
    x = gradients(n, 5, seed).float()
    labels = torch.zeros(n, dtype=torch.long)
    fraction = [0.1, 0.3, 0.5, 1.0][seed % 4]
    med = select_medoids(x, labels, fraction, method=method)  # type: ignore[arg-type]
    want = reference_greedy(x, math.ceil(fraction * n))
    got = med.indices.tolist()
    value = facility_location_value(x, labels, med.indices)
    reference = facility_location_value(x, labels, torch.tensor(want))
    assert value == pytest.approx(reference, rel=1e-6)
    if got == want:  # the same picks must give the same clusters
        assert med.cluster_sizes.tolist() == reference_sizes(x, want)


def test_near_ties_and_duplicates_follow_the_reference() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(30, 6, generator=g)
    x = torch.cat([base, base[:10] + 1e-6 * torch.randn(10, 6, generator=g), base[:5]])
    labels = torch.zeros(len(x), dtype=torch.long)
    for fraction in (0.1, 0.2, 0.5):
        med = select_medoids(x, labels, fraction)
        want = reference_greedy(x, math.ceil(fraction * len(x)))
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
