"""The ``epic`` command: ``train``, ``scan``, ``craft``, ``demo`` and ``bench``.

One module per command (``train.py``, ``scan.py``, ``craft.py``, ``demo.py``, ``bench.py``),
each registering its subparser and handler; ``common.py`` holds the option groups and option
readers they share, ``argtypes.py`` the checked option types. The commands turn options into
calls of the library and hold no logic of their own. ``python -m epic.cli`` and
``torchrun -m epic.cli train ...`` run :func:`main` as the ``epic`` script does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from epic.cli.bench import add_bench_commands
from epic.cli.common import parse_command
from epic.cli.craft import add_craft_command
from epic.cli.demo import add_demo_command
from epic.cli.scan import add_scan_command
from epic.cli.train import add_train_command
from epic.errors import EpicError

__all__ = ["build_parser", "main"]


class _ExactParser(argparse.ArgumentParser):
    """A parser that takes flags only as spelled: ``--ep 3`` is an error, not ``--epochs 3``,
    so a stored command line means the same whatever flags are added later. Subcommands'
    parsers are of the class of their parent, so the rule holds for every command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``epic`` command; each sets ``handler`` to the function running it."""
    parser = _ExactParser(
        prog="epic",
        description="Train image classifiers that resist data poisoning (EPIC, ICML 2022).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_command(sub)
    add_scan_command(sub)
    add_craft_command(sub)
    add_demo_command(sub)
    add_bench_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``epic ARGV`` (default: ``sys.argv[1:]``); a bad input ends in a one-line error."""
    parser = build_parser()
    args = parse_command(parser, argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except EpicError as exc:  # the library's words for its parameters, as flags here
        parser.exit(2, f"epic: error: {exc.worded(_as_flag)}\n")
    except (ValueError, OSError, RuntimeError) as exc:
        parser.exit(2, f"epic: error: {exc}\n")


def _as_flag(option: str) -> str:
    """The command-line flag of a library parameter: ``data_dir`` -> ``--data-dir``."""
    return "--" + option.replace("_", "-")
