"""What the ``epic`` commands share: option groups, and the objects they turn options into.

The option groups (:func:`add_data_args`, :func:`add_train_args`, :func:`add_fit_args`,
:func:`add_epic_args`, :func:`add_setup_args`) and the readers of the options they add
(:func:`pick_device`, :func:`output_folder`, :func:`load_data`, :func:`make_model`,
:func:`train_config`, :func:`chosen_setups`), so that every command spells an option, and
builds from it, the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from epic.cli.argtypes import at_least, number
from epic.data import DATASETS, ImageData, load_dataset
from epic.defenses import EpicSettings
from epic.io.files import UntrustedFileError
from epic.io.safe_pickle import UnsafePickleError, load_weights
from epic.models import MODELS, Classifier, build_model
from epic.selection import PerClass, Similarity
from epic.setups import Setup, load_setups, select_setups
from epic.training import HeadRng, RoundEmbeddings, Scenario, Schedule, TrainConfig

__all__ = ["add_data_args", "add_epic_args", "add_fit_args", "add_round_embeddings_arg",
           "epic_settings",
           "add_setup_args", "add_train_args",
           "chosen_setups", "first_examples", "load_data", "make_model", "output_folder",
           "parse_command", "pick_device", "run_command", "train_config"]


def parse_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """The arguments of the ``epic`` command line ``argv`` (without the program name), with
    ``argv`` and ``parser`` attached for handlers that record or run command lines."""
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.parser = parser
    return args


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Run the ``epic`` command line ``argv`` in this process (a preset's step); its exit code."""
    args = parse_command(parser, argv)
    return int(args.handler(args))


