"""EPIC in a PyTorch Lightning run: :class:`EPICCallback` (``pip install epic-defense[lightning]``).

The callback runs the defense's rounds on schedule, before the training epochs it is due for,
on an un-augmented copy of the training set that you hand it, and swaps each training
loader's sampler for one that reads the defense's keep-mask every epoch: a
:class:`~epic.sampler.KeepSampler` (shuffling if the loader shuffled), or a
:class:`~epic.sampler.DistributedKeepSampler` where Lightning had put a ``DistributedSampler``
(DDP), so every rank trains on its share of the same kept set. The model's forward must return
the logits (or give the defense a ``logits_fn``). Rounds and dropped counts are logged as
``epic/dropped`` (this round), ``epic/dropped_total`` and ``epic/remaining``.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from epic.defenses import ScheduledDefense
from epic.gradients import Examples, count_examples
from epic.sampler import DistributedKeepSampler, KeepSampler

__all__ = ["EPICCallback"]

# Lightning has no public way to give the fit loop other training loaders between epochs, nor
# to tell it that an epoch has fewer batches: the adapter below reaches the fit loop's combined
# loader and batch count, here and nowhere else, for the Lightning versions it was tested with
# (tests/test_lightning.py runs it against the installed one, one process and DDP)
TESTED_LIGHTNING = ((2, 2), (3, 0))  # from, inclusive, to, exclusive


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


class _FitLoopAdapter:
    """The fit loop's training loaders and batch count, reached through Lightning's private
    attributes, with an error that names the Lightning version where they are missing."""

    def __init__(self, trainer: Trainer) -> None:
        loop = trainer.fit_loop
        if not (hasattr(loop, "_combined_loader") and hasattr(loop, "max_batches")):
            raise RuntimeError(
                f"EPICCallback cannot reach the training loaders of Lightning "
                f"{lightning.__version__} (tested with {TESTED_LIGHTNING[0][0]}."
                f"{TESTED_LIGHTNING[0][1]} to before {TESTED_LIGHTNING[1][0]}.0): pin "
                f"lightning<{TESTED_LIGHTNING[1][0]}")
        self.loop = loop

    @property
    def loaders(self) -> list[Any] | None:
        combined = self.loop._combined_loader
        return None if combined is None else list(combined.flattened)

    def replace_loaders(self, loaders: list[Any]) -> None:
        combined = self.loop._combined_loader
        if combined is not None:
            combined.flattened = loaders

    def limit_batches(self, batches: int) -> None:
        """Tell the loop that this epoch has at most ``batches`` batches."""
        self.loop.max_batches = min(self.loop.max_batches, batches)


class EPICCallback(Callback):
    """Run ``defense`` (e.g. :class:`epic.EPIC`) inside ``Trainer.fit`` and train on what it keeps.

    Args:
        defense: the defense; its ``warmup`` / ``every`` / ``until`` count Lightning epochs.
            With ``warmup=0`` the first epoch still trains on everything (Lightning has drawn
            its first batches before any epoch hook runs).
        data: the training examples in the training loader's dataset order, without
            augmentation (a Dataset with the evaluation transforms, or a DataLoader over it);
            see :mod:`epic.gradients` for the shapes accepted.
        seed: seed of the kept examples' order each epoch.

    Example (README, "Python API", runs it)::

        callback = EPICCallback(epic.EPIC(0.1, warmup=10, every=2), eval_dataset)
        Trainer(max_epochs=40, callbacks=[callback]).fit(module, train_loader)
    """

    def __init__(self, defense: ScheduledDefense, data: Examples, *, seed: int = 0) -> None:
        self.defense = defense
        self.data = data
        self.seed = seed
        n = count_examples(data)
        if defense.keep_mask is None:
            if n is None:
                raise ValueError("the defense needs num_examples= when data is an iterable")
            defense.keep_mask = torch.ones(n, dtype=torch.bool)
        elif n is not None and len(defense.keep_mask) != n:
            raise ValueError(f"the defense's keep_mask covers {len(defense.keep_mask)} "
                             f"examples, data has {n}")
        if not TESTED_LIGHTNING[0] <= _version(lightning.__version__) < TESTED_LIGHTNING[1]:
            warnings.warn(f"EPICCallback was tested with Lightning {TESTED_LIGHTNING[0][0]}."
                          f"{TESTED_LIGHTNING[0][1]} to before {TESTED_LIGHTNING[1][0]}.0, not "
                          f"{lightning.__version__}", stacklevel=2)

    @property
    def state_key(self) -> str:
        """Its key in a checkpoint: two callbacks with other defenses or seeds keep apart."""
        return self._generate_state_key(defense=type(self.defense).__name__, seed=self.seed)

    def _sampler(self, old: object) -> Sampler[int]:
        if isinstance(old, (KeepSampler, DistributedKeepSampler)):
            return old
        if isinstance(old, DistributedSampler):
            return DistributedKeepSampler(self.defense, num_replicas=old.num_replicas,
                                          rank=old.rank, shuffle=old.shuffle, seed=self.seed)
        return KeepSampler(self.defense, shuffle=isinstance(old, RandomSampler),
                           generator=torch.Generator().manual_seed(self.seed))

    def _swap_samplers(self, fit: _FitLoopAdapter) -> None:
        """Give every training loader a sampler over the kept examples (once per loader)."""
        current = fit.loaders
        if current is None:
            return
        loaders = []
        for dl in current:
            if not isinstance(dl, DataLoader) or isinstance(
                    dl.sampler, (KeepSampler, DistributedKeepSampler)):
                loaders.append(dl)
                continue
            if dl.batch_sampler is not None and dl.batch_size is None:
                raise ValueError("EPICCallback cannot swap the sampler of a loader built with "
                                 "a batch_sampler: build it with batch_size and shuffle")
            n, kept = count_examples(dl), self.defense.keep_mask
            if kept is None or n != len(kept):
                raise ValueError(f"the training loader has {n} examples, the defense "
                                 f"{None if kept is None else len(kept)}")
            loaders.append(DataLoader(
                dl.dataset, batch_size=dl.batch_size, sampler=self._sampler(dl.sampler),
                num_workers=dl.num_workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory,
                drop_last=dl.drop_last, timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
                multiprocessing_context=dl.multiprocessing_context,
                persistent_workers=dl.persistent_workers))
        fit.replace_loaders(loaders)

    @staticmethod
    def _count_batches(fit: _FitLoopAdapter) -> None:
        """Tell the loop that an epoch over the kept examples has fewer batches."""
        lengths = [len(dl) for dl in fit.loaders or [] if isinstance(dl, DataLoader)]
        if lengths:
            fit.limit_batches(max(lengths))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = _FitLoopAdapter(trainer)
        self._swap_samplers(fit)
        epoch = trainer.current_epoch
        if self.defense.due(epoch):
            record = self.defense.update(pl_module, self.data, epoch)
            kept = self.defense.keep_mask
            if kept is None:  # update() always sets it; a subclass that does not is a bug
                raise RuntimeError(f"{type(self.defense).__name__}.update left no keep_mask")
            pl_module.log_dict({"epic/dropped": float(len(record.dropped)),
                                "epic/dropped_total": float((~kept).sum()),
                                "epic/remaining": float(record.remaining)},
                               on_step=False, on_epoch=True, sync_dist=False)
        self._count_batches(fit)

    def state_dict(self) -> dict[str, Any]:
        """The defense's state (keep-mask, rounds, generator): a resumed fit goes on from it."""
        return self.defense.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.defense.load_state_dict(state_dict)
