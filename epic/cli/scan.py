"""``epic scan``: flag a data set's suspected poisons for review (suspicious.csv, scan.html)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, cast

from epic.cli.argtypes import at_least
from epic.cli.common import (
    add_data_args,
    add_epic_args,
    add_fit_args,
    epic_settings,
    first_examples,
    load_data,
    make_model,
    output_folder,
    pick_device,
    train_config,
)
from epic.data import ImageData
from epic.defenses import EPIC, ForeignGroups, RunFacts, build_defense
from epic.images import MAX_FILE_BYTES, MAX_PIXELS, Skipped, read_image_folder, read_npz
from epic.models import MODELS
from epic.scan import scan, train_and_scan, write_outputs

__all__ = ["add_scan_command"]


def add_scan_command(sub: Any) -> None:
    """Register ``scan`` on the ``epic`` subcommand parser."""
    p = sub.add_parser(
        "scan", help="scan a data set for suspected poisons: a CSV and an HTML page to review",
        description="Flag the examples EPIC finds isolated in gradient space (suspected "
                    "poisons, or mislabelled or odd examples). With --model, one EPIC round "
                    "on that trained model; without, a fresh --arch is trained on the data "
                    "for --epochs with EPIC and every round's drops are flagged. Writes "
                    "suspicious.csv (file, label, cluster_size, round), skipped.csv (files "
                    "not read, and why) and scan.html (the flagged images by class) to --out.")
    g = add_data_args(p, test_split=False)
    g.add_argument("--data", default=None, metavar="DIR|FILE.npz",
                   help="the set to scan: a folder with one sub-folder per class (PNG, JPEG, "
                        "BMP, GIF or WEBP files; any other file is skipped and listed), or an "
                        ".npz of uint8 'images' and integer 'labels' (optional 'classes'); "
                        "without it, the training split of --dataset")
    g.add_argument("--image-size", type=at_least(1), default=None, metavar="S",
                   help="folders: resize every image to S x S (default: the most common size "
                        "in the folder)")
    g.add_argument("--max-file-bytes", type=at_least(1), default=MAX_FILE_BYTES,
                   help=f"folders: skip files larger than this (default: {MAX_FILE_BYTES:,})")
    g.add_argument("--max-pixels", type=at_least(1), default=MAX_PIXELS,
                   help=f"folders: skip images whose header declares more pixels, before "
                        f"decoding them (default: {MAX_PIXELS:,})")
    # --model names a weights file here (the wording) and --arch the architecture;
    # their dests are those of `epic train`'s --pretrained and --model, which make_model reads.
    m = p.add_argument_group(
        "model and training", "with --model: one EPIC round on that model (the training "
        "options are unused); without: a fresh --arch trained on the data")
    m.add_argument("--model", dest="pretrained", default=None, metavar="MODEL_PT",
                   help="weights of a trained model to scan with (a model.pt written by epic "
                        "train, or by an earlier scan in --out/train/)")
    m.add_argument("--arch", dest="model", choices=list(MODELS), default="convnet",
                   help="architecture of --model, or to train (default: convnet)")
    add_fit_args(m, evaluates=False)  # a scan holds out no test set
    d = p.add_argument_group("detector")
    d.add_argument("--detector", choices=("epic", "groups", "groups-epic"), default="epic",
                   help="epic: EPIC's isolated examples (default); groups: the foreign-groups "
                        "detector's cohesive groups, on EPIC-0.1's schedule when training; "
                        "groups-epic: both, EPIC at --fraction, on its schedule, ranked "
                        "together (docs/defenses.md)")
    add_epic_args(p.add_argument_group("EPIC"))
    o = p.add_argument_group("output")
    o.add_argument("--out", default="scan",
                   help="output folder (default: scan); the training run goes to --out/train")
    o.add_argument("--json", action="store_true",
                   help="print the summary as JSON on the last line of output")
    p.set_defaults(handler=cmd_scan, arch_flag="--arch", scenario="scratch")


def _scan_input(args: argparse.Namespace
                ) -> tuple[ImageData, tuple[str, ...] | None, tuple[Skipped, ...], str]:
    """``(data, file names or None, skipped files, where from)`` of --data or --dataset."""
    if args.data is None:
        return load_data(args)[0], None, (), args.dataset
    path = Path(args.data)
    if path.is_dir():
        folder = read_image_folder(path, image_size=args.image_size,
                                   max_file_bytes=args.max_file_bytes,
                                   max_pixels=args.max_pixels)
        data = first_examples(folder.data, args.subset)
        return data, folder.files[:len(data)], folder.skipped, str(path)
    if path.suffix == ".npz" or path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path} is neither a folder nor an .npz file")
        return first_examples(read_npz(path), args.subset), None, (), str(path)
    raise FileNotFoundError(f"{path} does not exist")


def cmd_scan(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = pick_device(args.device)
    out = output_folder(args.out)
    data, files, skipped, source = _scan_input(args)
    c, h, w = data.shape
    print(f"read {len(data)} images of {data.num_classes} classes ({c} x {h} x {w}) from "
          f"{source}; files skipped: {len(skipped)}", flush=True)
    model = make_model(args, data, device)
    settings = epic_settings(args)
    groups = args.detector != "epic"
    isolated = args.detector == "groups-epic"
    name = "foreign-groups" if groups else "EPIC"
    if args.pretrained is not None:
        result = scan(model, data, settings=settings, groups=groups, isolated=isolated,
                      files=files, skipped=skipped)
        print(f"{name} round on {args.pretrained}: flagged {len(result.flags)}", flush=True)
    else:
        config = train_config(args)
        run = RunFacts(num_examples=len(data), epochs=args.epochs,
                       milestones=config.resolved_milestones)
        schedule = {"warmup": args.warmup, "every": args.every, "until": args.until}
        defense = (cast(ForeignGroups, build_defense(
            "foreign-groups", run, **schedule, **({"isolated": args.fraction} if isolated
                                                  else {})))
                   if groups else cast(EPIC, build_defense(
                       "epic", run, **schedule, **dataclasses.asdict(settings))))
        rounds = [e for e in range(args.epochs) if defense.due(e)]
        detector = (f"groups-epic-{args.fraction}" if isolated else name if groups
                    else f"EPIC-{args.fraction}")
        print(f"training {args.model} for {args.epochs} epochs with {detector}, "
              f"rounds before epochs {rounds}", flush=True)

        def report(epoch: int, record: dict[str, Any]) -> None:
            line = f"epoch {epoch}: "
            if "defense_seconds" in record:
                r = defense.history[-1]
                line += (f"{name} round {len(defense.history)} flagged {len(r.dropped)}, "
                         f"{r.remaining} remain; ")
            print(f"{line}train accuracy {record['train_acc']:.3f}", flush=True)

        result = train_and_scan(model, data, defense, config, files=files, skipped=skipped,
                                out=out / "train", on_epoch_end=report,
                                run_info={"argv": args.argv, "data": source,
                                          "model": args.model, "seed": args.seed})
    paths = write_outputs(result, out)
    seconds = time.perf_counter() - start
    rounds_done = len(result.rounds)
    print(f"flagged {len(result.flags)} of {len(data)} examples in {rounds_done} {name} "
          f"round{'' if rounds_done == 1 else 's'}, files skipped: {len(skipped)}, "
          f"{seconds:.1f}s; wrote "
          f"{', '.join(str(p) for p in paths.values())}")
    if args.json:
        print(json.dumps(result.summary() | {"seconds": round(seconds, 3)}
                         | {name: str(p) for name, p in paths.items()}))
    return 0
