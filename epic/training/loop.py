"""The training loop: :func:`train` runs SGD epoch by epoch under a defense, calling its hooks
(:class:`epic.protocol.Defense`: rounds before the epochs they are due for, batches,
gradients), with attack success measured every epoch and the run's files written
(:mod:`epic.training.records`) when it has a folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from epic.data import (
    Augment,
    ImageData,
    batch_indices,
    channels_last_on_cpu,
    iterate_batches,
)
from epic.distributed import world
from epic.gradients import feature_embeddings
from epic.io.files import replace_atomically
from epic.io.safe_pickle import load_weights
from epic.models import Classifier
from epic.poisons import PoisonSet
from epic.protocol import Defense, changes_batches
from epic.training.config import TrainConfig, TrainResult, evaluate, prepare_model
from epic.training.records import (
    check_same_run,
    defense_records,
    describe,
    describe_device,
    provenance,
    run_summary,
    save_checkpoint,
    write_json,
)

__all__ = ["train"]

log = logging.getLogger("epic.training")


def train(
    model: Classifier,
    train_data: ImageData,
    test_data: ImageData,
    config: TrainConfig = TrainConfig(),
    *,
    defense: Defense | None = None,
    poisons: PoisonSet | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    features: Tensor | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_data`` (poisoned by ``poisons`` if given) under ``defense``.

    The model is trained on the device it lives on; data batches follow it. With a seed and
    the same starting weights, a CPU run is reproducible, also across ``resume``.

    Under ``torch.distributed`` (launched by ``torchrun``), every rank calls this with the
    same data, config and seed: the model (or, in transfer learning, its last layer) trains
    in ``DistributedDataParallel``, each rank on its share of every epoch's order, with
    ``config.batch_size`` examples per rank and step; defense rounds run on all ranks together
    (see :meth:`epic.defenses.ScheduledDefense.update`); rank 0 alone writes ``out``, and
    ``resume`` reads it on every rank (a shared folder).

    Args:
        model: a :class:`~epic.models.Classifier`; for transfer/fine-tuning, already loaded
            with pretrained weights (see :func:`prepare_model`, applied here).
        config: hyperparameters and scenario.
        defense: any :class:`epic.protocol.Defense` (:class:`epic.EPIC`, the baselines and
            DP-SGD of :mod:`epic.defenses`), its hooks called as that class describes; under
            DP-SGD a model's trained batch-norm layers become group norms (see
            :class:`epic.defenses.DPSGD`).
        poisons: a poison set; applied to ``train_data`` and its success measured each epoch.
        out: folder for ``config.json``, ``metrics.json``, ``defense.json``, ``checkpoint.pt``,
            ``model.pt`` and ``summary.json``.
        resume: continue from ``out/checkpoint.pt`` if it exists.
        progress: show a progress bar on stderr.
        run_info: extra facts to record in ``config.json`` (dataset, model name, ...).
        on_epoch_end: called with ``(epoch, metrics)`` after each epoch's checkpoint.
        features: in transfer learning without augmentation, the frozen body's features
            ``(N, F)`` of ``train_data`` with the poisons in place, computed beforehand
            (:func:`epic.bench.run_trials` reuses the clean images' across trials); otherwise
            they are computed here.

    Returns:
        :class:`TrainResult` with per-epoch metrics and the summary.
    """
    try:
        return _train(model, train_data, test_data, config, defense=defense, poisons=poisons,
                      out=out, resume=resume, progress=progress, run_info=run_info,
                      on_epoch_end=on_epoch_end, features=features)
    finally:
        if defense is not None:
            defense.teardown()


