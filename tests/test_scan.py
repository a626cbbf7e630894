from __future__ import annotations

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from epic import EPIC, EpicError
from epic.cli import main
from epic.data import ImageData
from epic.images import ImageFolder, Skipped, read_image_folder
from epic.scan import Flag, ScanResult, scan, train_and_scan, write_html, write_outputs
from epic.training import TrainConfig, train

from .conftest import seeded_convnet
from .imagefiles import (
    GROUP,
    PLANTED,
    planted_folder,
    planted_group_and_singles_folder,
    planted_group_folder,
)

HOSTILE_FILE = "<img src=x onerror=alert(1)>.png"
HOSTILE_CLASS = "<b onmouseover=alert(2)>cls"


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    return read_image_folder(planted_folder(tmp_path_factory.mktemp("planted")))


@pytest.fixture(scope="module")
def trained_scan(planted: ImageFolder) -> ScanResult:
    """Six epochs of training with EPIC-0.1 rounds before epochs 2 and 4 (seeded)."""
    defense = EPIC(0.1, warmup=2, every=2, until=6, num_examples=len(planted.data))
    return train_and_scan(seeded_convnet(planted.data), planted.data, defense,
                          TrainConfig(epochs=6, batch_size=16), files=planted.files,
                          skipped=(Skipped("red/broken.png", "an empty file"),))


def test_training_scan_flags_the_planted_mislabelled_images_first(trained_scan) -> None:  # type: ignore[no-untyped-def]
    """Of 93 images, the first round flags exactly the three planted ones, alone in their
    clusters; later rounds flag a few clean ones (EPIC's own false positives)."""
    first = [f for f in trained_scan.flags if f.round == 1]
    assert {f.file for f in first} == PLANTED
    assert all(f.cluster_size == 1 and f.epoch == 2 for f in first)
    assert {f.label for f in first} == {"red", "green", "blue"}
    assert len(trained_scan.flags) <= 9 and [r.epoch for r in trained_scan.rounds] == [2, 4]
    assert trained_scan.flagged.sum() == len(trained_scan.flags)
    assert all(trained_scan.files[f.index] == f.file for f in trained_scan.flags)


def test_scan_with_a_trained_model_flags_exactly_the_planted_images(planted) -> None:  # type: ignore[no-untyped-def]
    model = seeded_convnet(planted.data)
    train(model, planted.data, planted.data.subset(torch.arange(0)),
          TrainConfig(epochs=4, batch_size=16))
    result = scan(model, planted.data, files=planted.files)
    assert {f.file for f in result.flags} == PLANTED
    assert [(f.round, f.cluster_size) for f in result.flags] == [(1, 1)] * 3
    assert result.summary() == {"examples": 93, "flagged": 3, "skipped": 0, "rounds": [
        {"round": 1, "epoch": 0, "flagged": 3, "remaining": 90}]}


@pytest.fixture(scope="module")
def group_scan(tmp_path_factory: pytest.TempPathFactory) -> ScanResult:
    """A model trained 4 epochs on the planted group's folder, scanned for groups."""
    folder = read_image_folder(planted_group_folder(tmp_path_factory.mktemp("group")))
    model = seeded_convnet(folder.data)
    train(model, folder.data, folder.data.subset(torch.arange(0)),
          TrainConfig(epochs=4, batch_size=16))
    return scan(model, folder.data, groups=True, files=folder.files)


