"""Gradient-alignment attacks for training from scratch: Gradient Matching and Sleeper Agent.

Both perturb base images so that the training gradient of the poisons (with their true
labels) points where the attacker's adversarial loss wants the parameters to go:

    minimize  1 - < grad_theta L(poisons), grad_theta L_adv > / (|.| |.|)

over perturbations in the l-infinity ball, with signed Adam, differentiable crop-and-flip of the
poisons at every step (so the poisons survive the victim's augmentation), and projection. All
poisons are optimized at once, in chunks (one batched forward/double-backward per chunk).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.alignment import (
    alignment_loss,
    gradient_norm,
    parameter_gradient,
    trainable_parameters,
)
from epic.attacks.base import (
    budget_count,
    choose_bases,
    finalize,
    progress_range,
    project,
    requiring_grad,
    to_float,
)
from epic.attacks.patch import default_patch_size, make_trigger
from epic.attacks.registry import register_attack
from epic.data import ImageData, augment_batch
from epic.models import Classifier, eval_mode
from epic.poisons import PoisonSet, apply_trigger
from epic.training import TrainConfig
from epic.training import train as train_model

__all__ = ["GradientMatching", "SleeperAgent", "gradient_norms"]

log = logging.getLogger("epic.attacks")


def gradient_norms(model: nn.Module, data: ImageData, indices: Tensor, *, chunk: int = 64
                   ) -> Tensor:
    """Per-example norm of the cross-entropy parameter gradient, ``(len(indices),)``."""
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    out = []
    for i in range(0, len(indices), chunk):
        idx = indices[i:i + chunk]
        x = to_float(data.images[idx], device)
        y = data.labels[idx].to(device)
        for j in range(len(idx)):
            loss = F.cross_entropy(model(x[j:j + 1]), y[j:j + 1])
            g = torch.autograd.grad(loss, params)
            out.append(gradient_norm(g).detach().cpu())
    return torch.stack(out) if out else torch.zeros(0)


@dataclass(frozen=True, kw_only=True)
class _AlignmentSettings:
    eps: float = 16 / 255
    budget: float | int = 0.01
    iterations: int = 250
    restarts: int = 8
    lr: float = 0.025
    augment: bool = True
    chunk: int = 128


def _craft_alignment(settings: _AlignmentSettings, model: Classifier, train: ImageData,
                     bases: Tensor, target_x: Tensor, target_y: Tensor, *,
                     generator: torch.Generator, progress: bool, desc: str,
                     retrain: int = 0, retrain_fn: object = None,
                     ) -> tuple[Tensor, float]:
    """Optimize perturbations of ``train.images[bases]``; returns ``(poisons, loss)``."""
    device = next(model.parameters()).device
    base = to_float(train.images[bases], device)
    labels = train.labels[bases].to(device)
    eps = settings.eps
    schedule = [round(settings.iterations * m / 8) for m in (3, 5, 7)]
    augment = train.augment if settings.augment else None
    best: tuple[Tensor, float] | None = None
    with eval_mode(model), requiring_grad(model, True):
        for restart in range(settings.restarts):
            net = model
            net.eval()
            tgrad = parameter_gradient(net, target_x, target_y, settings.chunk)
            tnorm = gradient_norm(tgrad)
            init = torch.randn(base.shape, generator=generator).to(device) * (eps / 3)
            delta = init.clamp(-eps, eps).requires_grad_(True)
            opt = torch.optim.Adam([delta], lr=settings.lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, schedule, gamma=0.1)
            loss_sum = 0.0
            for step in progress_range(settings.iterations, progress=progress,
                                       desc=f"{desc} {restart + 1}/{settings.restarts}"):
                if retrain and step and step % retrain == 0 and callable(retrain_fn):
                    poisons = project(base + delta.detach(), base, eps)
                    net = retrain_fn(poisons)
                    net.eval()
                    tgrad = parameter_gradient(net, target_x, target_y, settings.chunk)
                    tnorm = gradient_norm(tgrad)
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for i in range(0, len(base), settings.chunk):
                    x = (base[i:i + settings.chunk] + delta[i:i + settings.chunk]).clamp(0, 1)
                    if augment is not None:
                        x = augment_batch(x, augment, generator=generator)
                    loss = alignment_loss(net, x, labels[i:i + settings.chunk], tgrad, tnorm)
                    loss.backward()
                    loss_sum += float(loss.detach()) * len(x) / len(base)
                assert delta.grad is not None
                delta.grad.sign_()
                opt.step()
                sched.step()
                with torch.no_grad():
                    delta.copy_(project(base + delta, base, eps) - base)
            final = float(loss_sum)
            log.info("%s restart %d: alignment loss %.4f", desc, restart, final)
            if best is None or final < best[1]:
                best = ((base + delta.detach()).clamp(0, 1), final)
    assert best is not None
    return best


@register_attack
@dataclass(frozen=True, kw_only=True)
class GradientMatching(_AlignmentSettings):
    """Gradient Matching, "Witches' Brew" (Geiping et al., ICLR 2021).

    Poisons are adversarial-class training images whose training gradient aligns (cosine) with
    the gradient of the target image relabelled to the adversarial class, on a clean
    pretrained model the attacker holds. Defaults are the paper's CIFAR-10 settings: eps
    16/255, 1% budget, 250 steps of signed Adam with the step size divided by 10 at 3/8, 5/8
    and 7/8 of them, 8 restarts (the best alignment kept), differentiable crop and flip.
    ``lr`` is in pixel units: the paper's 0.1 in normalized units times CIFAR's std of ~0.25.

    Attributes:
        eps: l-infinity budget in [0, 1] pixel units.
        budget: poisons as a share of the training set (float < 1) or a count.
        iterations: optimization steps per restart.
        restarts: independent random initializations; the lowest final loss wins.
        lr: signed-Adam step size (pixel units).
        augment: differentiable augmentation (the training set's crop and flip) while crafting.
        chunk: poisons per batched double-backward (memory only).
    """

    name = "gm"

    def craft(self, model: Classifier, train: ImageData, target: Tensor, target_class: int,
              adversarial_class: int, *, seed: int = 0, bases: Tensor | None = None,
              progress: bool = False) -> PoisonSet:
        """Craft poisons so that a model trained from scratch on them misclassifies ``target``.

        Args:
            model: clean pretrained model the attacker holds (left unchanged).
            train: clean training set; bases are random adversarial-class images.
            target: uint8 ``(C, H, W)`` or ``(1, C, H, W)``.
            target_class, adversarial_class: the target's true and desired class.
            seed: draws bases, initializations and augmentations.
        """
        started = time.perf_counter()
        if target.dim() == 3:
            target = target.unsqueeze(0)
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        if bases is None:
            bases = choose_bases(train, adversarial_class,
                                 budget_count(self.budget, len(train)), generator=gen)
        tx = to_float(target, device)
        ty = torch.full((len(tx),), adversarial_class, device=device)
        crafted, loss = _craft_alignment(self, model, train, bases, tx, ty, generator=gen,
                                         progress=progress, desc="gradient matching")
        return finalize(train, bases, crafted, eps=self.eps, target_images=target,
                        target_class=target_class, adversarial_class=adversarial_class,
                        attack="gradient_matching", hyperparameters=self, seed=seed,
                        model=model, started=started, extra={"final_loss": loss})


def surrogate_config(config: TrainConfig, epochs: int, *, seed: int) -> TrainConfig:
    """``config`` for a retraining of ``epochs`` epochs from scratch: explicit milestones
    scaled by ``epochs / config.epochs`` (10 and 14 of 16 become 5 and 7 of 8)."""
    milestones = config.milestones
    if milestones is not None and config.epochs > 0:
        milestones = tuple(max(1, round(m * epochs / config.epochs)) for m in milestones)
    return dataclasses.replace(config, epochs=epochs, milestones=milestones, seed=seed,
                               scenario="scratch")


def _reinitialize(model: nn.Module) -> None:
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset) and m is not model:
            reset()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


@register_attack
@dataclass(frozen=True, kw_only=True)
class SleeperAgent(_AlignmentSettings):
    """Sleeper Agent (Souri et al., NeurIPS 2022), a hidden-trigger clean-label backdoor.

    Poisons are adversarial-class training images (labels kept, no visible trigger) whose
    gradient aligns with the gradient of trigger-patched source-class training images
    labelled as the adversarial class. Poisons are the adversarial-class images with the
    largest gradient norm; every ``retrain_every`` steps the surrogate is retrained from
    scratch on the current poisoned set for ``retrain_epochs`` epochs and the source gradient
    is recomputed (Souri et al. retrain 4 times in 250 steps). At test time, patched
    source-class images should be classified as the adversarial class.

    Defaults: Souri et al.'s CIFAR-10 settings, eps 16/255, 1% budget, 250 signed-Adam
    steps, 8x8 random patch, retraining every 50 steps; restarts 1. ``retrain_epochs`` is
    reduced from a full training run for CPU use.

    Attributes:
        sources: source-class training images used for the adversarial gradient (None: all).
        patch_size: trigger side (None: 8 on 32x32 images, a quarter side else).
        retrain_every: steps between surrogate retrainings (0: never).
        retrain_epochs: epochs of each retraining.
        retrain_config: how the surrogate is trained (its ``epochs`` become
            ``retrain_epochs``, explicit milestones scaled with them); None: the defaults of
            :class:`~epic.training.TrainConfig`. ``epic craft`` passes its training options,
            those the attacker's clean model was (or would be) trained with.
        select: ``"gradient_norm"`` (Souri et al.) or ``"random"`` bases.
    """

    restarts: int = 1
    sources: int | None = None
    patch_size: int | None = None
    retrain_every: int = 50
    retrain_epochs: int = 10
    retrain_config: TrainConfig | None = None
    select: str = "gradient_norm"

    name = "sa"
    backdoor = True

    def craft(self, model: Classifier, train: ImageData, source_class: int,
              adversarial_class: int, *, seed: int = 0, trigger: Tensor | None = None,
              progress: bool = False) -> PoisonSet:
        """Craft a hidden-trigger backdoor from ``source_class`` to ``adversarial_class``."""
        started = time.perf_counter()
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        if trigger is None:
            trigger = make_trigger(train.shape[0], self.patch_size or default_patch_size(train),
                                   generator=gen)
        count = budget_count(self.budget, len(train))
        if self.select == "gradient_norm":
            members = (train.labels.cpu() == adversarial_class).nonzero().squeeze(1)
            norms = gradient_norms(model, train, members)
            bases = members[norms.argsort(descending=True)[:count]].sort().values
        else:
            bases = choose_bases(train, adversarial_class, count, generator=gen)
        src = (train.labels.cpu() == source_class).nonzero().squeeze(1)
        if self.sources is not None:
            src = src[torch.randperm(len(src), generator=gen)[:self.sources]]
        patched = apply_trigger(train.images[src].cpu(), trigger, generator=gen)
        tx = to_float(patched, device)
        ty = torch.full((len(tx),), adversarial_class, device=device)

        def retrain_fn(poisons: Tensor) -> nn.Module:
            net = copy.deepcopy(model)
            _reinitialize(net)
            images = train.images.clone()
            images[bases.to(images.device)] = (poisons * 255).round().to(torch.uint8).to(
                images.device)
            data = type(train)(images, train.labels, train.classes, train.mean, train.std,
                               train.augment)
            config = surrogate_config(self.retrain_config or TrainConfig(), self.retrain_epochs,
                                      seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
            train_model(net, data, data.subset(torch.arange(min(len(data), 500))), config)
            log.info("sleeper agent: surrogate retrained for %d epochs", self.retrain_epochs)
            return net

        crafted, loss = _craft_alignment(self, model, train, bases, tx, ty, generator=gen,
                                         progress=progress, desc="sleeper agent",
                                         retrain=self.retrain_every, retrain_fn=retrain_fn)
        empty = torch.zeros((0, *train.shape), dtype=torch.uint8)
        return finalize(train, bases, crafted, eps=self.eps, target_images=empty,
                        target_class=source_class, adversarial_class=adversarial_class,
                        attack="sleeper_agent", hyperparameters=self, seed=seed, model=model,
                        started=started, trigger=trigger, extra={"final_loss": loss})