def _train(model: Classifier, train_data: ImageData, test_data: ImageData, config: TrainConfig,
           *, defense: Defense | None, poisons: PoisonSet | None,
           out: str | os.PathLike[str] | None, resume: bool, progress: bool,
           run_info: dict[str, Any] | None,
           on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
           features: Tensor | None) -> TrainResult:
    """:func:`train`, without the defense's teardown: set up, resume, then epoch by epoch
    train, measure and record."""
    run = _Run.start(model, train_data, test_data, config, defense=defense, poisons=poisons,
                     out=out, features=features)
    start_epoch = run.resume() if resume else 0
    run.write_config(run_info)
    bar = None
    if progress and run.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, initial=start_epoch, unit="epoch", dynamic_ncols=True)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        record = run.train_epoch(epoch)
        run.measure(epoch, record)
        run.elapsed += time.perf_counter() - t0
        record["seconds"] = round(run.elapsed, 3)
        run.save(epoch, record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                            acc=f"{record.get('test_acc', float('nan')):.3f}")
        log.info("epoch %d: %s", epoch, record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    if bar is not None:
        bar.close()
    return run.finish()


@dataclasses.dataclass
class _Run:
    """One training run between its epochs: what :meth:`start` sets up and every epoch
    uses, and what the run has recorded so far (``metrics``, ``elapsed``)."""

    model: Classifier
    train_data: ImageData  # with the poisons in place
    test_data: ImageData
    config: TrainConfig
    defense: Defense | None
    poisons: PoisonSet | None
    device: torch.device
    rank: int
    shard: tuple[int, int] | None  # (rank, ranks) under several ranks
    checkpoint: Path | None
    outp: Path | None  # the run's folder on the one writer (rank 0)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer  # what checkpoints hold
    stepper: torch.optim.Optimizer  # what steps (the defense may wrap the optimizer)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    net: nn.Module  # what the batches go through: the model, or in transfer its last layer
    generator: torch.Generator
    augment: Augment | None
    on_batch: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]] | None
    cached: Tensor | None  # a frozen body's features of the training set
    test_features: tuple[Tensor, Tensor] | None  # ... and of the test set
    from_training: bool  # rounds take the gradients of the training pass before them
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    recorded: tuple[Tensor, Tensor] | None = None  # the last epoch's (gradients, labels)

    @property
    def frozen_body(self) -> bool:
        return self.config.scenario == "transfer"

    @property
    def identity(self) -> dict[str, Any]:
        """What makes a checkpoint this run's (:func:`check_same_run`)."""
        config, poisons = self.config, self.poisons
        return {"config": dataclasses.asdict(config) | {"milestones": config.resolved_milestones},
                "defense": describe(self.defense), "model": type(self.model).__name__,
                "examples": len(self.train_data),
                "poisons": None if poisons is None else len(poisons)}

    @classmethod
    def start(cls, model: Classifier, train_data: ImageData, test_data: ImageData,
              config: TrainConfig, *, defense: Defense | None, poisons: PoisonSet | None,
              out: str | os.PathLike[str] | None, features: Tensor | None) -> _Run:
        """Check the settings, prepare the model, the optimizer, the schedule and the cached
        features, and set the defense up."""
        device = next(model.parameters()).device
        rank, size = world()
        if poisons is not None:
            train_data = poisons.apply(train_data)
        generator = torch.Generator().manual_seed(config.seed)
        params = prepare_model(model, config.scenario,
                               None if config.head_rng == "global" else generator)
        frozen_body = config.scenario == "transfer"
        optimizer = torch.optim.SGD(params, lr=config.resolved_lr, momentum=config.momentum,
                                    nesterov=config.nesterov, weight_decay=config.weight_decay)
        per_rank = -(-len(train_data) // size)
        scheduler = _scheduler(optimizer, config, -(-per_rank // config.batch_size))
        if config.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {config.eval_every}")
        augment = None
        if config.augment:
            augment = (train_data.augment if config.crop_padding is None else
                       dataclasses.replace(train_data.augment, crop_padding=config.crop_padding))
        on_batch = defense.on_batch if defense is not None and changes_batches(defense) else None
        # A frozen body sees the same images every epoch unless they are augmented or
        # transformed: their features are computed once.
        cacheable = frozen_body and augment is None and on_batch is None
        if features is not None and not (cacheable and features.shape[0] == len(train_data)):
            raise ValueError("precomputed features need transfer learning without augmentation "
                             f"or batch changes, and one row per training example "
                             f"({len(train_data)})")
        cached = None
        if cacheable:
            cached = (features.to(device) if features is not None
                      else feature_embeddings(model, train_data, device=device)[0])
        # ... and so does the test set, every epoch: its features too are computed once.
        test_features = (feature_embeddings(model, test_data, device=device) if frozen_body
                         else None)
        net = _data_parallel(model.classifier if frozen_body else model, device)
        stepper: torch.optim.Optimizer = optimizer
        if defense is not None:
            net, stepper = defense.setup(model, net, optimizer, num_examples=len(train_data),
                                         batch_size=config.batch_size)
        from_training = config.round_embeddings == "train-pass" and defense is not None
        if from_training and (size > 1 or not (defense is not None
                                               and defense.TAKES_TRAINING_GRADIENTS)):
            raise ValueError(
                f"round_embeddings='train-pass' takes a round's gradients from the training "
                f"pass, which only EPIC in one process can: use round_embeddings='eval' for "
                f"{type(defense).__name__}" + (f" under {size} ranks" if size > 1 else ""))
        return cls(model=model, train_data=train_data, test_data=test_data, config=config,
                   defense=defense, poisons=poisons, device=device, rank=rank,
                   shard=(rank, size) if size > 1 else None,
                   checkpoint=Path(out) / "checkpoint.pt" if out is not None else None,
                   outp=Path(out) if out is not None and rank == 0 else None, params=params,
                   optimizer=optimizer, stepper=stepper, scheduler=scheduler, net=net,
                   generator=generator, augment=augment, on_batch=on_batch, cached=cached,
                   test_features=test_features, from_training=from_training)

    def resume(self) -> int:
        """Continue from the run's checkpoint, if it has one of this run (else an error):
        the epoch to go on from (0 without one)."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return 0
        state = load_weights(self.checkpoint, map_location=self.device)  # sizes checked first
        check_same_run(self.checkpoint, json.loads(state.get("identity", "null")),
                       self.identity)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if self.defense is not None and state["defense"] is not None:
            self.defense.load_state_dict(state["defense"])
        self.metrics = json.loads(state["metrics"])
        start_epoch, self.elapsed = int(state["epoch"]) + 1, float(state["seconds"])
        log.info("resuming from %s at epoch %d", self.checkpoint, start_epoch)
        if self.outp is not None and self.defense is not None:  # a crash may have cut it
            write_json(self.outp / "defense.json", defense_records(self.defense, self.poisons))
        return start_epoch

    def write_config(self, run_info: dict[str, Any] | None) -> None:
        """``config.json``: the settings, resolved, the defense's, the poisons', the device
        and the run's provenance."""
        if self.outp is None:
            return
        config = self.config
        self.outp.mkdir(parents=True, exist_ok=True)
        write_json(self.outp / "config.json", {
            "config": dataclasses.asdict(config) | {"lr": config.resolved_lr,
                                                   "milestones": config.resolved_milestones},
            "defense": describe(self.defense),
            "poisons": None if self.poisons is None else {
                "count": len(self.poisons), "metadata": self.poisons.metadata},
            "device": describe_device(self.device), "run": (run_info or {}) | provenance()})

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """The defense's round if one is due, then one pass over the kept examples: the
        epoch's record so far (learning rate, round time, training loss and accuracy)."""
        config, defense, model, device = self.config, self.defense, self.model, self.device
        record: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        if defense is not None and defense.due(epoch):
            if self.recorded is not None:
                round_ = defense.update_from_embeddings(*self.recorded, epoch)
            else:
                round_ = defense.update(model, self.train_data, epoch, features=self.cached)
            record["defense_seconds"] = round(getattr(round_, "seconds", 0.0), 4)
        keep = defense.keep_mask if defense is not None else None
        recording = self.from_training and defense is not None and defense.due(epoch + 1)
        self.recorded = None
        model.train()
        if self.frozen_body:
            model.body.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y, idx in self._batches(keep):
            if self.on_batch is not None:
                x, y = self.on_batch(model, x, y)
                if self.frozen_body:  # the hook may have put the whole model in one mode
                    model.body.eval()
            if self.cached is not None:
                logits = self.net(x)
            elif self.frozen_body:
                with torch.no_grad():
                    feats = model.features(x)
                logits = self.net(feats)
            else:
                logits = self.net(channels_last_on_cpu(x) if config.channels_last else x)
            if recording:
                self.recorded = _record_gradients(self.recorded, logits, y, idx,
                                                  len(self.train_data))
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            self.stepper.zero_grad(set_to_none=True)
            loss.backward()
            if defense is not None:
                defense.after_backward(self.params)
            self.stepper.step()
            if config.schedule == "onecycle":
                self.scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if config.schedule != "onecycle":
            self.scheduler.step()
        if self.shard is not None:  # the whole epoch's figures, all ranks together
            for buffer in model.buffers():  # rank 0's batch-norm statistics for everyone
                dist.broadcast(buffer, 0)
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            loss_sum, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
        return record | {"train_loss": loss_sum / max(seen, 1),
                         "train_acc": correct / max(seen, 1), "trained_on": seen}

    def _batches(self, keep: Tensor | None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The epoch's shuffled batches of kept examples: images, or with cached features
        their rows (no image is read)."""
        data, device = self.train_data, self.device
        if self.cached is not None:
            cached = self.cached
            return ((cached[i.to(device)], data.labels[i.to(data.labels.device)].to(device), i)
                    for i in batch_indices(len(data), batch_size=self.config.batch_size,
                                           keep=keep, shuffle=True, generator=self.generator,
                                           shard=self.shard, min_batch=self.config.min_batch))
        return iterate_batches(data, batch_size=self.config.batch_size, keep=keep,
                               shuffle=True, augment=self.augment, generator=self.generator,
                               device=device, shard=self.shard,
                               min_batch=self.config.min_batch)

    def measure(self, epoch: int, record: dict[str, Any]) -> None:
        """Add to ``record`` what is measured after the epoch: test accuracy and attack
        success (every ``eval_every`` epochs and after the last), poisons dropped and the
        defense's facts."""
        config, poisons, defense = self.config, self.poisons, self.defense
        last = epoch == config.epochs - 1
        evaluating = last or (epoch + 1) % config.eval_every == 0
        if evaluating:
            record["test_acc"] = (evaluate(self.model, self.test_data, flips=config.test_flips)
                                  if self.test_features is None
                                  else _head_accuracy(self.model.classifier,
                                                      *self.test_features))
        keep = defense.keep_mask if defense is not None else None
        if poisons is not None:
            if evaluating:
                record["attack_success"] = poisons.success(self.model, self.test_data)
            if poisons.trigger is not None and last:
                record["patch_free_success"] = poisons.success(self.model, self.test_data,
                                                               patched=False)
            if keep is not None:
                record["poisons_dropped"] = int((~keep[poisons.indices]).sum())
        if defense is not None:
            record |= defense.facts()

    def save(self, epoch: int, record: dict[str, Any]) -> None:
        """Keep the epoch's record, and on the writer its checkpoint and, after a round,
        ``defense.json``."""
        self.metrics.append(record)
        if self.outp is None:
            return
        save_checkpoint(self.outp, self.model, self.optimizer, self.scheduler, self.generator,
                        self.defense, self.metrics, epoch, self.elapsed, self.identity)
        if self.defense is not None and record.get("defense_seconds") is not None:
            write_json(self.outp / "defense.json", defense_records(self.defense, self.poisons))

    def finish(self) -> TrainResult:
        """The run's summary, and on the writer ``model.pt`` and ``summary.json``."""
        summary = run_summary(self.metrics, self.defense, self.poisons, len(self.train_data))
        if self.outp is not None:
            replace_atomically(self.outp / "model.pt",
                               lambda f: torch.save(self.model.state_dict(), f))
            write_json(self.outp / "summary.json", summary)
        return TrainResult(self.metrics, summary, self.model)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
               ) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``config`` (stepped every epoch for ``"step"``, every
    batch for ``"onecycle"``)."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.resolved_lr, epochs=config.epochs,
            steps_per_epoch=max(steps_per_epoch, 1), cycle_momentum=False)
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.resolved_milestones), gamma=config.gamma)


@torch.no_grad()
def _record_gradients(recorded: tuple[Tensor, Tensor] | None, logits: Tensor, y: Tensor,
                      idx: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Write a training batch's ``softmax(z) - onehot(y)`` into rows ``idx`` of the epoch's
    ``(N, C)`` gradients and ``(N,)`` labels (allocated on the first batch)."""
    if recorded is None:
        recorded = (torch.zeros(n, logits.shape[1], device=logits.device),
                    torch.zeros(n, dtype=torch.long, device=logits.device))
    rows = idx.to(logits.device)
    probs = torch.softmax(logits.detach().float(), dim=1)
    recorded[0][rows] = probs - F.one_hot(y, logits.shape[1]).float()
    recorded[1][rows] = y
    return recorded


def _data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` under a process group of several ranks."""
    if world()[1] == 1:
        return module
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


@torch.no_grad()
def _head_accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Accuracy of a last layer on precomputed features (a frozen body's test set)."""
    return int((head(features).argmax(1) == labels).sum()) / max(len(labels), 1)
