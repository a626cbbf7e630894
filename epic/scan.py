"""Offline scan of a data set for suspected poisons, as files to review: EPIC's isolated
examples, the foreign-groups detector's cohesive groups, or both ranked together.

:func:`scan` runs one round on a trained model; :func:`train_and_scan` trains a model on the
data under the detector and collects every round's drops. Both give a :class:`ScanResult`,
which :func:`write_outputs` turns into ``suspicious.csv`` (one row per flagged example),
``skipped.csv`` (files that were not read) and ``scan.html`` (the flagged images as
thumbnails: by class, or finding by finding, the most unlike their class first). EPIC flags a
medoid of its class's last-layer gradients that no other example of the class joined: the
isolated points where effective poisons end up, and also mislabelled or odd clean examples.
The groups detector (:mod:`epic.defenses.groups`) flags groups of examples that are unlike
their class and keep together, as poisons that share a trigger or a source class do, which
EPIC misses; with ``isolated`` it flags EPIC's isolated examples too, each scored on the same
scale as the groups. Its page also shows the groups it found but did not flag. Review them,
do not delete blindly.

The page is self-contained (thumbnails are PNG data URIs), shows every file and class name
as text only (HTML-escaped; its Content-Security-Policy runs no script but its own), and its
script marks any thumbnail the browser fails to decode with the file's name.

Example:
    >>> from epic.images import read_image_folder  # doctest: +SKIP
    >>> folder = read_image_folder("photos/")
    >>> result = scan(model, folder.data, files=folder.files, skipped=folder.skipped)
    >>> write_outputs(result, "scan/")
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from epic.data import ImageData
from epic.defenses import EPIC, DropRound, EpicRound, EpicSettings, ForeignGroups, GroupRound
from epic.images import Skipped
from epic.io.files import replace_atomically
from epic.models import Classifier
from epic.pages import encode_text, write_page
from epic.training import TrainConfig, train

__all__ = ["Flag", "Group", "ScanResult", "collect", "index_names", "scan", "thumbnail_png",
           "train_and_scan", "write_csv", "write_html", "write_outputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flag:
    """One flagged example.

    Attributes:
        index: its position in the data set.
        file: its file (relative to the folder) or name such as ``train[1234]``.
        label: its class name.
        cluster_size: the size of its gradient cluster (EPIC) or of its group (groups) in
            the round that flagged it.
        round: that round, counted from 1.
        epoch: the training epoch before which that round ran.
        group: the :attr:`Group.name` of its group ("" for EPIC's flags).
    """

    index: int
    file: str
    label: str
    cluster_size: int
    round: int
    epoch: int
    group: str = ""


@dataclass(frozen=True)
class Group:
    """What the foreign-groups detector found in one round, for review: a group of examples,
    or (``groups-epic``) one isolated example.

    Attributes:
        name: ``"<round>.<rank>"``, its rank in that round's findings counted from 1: flagged
            ones first, then by score, highest first.
        round, epoch: as in :class:`Flag`.
        label: its members' class name; ``nearest``: the other class nearest them.
        cohesion: the mean share of its members' nearest class-mates inside it (None for an
            isolated example).
        learned: the share of its members the model predicted as their label (None for an
            isolated example).
        score: its members' mean unlikeness score (robust z).
        flagged: whether the round dropped it (a group: its cohesion reached the detector's
            and, if it held more than the detector's ``unlearned`` share of its class, it was
            learned; an isolated example always).
        members: their positions in the data set.
    """

    name: str
    round: int
    epoch: int
    label: str
    nearest: str
    cohesion: float | None
    learned: float | None
    score: float
    flagged: bool
    members: tuple[int, ...]

    @property
    def isolated(self) -> bool:
        """Whether this is an isolated example (EPIC's kind of find), not a group."""
        return self.cohesion is None


@dataclass(frozen=True)
class ScanResult:
    """What a scan found.

    Attributes:
        data: the scanned set (images ``(N, C, H, W)`` uint8, labels ``(N,)``).
        files: ``(N,)`` names of the examples, in dataset order.
        flags: the flagged examples, by round, then by index (groups: by group).
        rounds: the detector's record of each round (EPIC's: ``cluster_size_of`` ``(N,)``).
        skipped: files that were not read into ``data``.
        groups: what the foreign-groups detector found (:class:`Group`), round by round,
            each round's flagged first, the highest score first (empty for EPIC).
    """

    data: ImageData
    files: tuple[str, ...]
    flags: tuple[Flag, ...]
    rounds: tuple[DropRound, ...]
    skipped: tuple[Skipped, ...] = ()
    groups: tuple[Group, ...] = ()

    @property
    def flagged(self) -> Tensor:
        """Bool mask ``(N,)``, True = flagged by some round."""
        mask = torch.zeros(len(self.data), dtype=torch.bool)
        mask[[f.index for f in self.flags]] = True
        return mask

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: counts, and per round its epoch, flags and examples left."""
        return {"examples": len(self.data), "flagged": len(self.flags),
                "skipped": len(self.skipped),
                "rounds": [{"round": i, "epoch": r.epoch, "flagged": len(r.dropped),
                            "remaining": r.remaining} for i, r in enumerate(self.rounds, 1)]}


def index_names(n: int, split: str = "train") -> tuple[str, ...]:
    """Names for examples that have no file: ``train[0]``, ``train[1]``, ..."""
    return tuple(f"{split}[{i}]" for i in range(n))


Detector = EPIC | ForeignGroups


def collect(data: ImageData, defense: Detector, *, files: Sequence[str] | None = None,
            skipped: Sequence[Skipped] = ()) -> ScanResult:
    """The :class:`ScanResult` of the rounds ``defense`` ran on ``data``.

    ``files``: ``(N,)`` names of the examples (default: :func:`index_names`).
    """
    names = tuple(files) if files is not None else index_names(len(data))
    if len(names) != len(data):
        raise ValueError(f"files names {len(names)} examples, the data holds {len(data)}")
    labels = data.labels.tolist()
    if isinstance(defense, ForeignGroups):
        group_rounds = tuple(r for r in defense.history if isinstance(r, GroupRound))
        groups = tuple(g for k, r in enumerate(group_rounds, 1)
                       for g in _findings(r, k, data.classes))
        flags = tuple(Flag(i, names[i], data.classes[labels[i]], len(g.members), g.round,
                           g.epoch, g.name) for g in groups if g.flagged for i in g.members)
        rounds: tuple[DropRound, ...] = group_rounds
    else:
        epic_rounds = tuple(r for r in defense.history if isinstance(r, EpicRound))
        flags = tuple(Flag(i, names[i], data.classes[labels[i]], int(r.cluster_size_of[i]),
                           k, r.epoch)
                      for k, r in enumerate(epic_rounds, 1) for i in r.dropped.tolist())
        rounds, groups = epic_rounds, ()
    log.info("flagged %d of %d examples in %d rounds", len(flags), len(data), len(rounds))
    return ScanResult(data, names, flags, rounds, tuple(skipped), groups)


def _findings(r: GroupRound, k: int, classes: Sequence[str]) -> list[Group]:
    """Round ``k``'s groups and isolated examples, ranked for review: flagged first, then
    the highest score first; named by that rank."""
    found = [Group("", k, r.epoch, classes[g["label"]], classes[g["nearest"]], g["cohesion"],
                   g["learned"], g["score"], g["dropped"], tuple(g["members"]))
             for g in r.groups]
    found += [Group("", k, r.epoch, classes[e["label"]], classes[e["nearest"]], None, None,
                    e["score"], True, (e["index"],)) for e in r.isolated]
    found.sort(key=lambda g: (not g.flagged, -g.score))
    return [replace(g, name=f"{k}.{rank}") for rank, g in enumerate(found, 1)]


def scan(
    model: nn.Module,
    data: ImageData,
    *,
    settings: EpicSettings | None = None,
    groups: bool = False,
    isolated: bool = False,
    batch_size: int | None = None,
    files: Sequence[str] | None = None,
    skipped: Sequence[Skipped] = (),
) -> ScanResult:
    """One EPIC round with ``settings`` (default: :class:`epic.EpicSettings`'s) on a trained
    ``model``: flags the isolated examples of ``data``; with ``groups``, one round of the
    foreign-groups detector instead (scored once: ``min_rounds=1``): flags cohesive groups,
    and with ``isolated`` also the isolated examples EPIC at ``settings``' fraction flags,
    groups and examples ranked together by score.

    The model runs in eval mode on the un-augmented images, on its own device; ``files`` and
    ``skipped`` as in :func:`collect`.

    Example:
        >>> result = scan(model, folder.data, files=folder.files)  # doctest: +SKIP
        >>> [(f.file, f.label) for f in result.flags]
        [('cat/0042.png', 'cat'), ...]
    """
    fraction = (settings or EpicSettings()).fraction
    defense: Detector = (
        ForeignGroups(min_rounds=1, warmup=0, every=1, batch_size=batch_size,
                      isolated=fraction if isolated else None,
                      num_examples=len(data)) if groups else
        EPIC.from_settings(settings or EpicSettings(), warmup=0, every=1,
                           batch_size=batch_size, num_examples=len(data)))
    defense.update(model, data, 0)
    return collect(data, defense, files=files, skipped=skipped)


def train_and_scan(
    model: Classifier,
    data: ImageData,
    defense: Detector,
    config: TrainConfig | None = None,
    *,
    files: Sequence[str] | None = None,
    skipped: Sequence[Skipped] = (),
    out: str | os.PathLike[str] | None = None,
    run_info: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> ScanResult:
    """Train ``model`` on ``data`` under ``defense`` with :func:`epic.training.train`; every round's
    drops are flagged.

    ``config`` defaults to :class:`epic.training.TrainConfig`'s (the paper's 40 epochs). No test set
    is held out (the run's ``test_acc`` reads 0); ``out``, ``run_info`` and ``on_epoch_end``
    go to :func:`epic.training.train`, ``files`` and ``skipped`` to :func:`collect`.

    Raises:
        ValueError: ``defense``'s schedule runs no round within ``config.epochs``.

    Example:
        >>> defense = EPIC(0.1, warmup=10, every=2, until=35, num_examples=len(data))
        >>> result = train_and_scan(model, data, defense, TrainConfig(epochs=40))  # doctest: +SKIP
    """
    config = config if config is not None else TrainConfig()
    defense.check_runs_within(config.epochs, name="EPIC" if isinstance(defense, EPIC) else
                              "foreign-groups")
    train(model, data, data.subset(torch.arange(0)), config, defense=defense, out=out,
          run_info=run_info, on_epoch_end=on_epoch_end)
    return collect(data, defense, files=files, skipped=skipped)


# ----------------------------------------------------------------------------- outputs


def write_outputs(result: ScanResult, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``suspicious.csv``, ``skipped.csv`` and ``scan.html`` into the folder ``out``
    (created if needed); returns their paths by name."""
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    paths = {name: outp / name for name in ("suspicious.csv", "skipped.csv", "scan.html")}
    write_csv(result, paths["suspicious.csv"])
    _write_rows(paths["skipped.csv"], ("file", "reason"),
                [(s.file, s.reason) for s in result.skipped])
    write_html(result, paths["scan.html"])
    return paths


def write_csv(result: ScanResult, path: str | os.PathLike[str]) -> None:
    """``file,label,cluster_size,round,group``, one row per flagged example (atomically).

    A name that a spreadsheet would run as a formula (first character ``= + - @``, their
    fullwidth forms, or a tab, carriage return or line feed) gets a leading ``'``.
    """
    _write_rows(path, ("file", "label", "cluster_size", "round", "group"),
                [(f.file, f.label, f.cluster_size, f.round, f.group) for f in result.flags])


def _write_rows(path: str | os.PathLike[str], header: Sequence[str],
                rows: Sequence[Sequence[object]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    replace_atomically(path, lambda f: f.write(encode_text(text.getvalue())))


# what makes a spreadsheet read a cell as a formula: its first character, also in the
# fullwidth forms some spreadsheets accept, or a line break or tab before it
_FORMULA_STARTS = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")


def _cell(value: object) -> object:
    if isinstance(value, str) and value[:1] in _FORMULA_STARTS:
        return "'" + value
    return value


def thumbnail_png(image: Tensor, size: int = 96) -> bytes:
    """A PNG of ``image`` (uint8 ``(C, H, W)``, C 1 or 3) about ``size`` pixels on its longer
    side: small images are enlarged by a whole factor with nearest neighbour (pixels stay
    sharp), large ones shrunk to fit."""
    array = image.cpu().numpy()
    img = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    longest = max(img.size)
    if longest <= size:
        k = size // longest
        img = img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    else:
        img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 140px; font-size: 12px; overflow-wrap: break-word; }
img.thumb { image-rendering: pixelated; border: 1px solid #999; display: block; }
.failed { color: #b00; font-weight: bold; }
.count { font-weight: normal; color: #555; font-size: 0.8em; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
"""

# Marks every thumbnail once the browser has decoded it (data-state="decoded") or failed to
# ("failed", with the file name shown next to it); the body's data-checked counts them.
_SCRIPT = """
const thumbs = [...document.querySelectorAll("img.thumb")];
Promise.allSettled(thumbs.map((img) => img.decode().then(
  () => { img.dataset.state = "decoded"; },
  () => {
    img.dataset.state = "failed";
    const note = document.createElement("div");
    note.className = "failed";
    note.textContent = "could not show " + img.alt;
    img.after(note);
  }))).then(() => { document.body.dataset.checked = String(thumbs.length); });
"""


def _breakable(name: str) -> str:
    """``name`` HTML-escaped, with a line-break opportunity after each ``/ _ - .``: a long
    file name wraps between its parts rather than in the middle of a word."""
    return re.sub(r"([/_.-])", r"\1<wbr>", html.escape(name))


def _figure(result: ScanResult, index: int, file: str, caption: str, thumb_size: int) -> str:
    """A thumbnail of example ``index`` captioned with its ``file`` and ``caption`` (HTML)."""
    uri = "data:image/png;base64," + base64.b64encode(
        thumbnail_png(result.data.images[index], thumb_size)).decode()
    return (f'<figure><img class="thumb" src="{uri}" alt="{html.escape(file)}">'
            f'<figcaption><span class="file">{_breakable(file)}</span><br>{caption}'
            f'</figcaption></figure>')


def _section(heading: str, count: str, figures: Sequence[str], kind: str) -> str:
    return (f'<section class="{kind}"><h2><span class="name">{heading}</span> '
            f'<span class="count">{count}</span></h2>\n<div class="grid">\n'
            + "\n".join(figures) + "\n</div></section>")


def _class_sections(result: ScanResult, thumb_size: int) -> list[str]:
    """One section per class with flags: its flagged examples."""
    counts = torch.bincount(result.data.labels.cpu(), minlength=result.data.num_classes)
    by_class: dict[int, list[Flag]] = {}
    for f in result.flags:
        by_class.setdefault(int(result.data.labels[f.index]), []).append(f)
    return [_section(html.escape(result.data.classes[c]),
                     f"{len(by_class[c])} flagged of {int(counts[c])}",
                     [_figure(result, f.index, f.file, f"cluster size {f.cluster_size}, "
                                                       f"round {f.round}", thumb_size)
                      for f in by_class[c]],
                     "class")
            for c in sorted(by_class)]


def _group_sections(result: ScanResult, thumb_size: int, show: int) -> list[str]:
    """One section per group or isolated example, ranked together: flagged ones first, then
    the highest score first; a group's members side by side (the first ``show`` of them)."""
    esc = html.escape
    ranked = sorted(result.groups, key=lambda g: (not g.flagged, -g.score, g.round, g.name))
    sections = []
    for g in ranked:
        verdict = "flagged" if g.flagged else "not flagged"
        kind = "isolated example" if g.isolated else "group"
        figures = [_figure(result, i, result.files[i], f"{kind} {esc(g.name)}", thumb_size)
                   for i in g.members[:show]]
        more = len(g.members) - show
        if more > 0:
            figures.append(f'<p class="more">and {more} more (suspicious.csv lists the '
                           f'flagged ones)</p>')
        size = ("" if g.isolated else
                f" {len(g.members)} examples, cohesion {g.cohesion:.2f},"
                f" {g.learned:.0%} learned,")
        sections.append(_section(
            f"{esc(g.label)} nearer {esc(g.nearest)}",
            f"{kind} {esc(g.name)}:{size} score {g.score:.1f}, {verdict} in round {g.round} "
            f"(before epoch {g.epoch})", figures, "isolated" if g.isolated else "group"))
    return sections


def write_html(result: ScanResult, path: str | os.PathLike[str], *, thumb_size: int = 96,
               group_members_shown: int = 48) -> None:
    """A self-contained page of the flagged images (atomically).

    EPIC's flags: one section per class with flags (heading: class name, flagged and total
    counts), one thumbnail per flagged example captioned with its file, cluster size and
    round. Groups: one section per group the detector found (heading: its class, the class
    its members lie nearer, size, cohesion, learned share, score, and whether it was
    flagged) and per isolated example it flagged (``groups-epic``), ranked together: flagged
    ones first, the highest score first, a group's members side by side. Then the skipped
    files and their reasons. Every name is HTML-escaped.
    """
    esc = html.escape
    sections = (_group_sections(result, thumb_size, group_members_shown) if result.groups
                else _class_sections(result, thumb_size))
    rows = "\n".join(f"<tr><td>{_breakable(s.file)}</td><td>{esc(s.reason)}</td></tr>"
                      for s in result.skipped)
    skipped = ('<table><tr><th>file</th><th>reason</th></tr>\n' + rows + '\n</table>'
               if result.skipped else "<p>No file was skipped.</p>")
    epochs = ", ".join(str(r.epoch) for r in result.rounds)
    grouped = isinstance(result.rounds[0], GroupRound) if result.rounds else False
    detector = "foreign-groups" if grouped else "EPIC"
    isolated = ("A flagged example is one that no other example of its class joined in "
                "gradient space: a suspected poison, or a mislabelled or odd clean example.")
    meaning = isolated
    if grouped:
        meaning = ("A flagged group is a set of examples unlike the rest of their class that "
                   "keep together: poisons that share a trigger or a source class, or a "
                   "clean sub-population worth a look.")
        if any(g.isolated for g in result.groups):
            meaning += f" {isolated} Both are ranked together, the highest score first."
        meaning += " Groups not flagged are shown after them."
    title = f"{detector} scan: {len(result.flags)} of {len(result.data)} examples flagged"
    body = f"""<h1>{title}</h1>
<p id="summary">{len(result.flags)} of {len(result.data)} examples flagged in
{len(result.rounds)} {detector} round{"" if len(result.rounds) == 1 else "s"} (before epochs
{epochs or "-"}); {len(result.skipped)} files skipped. {meaning}</p>
{chr(10).join(sections) or "<p>No example was flagged.</p>"}
<section id="skipped"><h2>Skipped files <span class="count">{len(result.skipped)}</span></h2>
{skipped}</section>"""
    write_page(path, title, body, style=_STYLE, script=_SCRIPT)
