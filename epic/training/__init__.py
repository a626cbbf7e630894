"""The training loop and its scenarios: from scratch, transfer learning, fine-tuning.

One function, :func:`train`, runs SGD over an in-memory dataset with an optional defense
(a :class:`epic.protocol.Defense`, such as :class:`epic.EPIC`, whose hooks it calls) and an
optional poison set whose attack success it measures every epoch. With ``out`` it writes the
resolved config, per-epoch metrics, defense records, a checkpoint each epoch (``resume=True``
continues from it) and a summary.

Where each part lives: ``config.py`` what a run is (:class:`TrainConfig`, :data:`Scenario`,
:class:`TrainResult`, :func:`prepare_model`, :func:`evaluate`); ``loop.py`` the loop
(:func:`train`); ``records.py`` the run's folder (config, metrics, defense records,
checkpoints and the resume check, summary).
"""

from epic.protocol import Defense
from epic.training.config import (
    HeadRng,
    RoundEmbeddings,
    Scenario,
    Schedule,
    TrainConfig,
    TrainResult,
    config_record,
    default_milestones,
    evaluate,
    prepare_model,
)
from epic.training.loop import train
from epic.training.records import defense_records, provenance

__all__ = ["Defense", "HeadRng", "RoundEmbeddings", "Scenario", "Schedule", "TrainConfig",
           "TrainResult", "config_record", "default_milestones", "defense_records", "evaluate",
           "prepare_model", "provenance", "train"]
