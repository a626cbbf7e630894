"""Backdoors with a visible trigger, simple references: a patch pasted on the image (BadNets,
relabelled, and a clean-label variant) or a pattern blended into all of it (Chen et al. 2017)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from epic.attacks.base import budget_count, choose_bases, finalize
from epic.attacks.registry import register_attack
from epic.data import ImageData
from epic.poisons import PoisonSet, apply_trigger

__all__ = ["BlendedBackdoor", "PatchBackdoor", "make_trigger"]


def make_trigger(channels: int, size: int, *, generator: torch.Generator) -> Tensor:
    """A random black-and-white ``(channels, size, size)`` uint8 patch, the same pattern in
    every channel (like the random patches of Saha et al. 2020 and Souri et al. 2021)."""
    bits = torch.randint(0, 2, (1, size, size), generator=generator).to(torch.uint8) * 255
    return bits.expand(channels, size, size).clone()


def default_patch_size(train: ImageData) -> int:
    """8 pixels on 32x32 images (Sleeper Agent's CIFAR patch), a quarter of the side else."""
    return max(2, min(train.shape[1], train.shape[2]) // 4)


def _triggered_set(attack: PatchBackdoor | BlendedBackdoor, model: nn.Module | None,
                   train: ImageData, source_class: int, adversarial_class: int,
                   trigger: Tensor, *, attack_name: str, seed: int,
                   generator: torch.Generator, started: float,
                   blend: float | None = None) -> PoisonSet:
    """``attack``'s share of source-class images (adversarial-class ones with
    ``clean_label``) with ``trigger`` pasted (positions from ``generator``) or, with
    ``blend``, blended in; relabelled unless ``clean_label``."""
    base_class = adversarial_class if attack.clean_label else source_class
    bases = choose_bases(train, base_class, budget_count(attack.budget, len(train)),
                         generator=generator)
    stamped = apply_trigger(train.images[bases].cpu(), trigger, blend=blend,
                            generator=None if blend is not None else generator)
    labels = None if attack.clean_label else torch.full((len(bases),), adversarial_class)
    empty = torch.zeros((0, *train.shape), dtype=torch.uint8)
    return finalize(train, bases, stamped.float() / 255, eps=1.0 if blend is None else blend,
                    target_images=empty, target_class=source_class,
                    adversarial_class=adversarial_class, attack=attack_name,
                    hyperparameters=attack, seed=seed, model=model or nn.Identity(),
                    started=started, labels=labels, trigger=trigger,
                    extra=None if blend is None else {"trigger_blend": blend})


@register_attack
@dataclass(frozen=True, kw_only=True)
class PatchBackdoor:
    """A visible patch trigger pasted at a random place on some training images.

    ``clean_label=False`` is BadNets (Gu et al. 2017): source-class images get the patch and
    the adversarial label. ``clean_label=True`` pastes the patch on adversarial-class images
    and keeps their labels (the naive clean-label baseline of Turner et al. 2019, without
    their adversarial perturbation). At test time source-class images with the patch should
    be classified as the adversarial class. The patch is not within a small eps-ball, so the
    set's ``eps`` is 1.

    Attributes:
        budget: poisons as a share of the training set (float < 1) or a count.
        patch_size: side of the square patch (None: 8 on 32x32 images, a quarter side else).
        clean_label: keep the base labels (True) or relabel to the adversarial class.
    """

    budget: float | int = 0.01
    patch_size: int | None = None
    clean_label: bool = False

    name = "patch"
    backdoor = True
    uses_model = False

    def craft(self, model: nn.Module | None, train: ImageData, source_class: int,
              adversarial_class: int, *, seed: int = 0, trigger: Tensor | None = None,
              progress: bool = False) -> PoisonSet:
        """Poison the training set so that patched ``source_class`` images flip.

        ``model`` is not used (kept for a uniform interface); ``trigger`` defaults to a random
        patch drawn from ``seed``.
        """
        del progress
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        if trigger is None:
            size = self.patch_size or default_patch_size(train)
            trigger = make_trigger(train.shape[0], size, generator=gen)
        return _triggered_set(self, model, train, source_class, adversarial_class, trigger,
                              attack_name="patch_clean_label" if self.clean_label
                              else "badnets",
                              seed=seed, generator=gen, started=started)


@register_attack
@dataclass(frozen=True, kw_only=True)
class BlendedBackdoor:
    """A random pattern blended into the whole of some training images (the blended injection
    of Chen et al. 2017): ``(1 - alpha) * image + alpha * pattern``.

    ``clean_label=False``: source-class images get the pattern and the adversarial label;
    ``clean_label=True``: adversarial-class images get it and keep theirs. At test time
    source-class images with the pattern blended in (with the same ``alpha``) should be
    classified as the adversarial class. No pixel moves by more than ``alpha``, the set's eps.

    Attributes:
        budget: poisons as a share of the training set (float < 1) or a count.
        alpha: the pattern's weight in the blend, in (0, 1] (Chen et al.: 0.2).
        clean_label: keep the base labels (True) or relabel to the adversarial class.
    """

    budget: float | int = 0.01
    alpha: float = 0.2
    clean_label: bool = False

    name = "blend"
    backdoor = True
    uses_model = False

    def craft(self, model: nn.Module | None, train: ImageData, source_class: int,
              adversarial_class: int, *, seed: int = 0, trigger: Tensor | None = None,
              progress: bool = False) -> PoisonSet:
        """Poison the training set so that ``source_class`` images with the pattern flip.

        ``model`` is not used; ``trigger`` (uint8, the images' shape) defaults to uniform
        noise drawn from ``seed``.
        """
        del progress
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        if trigger is None:
            trigger = torch.randint(0, 256, train.shape, generator=gen, dtype=torch.uint8)
        return _triggered_set(self, model, train, source_class, adversarial_class, trigger,
                              attack_name="blend_clean_label" if self.clean_label
                              else "blend",
                              seed=seed, generator=gen, started=started, blend=self.alpha)