def pick_device(name: str | None) -> torch.device:
    """The device ``--device`` names (default: cuda when available), checked to exist."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
    return device


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder this process can write to, created if missing; else a one-line
    error naming ``flag``, before any work starts."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {out}: cannot create it ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: not writable")
    return out


def add_data_args(p: argparse.ArgumentParser, *, test_split: bool = True
                  ) -> argparse._ArgumentGroup:
    """The data group: --dataset, --data-dir, --download, --subset (and --test-subset)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="training data (default: digits, scikit-learn's embedded 8x8 digits)")
    g.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py (or cifar10/..., or the .tar.gz); "
                        "default: $EPIC_DATA_DIR")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR (checksum-verified) if it is not in --data-dir")
    g.add_argument("--subset", type=at_least(1), default=None, metavar="N",
                   help="train on the first N training examples only (quick runs)")
    if test_split:
        g.add_argument("--test-subset", type=at_least(1), default=None, metavar="N",
                       help="evaluate on the first N test examples only")
    else:
        p.set_defaults(test_subset=None)
    return g


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The "model and training" group: --model, --scenario, --pretrained and
    :func:`add_fit_args`."""
    p.set_defaults(arch_flag="--model")
    g = p.add_argument_group("model and training")
    g.add_argument("--model", choices=list(MODELS), default="convnet",
                   help="architecture (resnet18, vgg16 as in the paper; *-small and convnet "
                        "for CPU work; default: convnet)")
    g.add_argument("--scenario", choices=get_args(Scenario), default="scratch",
                   help="scratch: train all from random init; transfer: freeze the feature "
                        "extractor of --pretrained, retrain a new last layer; finetune: new last "
                        "layer, train all at lr 1e-4")
    g.add_argument("--pretrained", default=None, metavar="MODEL_PT",
                   help="weights to start transfer/finetune from (a model.pt written by a run "
                        "of this tool on clean data)")
    add_fit_args(g)


def add_fit_args(g: argparse._ArgumentGroup, *, evaluates: bool = True) -> None:
    """--epochs, --eval-every (where the command ``evaluates`` a test set), --lr,
    --batch-size, --weight-decay, --channels-last, --milestones, --no-augment,
    --crop-padding, --schedule, --label-smoothing, --test-flips, --seed, --device: what
    :func:`train_config` and :func:`pick_device` read."""
    g.add_argument("--epochs", type=at_least(1), default=40, help="training epochs (default: 40)")
    if evaluates:
        g.add_argument("--eval-every", type=at_least(1), default=1, metavar="N",
                       help="test accuracy and attack success every N epochs and after the "
                            "last (default: 1)")
    g.add_argument("--lr", type=number(0, low_open=True), default=None,
                   help="learning rate (default: 0.1; 1e-4 when fine-tuning)")
    g.add_argument("--batch-size", type=at_least(1), default=128,
                   help="mini-batch size (default: 128)")
    g.add_argument("--weight-decay", type=number(0), default=5e-4, help="default: 5e-4")
    g.add_argument("--channels-last", action="store_true",
                   help="train on channels-last batches: 1.1-1.4x faster convolutional steps "
                        "on the CPU, with weights that round differently from a run without")
    g.add_argument("--milestones", type=at_least(1), nargs="*", default=None,
                   help="epochs where lr drops by 10 (default: 100 150 for 200 epochs, "
                        "else 25/40 and 35/40 of the epochs)")
    g.add_argument("--no-augment", action="store_true",
                   help="train without random crop and flip")
    g.add_argument("--crop-padding", type=at_least(0), default=None, metavar="PIXELS",
                   help="the random crop's reflect padding (default: the data set's, 4 on "
                        "CIFAR; 2 is a 2-pixel translation)")
    g.add_argument("--schedule", choices=get_args(Schedule), default="step",
                   help="step: lr / 10 at each milestone (default, the paper's); onecycle: "
                        "warm up to --lr over 30%% of the steps, then anneal to nearly 0")
    g.add_argument("--label-smoothing", type=number(0, 0.99), default=0.0,
                   help="cross-entropy label smoothing (default: 0)")
    g.add_argument("--test-flips", action="store_true",
                   help="test accuracy from each test image and its mirror image together")
    g.add_argument("--seed", type=at_least(0), default=0, help="seed for init, order, augmentation")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def add_epic_args(g: argparse._ArgumentGroup) -> None:
    """EPIC's settings and schedule: --fraction ... --round-embeddings."""
    g.add_argument("--fraction", type=number(0, 1, low_open=True), default=0.1,
                   help="EPIC: share of each class chosen as medoids (default: 0.1)")
    g.add_argument("--warmup", type=at_least(0), default=None,
                   help="epochs before the first round (default: 100 x --fraction, as the "
                        "paper's 10/20/30 for EPIC-0.1/0.2/0.3)")
    g.add_argument("--every", type=at_least(1), default=None,
                   help="epochs between rounds (default: epochs/20, i.e. 2 of 40 and 10 of 200; "
                        "1 in transfer learning)")
    g.add_argument("--until", type=at_least(1), default=None,
                   help="no rounds from this epoch on (default: the last lr milestone; one round "
                        "only for the feature-space filters)")
    g.add_argument("--max-cluster-size", type=at_least(1), default=1,
                   help="EPIC: drop medoids of clusters this small (default: 1, alone)")
    g.add_argument("--similarity", choices=get_args(Similarity), default="exp",
                   help="EPIC: gradient similarity (default: exp(-d/D), the authors' code)")
    g.add_argument("--per-class", choices=get_args(PerClass), default="proportional",
                   help="EPIC: medoids per class proportional to class size, or equal")
    add_round_embeddings_arg(g)


def epic_settings(args: argparse.Namespace) -> EpicSettings:
    """EPIC's settings from the flags of :func:`add_epic_args`: the one place they are read."""
    return EpicSettings(fraction=args.fraction, max_cluster_size=args.max_cluster_size,
                        similarity=args.similarity, per_class=args.per_class)


def add_round_embeddings_arg(g: argparse._ArgumentGroup) -> None:
    """--round-embeddings, which :func:`train_config` takes as a setting."""
    g.add_argument("--round-embeddings", choices=get_args(RoundEmbeddings), default="eval",
                   help="EPIC: gradients from an eval pass before each round (default, the "
                        "paper's), or from the training pass of the epoch before (no extra "
                        "pass; augmented, train-mode inputs; EPIC in one process only)")


def add_setup_args(p: argparse.ArgumentParser) -> None:
    """``--setups FILE`` and the options that pick setups and build their victim sets."""
    g = p.add_argument_group(
        "benchmark setups", "Trials fixed by a poisoning-benchmark setup file (Schwarzschild et "
        "al. 2021): target, target class, base class and base images of each trial.")
    g.add_argument("--setups", default=None, metavar="FILE",
                   help="a setup pickle such as cifar10_transfer_learning.pickle")
    g.add_argument("--first", type=at_least(1), default=None, metavar="N",
                   help="use the first N setups (default: all)")
    g.add_argument("--setup-ids", type=at_least(0), nargs="+", default=None, metavar="I",
                   help="use these setup numbers instead")
    g.add_argument("--victim-per-class", type=at_least(1), default=None, metavar="N",
                   help="victim training images per class (default: 250 in transfer learning, "
                        "as in the benchmark; all otherwise)")
    g.add_argument("--exact-test", type=at_least(1), default=None, metavar="N",
                   help="only test images below N are stored exactly: a target at or above "
                        "N is replaced by the exact test image of its class at position "
                        "(index mod count) (the shared CIFAR-10 copy: 1000)")