def test_groups_scan_flags_exactly_the_planted_group(group_scan, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert {f.file for f in group_scan.flags} == GROUP
    top = group_scan.groups[0]
    assert (top.name, top.label, top.nearest, top.flagged, len(top.members)) == (
        "1.1", "red", "green", True, 12)
    assert all(f.group == "1.1" and f.cluster_size == 12 for f in group_scan.flags)
    assert not any(g.flagged for g in group_scan.groups[1:])
    with open(write_outputs(group_scan, tmp_path)["suspicious.csv"], newline="") as f:
        assert {r["group"] for r in csv.DictReader(f)} == {"1.1"}


@pytest.fixture(scope="module")
def mixed_scan(tmp_path_factory: pytest.TempPathFactory) -> ScanResult:
    """A model trained 4 epochs on a folder with a planted group and planted singles,
    scanned for groups and isolated examples together."""
    folder = read_image_folder(planted_group_and_singles_folder(tmp_path_factory.mktemp("mix")))
    model = seeded_convnet(folder.data)
    train(model, folder.data, folder.data.subset(torch.arange(0)),
          TrainConfig(epochs=4, batch_size=16))
    return scan(model, folder.data, groups=True, isolated=True, files=folder.files)


def test_groups_and_isolated_examples_are_found_and_ranked_together(mixed_scan) -> None:  # type: ignore[no-untyped-def]
    """The planted singles (EPIC's kind of find) and the planted group (the detector's) come
    first, each scored on one scale; EPIC's clean false positive after them, scored low."""
    flagged = [g for g in mixed_scan.groups if g.flagged]
    assert [g.name for g in mixed_scan.groups] == [f"1.{k}" for k in
                                                   range(1, len(mixed_scan.groups) + 1)]
    assert mixed_scan.groups[:len(flagged)] == tuple(flagged)  # the flagged ones first
    scores = [g.score for g in flagged]
    assert scores == sorted(scores, reverse=True)  # then the highest score first
    top, rest = flagged[:4], flagged[4:]
    assert {mixed_scan.files[i] for g in top for i in g.members} >= GROUP | PLANTED
    assert sorted(len(g.members) for g in top)[:3] == [1, 1, 1] and sum(
        not g.isolated for g in top) == 1
    assert all(g.label != g.nearest for g in top)
    assert rest and all(g.isolated and g.score < min(scores[:4]) / 2 for g in rest)
    assert {f.file for f in mixed_scan.flags} == GROUP | PLANTED | {
        mixed_scan.files[g.members[0]] for g in rest}


def test_a_schedule_without_rounds_is_an_error(planted) -> None:  # type: ignore[no-untyped-def]
    # in the library's words: its parameters, which the command line spells as flags
    with pytest.raises(EpicError, match="no EPIC round runs in 3 epochs.*pass a smaller "
                       "warmup or a larger until") as caught:
        train_and_scan(seeded_convnet(planted.data), planted.data, EPIC(0.1, warmup=10),
                       TrainConfig(epochs=3))
    assert caught.value.worded(lambda o: f"<{o}>").endswith(
        "pass a smaller <warmup> or a larger <until>")
    assert "<every> 2" in caught.value.worded(lambda o: f"<{o}>")


def test_csv_rows_are_the_flags(trained_scan, tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = write_outputs(trained_scan, tmp_path / "out")
    with open(paths["suspicious.csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "label", "cluster_size", "round", "group"]
    assert rows[1:] == [[f.file, f.label, str(f.cluster_size), str(f.round), ""]
                        for f in trained_scan.flags]
    with open(paths["skipped.csv"], newline="") as f:
        assert list(csv.reader(f)) == [["file", "reason"], ["red/broken.png", "an empty file"]]
    assert not list((tmp_path / "out").glob(".*.tmp"))


def _hostile_result() -> ScanResult:
    """Four images of two classes with hostile names; three flagged."""
    g = torch.Generator().manual_seed(0)
    data = ImageData.from_arrays(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8,
                                               generator=g),
                                 torch.tensor([0, 0, 1, 1]), (HOSTILE_CLASS, "plain & simple"))
    files = (HOSTILE_FILE, "=cmd|' /C calc'!A0.png", "b/ok.png", "b/'quote\".png")
    flags = tuple(Flag(i, files[i], data.classes[int(data.labels[i])], 1, r, 2 * r)
                  for i, r in ((0, 1), (1, 1), (3, 2)))
    return ScanResult(data, files, flags, (), (Skipped("</td><script>x()</script>", "empty"),))


def test_csv_defuses_spreadsheet_formulas(tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = write_outputs(_hostile_result(), tmp_path)
    with open(paths["suspicious.csv"], newline="") as f:
        files = [row[0] for row in csv.reader(f)][1:]
    assert files == [HOSTILE_FILE, "'=cmd|' /C calc'!A0.png", "b/'quote\".png"]


def test_html_escapes_every_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_html(_hostile_result(), tmp_path / "scan.html")
    page = (tmp_path / "scan.html").read_text()
    for raw in (HOSTILE_FILE, HOSTILE_CLASS, "<script>x()", "plain & simple", "'quote\""):
        assert raw not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert "&lt;b onmouseover=alert(2)&gt;cls" in page
    assert 'alt="b/&#x27;quote&quot;.png"' in page
    assert page.count("<img ") == 3 and page.count("<script>") == 1


# ----------------------------------------------------------------------------- in a browser


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}


class _Dom(HTMLParser):
    """The parts of a dumped scan page the tests check."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.body: dict[str, str | None] = {}
        self.headings: list[str] = []
        self.failed: list[str] = []
        self.captions: list[str] = []
        self._in: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag in _VOID:
            return
        if tag == "body":
            self.body = a
        self._in.append("h2" if tag == "h2" else "failed" if a.get("class") == "failed"
                        else "file" if a.get("class") == "file" else tag)
        if self._in[-1] in ("h2", "failed", "file"):
            getattr(self, {"h2": "headings", "failed": "failed", "file": "captions"}[
                self._in[-1]]).append("")

    def handle_endtag(self, tag: str) -> None:
        self._in.pop()

    def handle_data(self, data: str) -> None:
        for kind, store in (("h2", self.headings), ("failed", self.failed),
                            ("file", self.captions)):
            if kind in self._in:
                store[-1] += data


def _dump_dom(page: Path, profile: Path) -> _Dom:
    """The page's DOM after headless Chromium ran its script (skips without Chromium)."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                   "google-chrome"))), None)
    if browser is None:
        pytest.skip("no chromium on PATH: scan.html is checked in a real browser only")
    for budget in (10_000, 30_000, 90_000):  # a loaded machine may dump before decoding ends
        run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={profile}", f"--virtual-time-budget={budget}",
                              "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "<body" in run.stdout, run.stderr[-3000:]
        dom = _Dom(run.stdout)
        if "data-checked" in dom.body:  # the page's script has marked every thumbnail
            return dom
    raise AssertionError(f"{page}: the page's script did not finish marking its thumbnails")


def test_scan_page_in_a_browser(trained_scan, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every flagged image is a thumbnail the browser decoded, under its class heading with
    the class's counts."""
    page = write_outputs(trained_scan, tmp_path)["scan.html"]
    dom = _dump_dom(page, tmp_path / "profile")
    assert len(dom.imgs) == len(trained_scan.flags) > 3
    assert all(img["class"] == "thumb" and img["data-state"] == "decoded" for img in dom.imgs)
    assert dom.body.get("data-checked") == str(len(trained_scan.flags)) and not dom.failed
    assert sorted(dom.captions) == sorted(f.file for f in trained_scan.flags)
    per_class = {c: sum(f.label == c for f in trained_scan.flags) for c in ("blue", "green",
                                                                            "red")}
    assert dom.headings == [f"{c} {n} flagged of 31" for c, n in per_class.items() if n] + [
        "Skipped files 1"]


def test_groups_page_in_a_browser(group_scan, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The flagged group first, its members side by side, every thumbnail decoded; the
    groups not flagged after it."""
    page = write_outputs(group_scan, tmp_path)["scan.html"]
    dom = _dump_dom(page, tmp_path / "profile")
    shown = sum(len(g.members) for g in group_scan.groups)
    assert len(dom.imgs) == shown and dom.body.get("data-checked") == str(shown)
    assert all(img["data-state"] == "decoded" for img in dom.imgs) and not dom.failed
    assert dom.headings[0].startswith("red nearer green group 1.1: 12 examples, cohesion 1.00, "
                                      "100% learned")
    assert "flagged in round 1" in dom.headings[0]
    assert all("not flagged" in h for h in dom.headings[1:-1])
    assert sorted(dom.captions[:12]) == sorted(GROUP)


def test_groups_and_isolated_examples_page_in_a_browser(mixed_scan, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """One ranked list: a section per group or isolated example, in the scan's order."""
    page = write_outputs(mixed_scan, tmp_path)["scan.html"]
    dom = _dump_dom(page, tmp_path / "profile")
    assert all(img["data-state"] == "decoded" for img in dom.imgs) and not dom.failed
    expected = [f"{g.label} nearer {g.nearest} "
                + (f"isolated example {g.name}: score {g.score:.1f}," if g.isolated else
                   f"group {g.name}: {len(g.members)} examples, cohesion {g.cohesion:.2f}, "
                   f"{g.learned:.0%} learned, score {g.score:.1f},")
                for g in mixed_scan.groups]
    assert len(dom.headings) == len(expected) + 1  # and the skipped files
    assert all(h.startswith(e) for h, e in zip(dom.headings, expected, strict=False))
    assert "ranked together" in page.read_text()


def test_hostile_names_stay_text_in_a_browser_and_broken_thumbnails_are_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    page = tmp_path / "scan.html"
    write_html(_hostile_result(), page)
    dom = _dump_dom(page, tmp_path / "profile")
    assert [img["alt"] for img in dom.imgs] == [HOSTILE_FILE, "=cmd|' /C calc'!A0.png",
                                                "b/'quote\".png"]
    assert [img["data-state"] for img in dom.imgs] == ["decoded"] * 3
    assert dom.captions == [img["alt"] for img in dom.imgs]
    assert dom.headings == [f"{HOSTILE_CLASS} 2 flagged of 2", "plain & simple 1 flagged of 2",
                            "Skipped files 1"]
    text = page.read_text()
    uri = text[text.index('src="data:') + 5:text.index('"', text.index('src="data:') + 5)]
    page.write_text(text.replace(uri, "data:image/png;base64,AAAA", 1))
    dom = _dump_dom(page, tmp_path / "profile")
    assert [img["data-state"] for img in dom.imgs] == ["failed", "decoded", "decoded"]
    assert dom.failed == [f"could not show {HOSTILE_FILE}"]
    assert dom.body.get("data-checked") == "3"


# ----------------------------------------------------------------------------- command line


def test_cli_scan_trains_then_rescans_with_the_model(tmp_path, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    data_dir = planted_folder(tmp_path / "data")
    (data_dir / "green" / "notes.png").write_text("not an image")
    out = tmp_path / "scan"
    assert main(["scan", "--data", str(data_dir), "--epochs", "6", "--warmup", "2", "--every",
                 "2", "--batch-size", "16", "--out", str(out), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (f"read 93 images of 3 classes (3 x 8 x 8) from {data_dir}; files "
                        f"skipped: 1")
    assert [line.split(" flagged")[0] for line in lines if "EPIC round" in line][:2] == [
        "epoch 2: EPIC round 1", "epoch 4: EPIC round 2"]
    assert "skipped green/notes.png: not a PNG" in caplog.text
    summary = json.loads(lines[-1])
    assert summary["examples"] == 93 and summary["skipped"] == 1
    assert [r["epoch"] for r in summary["rounds"]] == [2, 4]
    with open(summary["suspicious.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"] for r in rows if r["round"] == "1"} == PLANTED
    assert (out / "scan.html").exists() and (out / "train" / "model.pt").exists()

    assert main(["scan", "--data", str(data_dir), "--model", str(out / "train" / "model.pt"),
                 "--out", str(tmp_path / "again"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith(f"EPIC round on {out / 'train' / 'model.pt'}: flagged")
    assert json.loads(lines[-1])["rounds"][0]["epoch"] == 0


def test_cli_scans_an_npz_with_index_names(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    labels = np.arange(40) % 2
    images = np.random.default_rng(0).integers(0, 50, (40, 8, 8)) + 200 * labels[:, None, None]
    images[0] += 200  # a bright image labelled dark
    np.savez(tmp_path / "set.npz", images=images.astype(np.uint8), labels=labels)
    assert main(["scan", "--data", str(tmp_path / "set.npz"), "--epochs", "3", "--warmup", "1",
                 "--out", str(tmp_path / "out")]) == 0
    assert "read 40 images of 2 classes (1 x 8 x 8)" in capsys.readouterr().out
    with open(tmp_path / "out" / "suspicious.csv", newline="") as f:
        files = [r["file"] for r in csv.DictReader(f)]
    assert "train[0]" in files and all(f.startswith("train[") and f.endswith("]") for f in files)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "model.pt is not a model file that torch.load reads safely (not the zip archive"),
    (b"garbage", "model.pt is not a model file that torch.load reads safely"),
    ("list", "model.pt holds a list, not a model state dict"),
    ("vgg", "model.pt is not a convnet for 3 classes of 3-channel images"),
])
def test_cli_bad_model_file_is_a_one_line_error(tmp_path, capsys, content, message) -> None:  # type: ignore[no-untyped-def]
    data_dir = planted_folder(tmp_path / "data")
    model = tmp_path / "model.pt"
    if content == "list":
        torch.save([1, 2], model)
    elif content == "vgg":
        from epic.models import build_model

        torch.save(build_model("vgg16-small", num_classes=3, in_channels=3, mean=[0.5] * 3,
                               std=[0.2] * 3).state_dict(), model)
    else:
        model.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--data", str(data_dir), "--model", str(model), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("epic: error: ") and err.count("\n") == 1
    assert message in err
    if content == "vgg":
        assert "pass the --arch it was trained as" in err


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p, "does not exist"),
    (lambda p: (p.write_text("x"), p)[1], "is neither a folder nor an .npz file"),
    (lambda p: (p.mkdir(), (p / "one").mkdir(), p)[2], "has 1 class sub-folder"),
])
def test_cli_bad_data_is_a_one_line_error_naming_it(tmp_path, capsys, make, message) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path / "input")
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--data", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"epic: error: {path} {message}")
    assert err.count("\n") == 1


def test_scan_help_names_every_option() -> None:
    from epic.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices["scan"]  # type: ignore[index]
    options = {o for a in parser._actions for o in a.option_strings}
    assert {"--data", "--model", "--arch", "--fraction", "--epochs", "--out", "--json",
            "--image-size", "--max-file-bytes", "--max-pixels"} <= options
    assert all(a.help for a in parser._actions if a.option_strings)
    assert "--test-subset" not in options


def test_cli_scan_for_groups_trains_under_the_detector(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data_dir = planted_group_folder(tmp_path / "data")
    assert main(["scan", "--data", str(data_dir), "--detector", "groups", "--epochs", "6",
                 "--warmup", "2", "--every", "1", "--batch-size", "16",
                 "--out", str(tmp_path / "scan"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == ("training convnet for 6 epochs with foreign-groups, rounds before "
                        "epochs [2, 3, 4]")  # until the last milestone
    # the first round only scores
    assert any(line.startswith("epoch 2: foreign-groups round 1 flagged 0,") for line in lines)
    with open(json.loads(lines[-1])["suspicious.csv"], newline="") as f:
        assert {r["file"] for r in csv.DictReader(f)} == GROUP
    # the group (12 of its class's 42) was found and flagged in the second round, before the
    # model had learned most of it: a shared trigger makes a tight group
    rounds = json.loads((tmp_path / "scan" / "train" / "defense.json").read_text())
    learned, cohesion, flagged = next((g["learned"], g["cohesion"], g["dropped"])
                                      for g in rounds[1]["groups"] if g["size"] == len(GROUP))
    assert flagged and learned <= 0.5 and cohesion >= 0.9


def test_cli_scan_for_groups_and_isolated_examples_trains_under_both(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data_dir = planted_group_and_singles_folder(tmp_path / "data")
    assert main(["scan", "--data", str(data_dir), "--detector", "groups-epic", "--fraction",
                 "0.1", "--epochs", "6", "--warmup", "2", "--every", "1", "--batch-size", "16",
                 "--out", str(tmp_path / "scan"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == ("training convnet for 6 epochs with groups-epic-0.1, rounds before "
                        "epochs [2, 3, 4]")
    with open(json.loads(lines[-1])["suspicious.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"] for r in rows} >= GROUP | PLANTED
    # the planted singles go in the first round, as EPIC drops them, before any group
    assert {r["file"] for r in rows if r["round"] == "1"} >= PLANTED
