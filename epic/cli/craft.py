"""``epic craft``: craft a poison set against a model the attacker holds (or trains)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from epic.attacks import ATTACKS, attack_options, craft_attack, is_backdoor, uses_model
from epic.cli.argtypes import at_least, number
from epic.cli.common import (
    add_data_args,
    add_setup_args,
    add_train_args,
    chosen_setups,
    load_data,
    make_model,
    output_folder,
    pick_device,
    train_config,
)
from epic.data import ImageData
from epic.formats import FORMATS, write_poisons
from epic.models import Classifier
from epic.poisons import PoisonSet
from epic.setups import resolve_target, victim_data
from epic.training import train

__all__ = ["add_craft_command", "craft_from_args"]

log = logging.getLogger("epic")

# the attack options that flags of the same name set (when given); an attack that takes no
# such option refuses the flag
ATTACK_FLAGS = ("eps", "iterations", "restarts", "retrain_epochs", "clean_label", "patch_size",
                "alpha")


def _default_eps() -> str:
    steps: dict[float, list[str]] = {}
    for name in sorted(ATTACKS):
        eps = attack_options(name).get("eps")
        if eps is not None:
            steps.setdefault(round(eps * 255), []).append(name)
    return ", ".join(f"{e} for {' and '.join(names)}" for e, names in sorted(steps.items()))


def add_craft_command(sub: Any) -> None:
    """Register ``craft`` on the ``epic`` subcommand parser."""
    p = sub.add_parser(
        "craft", help="craft a poison set (gm, bp, fc, sa, patch, blend) against a model",
        description="Craft a clean-label poison set against a model the attacker holds and "
                    "save it to --out (poisons.npz + poisons.json; --export adds the benchmark "
                    "layout or a MetaPoison-style pickle). Without --pretrained, a clean model "
                    "is first trained for --epochs (also written to --out/model.pt).")
    add_data_args(p)
    add_train_args(p)
    g = p.add_argument_group("attack")
    g.add_argument("--attack", choices=sorted(ATTACKS), required=True,
                   help="gm: Gradient Matching (from scratch); bp: Bullseye Polytope and fc: "
                        "Feature Collision (transfer); sa: Sleeper Agent (hidden-trigger "
                        "backdoor); patch: BadNets patch backdoor; blend: a random pattern "
                        "blended into the image (Chen et al. 2017)")
    g.add_argument("--target-index", type=at_least(0), default=0,
                   help="test image to attack (gm, bp, fc; default: 0)")
    g.add_argument("--adversarial-class", type=at_least(0), default=None,
                   help="class the target (or patched source) should become (default: the "
                        "next class after the target's / source's)")
    g.add_argument("--source-class", type=at_least(0), default=0,
                   help="backdoors: class whose patched images should flip (default: 0)")
    g.add_argument("--eps", type=number(1, 255), default=None,
                   help="l-infinity budget in pixel steps of 255, at least 1: a smaller one "
                        f"changes no pixel (default: {_default_eps()})")
    g.add_argument("--budget", type=number(0, low_open=True), default=0.01,
                   help="poisons as a share of the training set (< 1) or a count "
                        "(default: 0.01)")
    g.add_argument("--iterations", type=at_least(1), default=None, help="optimization steps")
    g.add_argument("--restarts", type=at_least(1), default=None, help="gm/sa: restarts")
    g.add_argument("--retrain-epochs", type=at_least(0), default=None,
                   help="sa: epochs per surrogate retraining")
    g.add_argument("--clean-label", action="store_true",
                   help="patch, blend: put the trigger on adversarial-class images, keep "
                        "labels")
    g.add_argument("--patch-size", type=at_least(1), default=None,
                   help="patch: side of the square trigger in pixels (default: 8 on 32x32 "
                        "images, a quarter of the side else)")
    g.add_argument("--alpha", type=number(0, 1, low_open=True), default=None,
                   help="blend: the pattern's weight in the blend, in (0, 1] (default: 0.2)")
    exports = [f for f in FORMATS.values() if f.write is not None and f.export_name]
    g.add_argument("--export", choices=[f.name for f in exports], default=None,
                   help="also write the set in another format: " + "; ".join(
                       f"{f.name}: {f.summary}, to OUT/{f.export_name}" for f in exports))
    g.add_argument("--out", required=True,
                   help="folder for the poison set (with --setups: one setup-NNN folder each)")
    g.add_argument("--progress", action="store_true", help="show crafting progress")
    g.add_argument("--json", action="store_true", help="print a JSON summary last")
    add_setup_args(p)
    p.set_defaults(handler=cmd_craft)


def _attacker_model(args: argparse.Namespace, train_data: ImageData, test_data: ImageData,
                    device: torch.device) -> Classifier | None:
    """The model the attacker crafts against: --pretrained's weights, or else a clean model
    trained from scratch as ``epic train`` would with the same training options; None for an
    attack that uses no model."""
    if not uses_model(args.attack):
        return None
    if args.pretrained is not None:
        return make_model(args, train_data, device)
    scratch = argparse.Namespace(**(vars(args) | {"scenario": "scratch"}))
    model = make_model(scratch, train_data, device)
    log.info("training the attacker's clean model for %d epochs", args.epochs)
    result = train(model, train_data, test_data, train_config(scratch),
                   out=Path(args.out) / "clean_model", progress=args.progress)
    log.info("clean model: test accuracy %.4f", result.summary["test_acc"])
    return model


def craft_from_args(args: argparse.Namespace, model: Classifier | None, train_data: ImageData,
                    test_data: ImageData, *, bases: torch.Tensor | None = None) -> PoisonSet:
    """Build the attack the arguments name and run it (on ``bases`` rows when given)."""
    budget: float | int = args.budget if args.budget < 1 else int(args.budget)
    options: dict[str, Any] = {"budget": budget}
    for option in ATTACK_FLAGS:
        value = getattr(args, option)
        if value is not None and value is not False:
            options[option] = value / 255 if option == "eps" else value
    if "retrain_config" in attack_options(args.attack):  # the surrogate, as the clean model
        options["retrain_config"] = train_config(
            argparse.Namespace(**(vars(args) | {"scenario": "scratch"})))
    return craft_attack(args.attack, model, train_data, test_data,
                        target_index=None if is_backdoor(args.attack) else args.target_index,
                        source_class=args.source_class, adversarial_class=args.adversarial_class,
                        seed=args.seed, bases=bases, progress=args.progress, **options)


def _check_classes(args: argparse.Namespace, train_data: ImageData, test_data: ImageData
                   ) -> None:
    """Refuse a target or class outside the data before any model is trained."""
    classes = train_data.num_classes
    for flag, value in (("--adversarial-class", args.adversarial_class),
                        ("--source-class", args.source_class)):
        if value is not None and value >= classes:
            raise ValueError(f"{flag} {value}: the data has classes 0..{classes - 1}")
    if is_backdoor(args.attack) and args.adversarial_class == args.source_class:
        raise ValueError(f"--adversarial-class {args.adversarial_class}: the same class as "
                         f"--source-class; a backdoor moves one class to another")
    if not is_backdoor(args.attack) and args.adversarial_class is not None and (
            args.target_index < len(test_data)
            and int(test_data.labels[args.target_index]) == args.adversarial_class):
        raise ValueError(f"--adversarial-class {args.adversarial_class}: the target "
                         f"(--target-index {args.target_index}) is of that class already")
    if not is_backdoor(args.attack) and args.target_index >= len(test_data):
        raise ValueError(f"--target-index {args.target_index}: the test set has "
                         f"{len(test_data)} images")


def cmd_craft(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    output_folder(args.out)
    train_data, test_data = load_data(args)
    _check_classes(args, train_data, test_data)
    train_data, test_data = train_data.to(device), test_data.to(device)
    setups = chosen_setups(args)
    if not setups:
        model = _attacker_model(args, train_data, test_data, device)
        return _craft_one(args, model, train_data, test_data, Path(args.out), {})
    attacker: Classifier | None = None
    need_model = uses_model(args.attack)
    for setup in setups:
        folder = Path(args.out) / f"setup-{setup.id:03d}"
        if (folder / "poisons.json").exists():
            log.warning("setup %d: %s exists, not crafted again", setup.id, folder)
            continue
        victim, rows = victim_data(train_data, setup, scenario=args.scenario,
                                   per_class=args.victim_per_class)
        if attacker is None and need_model:  # one attacker's model for every setup
            attacker = _attacker_model(args, victim, test_data, device)
        # a backdoor attacks the setup's target class as its source class, not one image
        target, stand_in = (-1, False) if is_backdoor(args.attack) else resolve_target(
            test_data.labels, setup, exact_below=args.exact_test)
        one = argparse.Namespace(**(vars(args) | {
            "target_index": target, "source_class": setup.target_class,
            "adversarial_class": setup.base_class}))
        facts = {"setup": setup.describe() | {
            "scenario": args.scenario, "victim_per_class": args.victim_per_class,
            "exact_test": args.exact_test, "target_stand_in": stand_in}}
        if stand_in:
            log.warning("setup %d: target %d is not stored exactly; attacking test image %d "
                        "of the same class instead", setup.id, setup.target_index, target)
        _craft_one(one, attacker, victim, test_data, folder, facts,
                   bases=None if is_backdoor(args.attack) else rows.to(device))
    return 0


def _craft_one(args: argparse.Namespace, model: Classifier | None, train_data: ImageData,
               test_data: ImageData, out_dir: Path, facts: dict[str, Any],
               bases: torch.Tensor | None = None) -> int:
    poisons = craft_from_args(args, model, train_data, test_data, bases=bases)
    poisons = PoisonSet(**{**poisons.__dict__, "metadata": poisons.metadata | facts | {
        "dataset": args.dataset, "model_name": args.model, "argv": args.argv}})
    out = poisons.save(out_dir)
    if args.export is not None:
        write_poisons(poisons, train_data, out / FORMATS[args.export].export_name, args.export)
    summary = {"attack": poisons.metadata["attack"], "poisons": len(poisons),
               "eps": poisons.eps, "target_class": poisons.target_class,
               "adversarial_class": poisons.adversarial_class,
               "seconds": poisons.metadata["seconds"], "out": str(out)}
    print(f"crafted {len(poisons)} {summary['attack']} poisons (eps {poisons.eps_pixels}/255, "
          f"{poisons.target_class} -> {poisons.adversarial_class}) in "
          f"{summary['seconds']:.1f}s; saved to {out}", flush=True)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0