def chosen_setups(args: argparse.Namespace) -> list[Setup]:
    """The setups ``--setups``/``--first``/``--setup-ids`` name (empty without --setups)."""
    if args.setups is None:
        return []
    return select_setups(load_setups(args.setups), first=args.first, ids=args.setup_ids)


def load_data(args: argparse.Namespace) -> tuple[ImageData, ImageData]:
    """The train/test sets the arguments name, cut to --subset / --test-subset."""
    train_data, test_data = load_dataset(args.dataset, args.data_dir, download=args.download)
    return first_examples(train_data, args.subset), first_examples(test_data, args.test_subset)


def first_examples(data: ImageData, n: int | None) -> ImageData:
    """The first ``n`` examples of ``data`` (all when ``n`` is None)."""
    return data if n is None else data.subset(torch.arange(min(n, len(data))))


def make_model(args: argparse.Namespace, train_data: ImageData, device: torch.device, *,
               head_rng: HeadRng = "seed") -> Classifier:
    """A fresh model initialized from ``args.seed``, loaded from --pretrained when given (the
    architecture is ``args.model``, named on the command line by ``args.arch_flag``).

    torch's global RNG is left as it was, but for ``head_rng="global"``: then it is left
    seeded and past the model's initialization, where runs stored before
    :attr:`TrainConfig.head_rng <epic.training.TrainConfig>` drew their new last layer."""
    with (contextlib.nullcontext() if head_rng == "global"
          else torch.random.fork_rng(devices=[])):
        torch.manual_seed(args.seed)
        model = build_model(args.model, num_classes=train_data.num_classes,
                            in_channels=train_data.shape[0], mean=train_data.mean,
                            std=train_data.std)
    if args.pretrained is not None:
        state = _load_weights(args.pretrained)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            detail = (lines[1].strip() if len(lines) > 1 else lines[0])[:160]
            raise ValueError(f"{args.pretrained} is not a {args.model} for "
                             f"{train_data.num_classes} classes of {train_data.shape[0]}-channel "
                             f"images ({detail}); pass the {args.arch_flag} it was trained "
                             f"as") from exc
    elif args.scenario != "scratch":
        raise SystemExit(f"--scenario {args.scenario} needs --pretrained MODEL_PT")
    return model.to(device)


def _load_weights(path: str) -> Mapping[str, Any]:
    """The state dict in ``path``, read by :func:`epic.io.safe_pickle.load_weights` (nothing is
    executed, sizes are checked first)."""
    try:
        state = load_weights(path)
    except (FileNotFoundError, UnsafePickleError, UntrustedFileError):
        raise
    except Exception as exc:  # torch.load raises many types on a file that is not its own
        detail = _first_sentence(str(exc))
        raise ValueError(f"{path} is not a model file that torch.load reads safely "
                         f"({type(exc).__name__}: {detail})") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a model state dict")
    return state


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of ``text`` (of its first line), cut at a word within ``limit``."""
    first = (text.strip().splitlines() or [""])[0]
    end = first.find(". ")
    first = first if end < 0 else first[:end + 1]
    return first if len(first) <= limit else first[:limit].rsplit(" ", 1)[0] + " ..."


def train_config(args: argparse.Namespace, **settings: Any) -> TrainConfig:
    """The :class:`TrainConfig` of the arguments :func:`add_fit_args` adds, ``--scenario``
    and ``--round-embeddings`` where the command has it, plus ``settings``."""
    if hasattr(args, "round_embeddings"):
        settings = {"round_embeddings": args.round_embeddings} | settings
    return TrainConfig(epochs=args.epochs, scenario=args.scenario, lr=args.lr,
                       batch_size=args.batch_size, weight_decay=args.weight_decay,
                       milestones=tuple(args.milestones) if args.milestones is not None
                       else None, augment=not args.no_augment, seed=args.seed,
                       eval_every=getattr(args, "eval_every", 1),
                       channels_last=args.channels_last,
                       schedule=args.schedule, label_smoothing=args.label_smoothing,
                       crop_padding=args.crop_padding, test_flips=args.test_flips, **settings)
