"""What the trainer asks of a defense: the hooks of :class:`Defense`, which
:func:`epic.training.train` calls during a run, and :class:`RunFacts`, what a defense built by
name learns of that run.

Every defense of :mod:`epic.defenses` is a :class:`Defense`: EPIC and the baselines that drop
examples on a schedule (rounds before some epochs, a keep-mask), Adversarial Poisoning (a
change to every training batch), DP-SGD (a wrapped module and optimizer) and the batch-level
clip-and-noise (a change to the gradients). A new defense overrides the hooks it needs; the
others do nothing. docs/defenses.md walks through writing one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from epic.gradients import Examples
from epic.models import Scenario

__all__ = ["Defense", "RunFacts", "changes_batches"]


@dataclass(frozen=True)
class RunFacts:
    """What a defense built by name (:func:`epic.defenses.build_defense`) learns of its run.

    Attributes:
        num_examples: size of the training set (poisons included).
        epochs: epochs of the run.
        milestones: the epochs where the learning rate drops (the paper's schedules end the
            rounds at the last one).
        scenario: scratch, transfer or finetune.
        seed: the run's seed, for the defense's own randomness.
        poison_eps: the l-infinity budget of the poisons the run trains on, when known.
    """

    num_examples: int
    epochs: int
    milestones: tuple[int, ...] = ()
    scenario: Scenario = "scratch"
    seed: int = 0
    poison_eps: float | None = None


class Defense:
    """Base of every defense :func:`epic.training.train` runs; each hook does nothing here.

    In a run the trainer calls, in order: :meth:`setup` once; before every epoch :meth:`due`,
    and :meth:`update` when it is due, then reads :attr:`keep_mask` (the examples the epoch
    trains on); for every training batch :meth:`on_batch` (after augmentation), the forward
    and backward pass, :meth:`after_backward`, the optimizer step; after every epoch
    :meth:`facts` (into that epoch's metrics and, after the last, the summary); at the end,
    also after an error, :meth:`teardown`. :meth:`state_dict` goes into every checkpoint and
    :meth:`load_state_dict` reads it back on resume (after :meth:`setup`).

    :meth:`for_run` builds the defense for a run from the options the command line or the
    benchmark give (:func:`epic.defenses.build_defense`).

    Attributes:
        keep_mask: bool ``(N,)`` over the training set, True = train on the example; None =
            train on every example.
    """

    keep_mask: Tensor | None = None
    # the attributes that are its settings (None: every public attribute of a plain type)
    SETTINGS: ClassVar[tuple[str, ...] | None] = None

    def recorded_settings(self) -> dict[str, Any]:
        """What a run records as this defense's settings (``config.json``, the check that
        ``--resume`` continues the same run, benchmark rows): the attributes :attr:`SETTINGS`
        names, or where it is None every public attribute of a plain type."""
        if self.SETTINGS is not None:
            return {name: getattr(self, name) for name in self.SETTINGS}
        return {k: v for k, v in vars(self).items() if not k.startswith("_")
                and isinstance(v, (int, float, str, bool, type(None)))}

    @classmethod
    def for_run(cls, run: RunFacts) -> Defense:
        """This defense for ``run``; a subclass adds its options as keyword-only arguments
        with defaults (see :func:`epic.defenses.build_defense`)."""
        return cls()

    def setup(self, model: nn.Module, trained: nn.Module, optimizer: torch.optim.Optimizer, *,
              num_examples: int, batch_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Before the first epoch: the module the loop trains through and the optimizer it
        steps, in place of ``trained`` and ``optimizer`` (e.g. wrapped for per-example
        gradients). ``model`` is the whole classifier, ``trained`` the part that trains (the
        classifier, or its last layer when the body is frozen), ``optimizer`` the SGD the
        trainer built over ``trained``'s parameters (its state is what checkpoints hold)."""
        return trained, optimizer

    def due(self, epoch: int) -> bool:
        """Whether :meth:`update` runs before training epoch ``epoch`` (0-based)."""
        return False

    def update(self, model: nn.Module, data: Examples, epoch: int, *,
               features: Tensor | None = None) -> Any:
        """A round before epoch ``epoch``, on the un-augmented training set ``data``
        (``features``: the frozen body's features of every example, when the trainer holds
        them); it may change :attr:`keep_mask`. Returns a record of the round."""
        raise NotImplementedError(f"{type(self).__name__} is due but has no update()")

    # whether a round can take the last-layer gradients of the training pass before it
    # (TrainConfig.round_embeddings="train-pass") through update_from_embeddings
    TAKES_TRAINING_GRADIENTS: ClassVar[bool] = False

    def update_from_embeddings(self, embeddings: Tensor, labels: Tensor, epoch: int) -> Any:
        """A round before epoch ``epoch`` on the training pass's gradients ``embeddings``
        ``(N, C)`` (``softmax(z) - onehot(y)`` of every example) and ``labels`` ``(N,)``,
        instead of :meth:`update`'s own pass; only where :attr:`TAKES_TRAINING_GRADIENTS`."""
        raise NotImplementedError(f"{type(self).__name__} cannot take the training pass's "
                                  f"gradients")

    def on_batch(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The training batch to train on instead of ``x`` ``(B, C, H, W)``, ``y`` ``(B,)``.
        A defense that overrides this makes the trainer compute a frozen body's features per
        batch instead of caching them."""
        return x, y

    def after_backward(self, params: Sequence[nn.Parameter]) -> None:
        """After the backward pass, before the optimizer step: the gradients of ``params``
        (the trained parameters) may be changed in place."""

    def facts(self) -> dict[str, Any]:
        """JSON-ready facts about the defense so far (e.g. a privacy budget spent), added to
        every epoch's metrics and to the run's summary."""
        return {}

    def teardown(self) -> None:
        """After the last epoch, or when training stops on an error: undo what :meth:`setup`
        attached to the model."""

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""


def changes_batches(defense: Defense | None) -> bool:
    """Whether ``defense`` overrides :meth:`Defense.on_batch`."""
    return defense is not None and type(defense).on_batch is not Defense.on_batch
