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

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from epic.defenses import ScheduledDefense
from epic.gradients import Examples, count_examples
from epic.sampler import DistributedKeepSampler, KeepSampler

__all__ = ["EPICCallback"]


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

    def _sampler(self, old: object) -> Sampler[int]:
        if isinstance(old, (KeepSampler, DistributedKeepSampler)):
            return old
        if isinstance(old, DistributedSampler):
            return DistributedKeepSampler(self.defense, num_replicas=old.num_replicas,
                                          rank=old.rank, shuffle=old.shuffle, seed=self.seed)
        return KeepSampler(self.defense, shuffle=isinstance(old, RandomSampler),
                           generator=torch.Generator().manual_seed(self.seed))

    def _swap_samplers(self, trainer: Trainer) -> None:
        """Give every training loader a sampler over the kept examples (once per loader)."""
        combined = trainer.fit_loop._combined_loader
        if combined is None:
            return
        loaders = []
        for dl in combined.flattened:
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
        combined.flattened = loaders

    @staticmethod
    def _count_batches(trainer: Trainer) -> None:
        """Tell the loop that an epoch over the kept examples has fewer batches."""
        combined = trainer.fit_loop._combined_loader
        if combined is None:
            return
        lengths = [len(dl) for dl in combined.flattened if isinstance(dl, DataLoader)]
        if lengths:
            trainer.fit_loop.max_batches = min(trainer.fit_loop.max_batches, max(lengths))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_samplers(trainer)
        epoch = trainer.current_epoch
        if not self.defense.due(epoch):
            self._count_batches(trainer)
            return
        record = self.defense.update(pl_module, self.data, epoch)
        assert self.defense.keep_mask is not None
        self._count_batches(trainer)
        pl_module.log_dict({"epic/dropped": float(len(record.dropped)),
                            "epic/dropped_total": float((~self.defense.keep_mask).sum()),
                            "epic/remaining": float(record.remaining)},
                           on_step=False, on_epoch=True, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        return self.defense.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.defense.load_state_dict(state_dict)
