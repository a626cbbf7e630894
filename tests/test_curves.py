"""Detection curves: each detector's own round at every value of its option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from epic.attacks import PatchBackdoor
from epic.bench.curves import measure_curves, write_curves
from epic.data import ImageData
from epic.training import TrainConfig

from .conftest import seeded_convnet

SWEEPS = {"lowest-confidence": ("threshold", (0.25, 0.5, 0.9)),
          "epic": ("fraction", (0.1, 0.5)),
          "deep-knn": ("budget", (0.05, 0.1))}


def test_a_curve_is_the_detectors_own_choice_at_each_value(
        tiny_data: tuple[ImageData, ImageData], tmp_path: Path) -> None:
    train, test = tiny_data
    poisons = PatchBackdoor(budget=6).craft(None, train, 0, 1, seed=0)
    model = seeded_convnet(train)
    config = TrainConfig(epochs=3, batch_size=16, seed=0)
    result = measure_curves(model, train, test, poisons, config, at=[1, 3], sweeps=SWEEPS)
    assert sorted(result["curves"]) == [1, 3] and result["poisons"] == 6
    for rows in result["curves"].values():
        assert [(r["detector"], r["value"]) for r in rows] == [
            (name, v) for name, (_, values) in SWEEPS.items() for v in values]
        # the value each defense runs with by default is marked, and only that one
        # (Deep k-NN's, a budget of 0.01, is not among the values swept here)
        assert [(r["detector"], r["value"]) for r in rows if r["default"]] == [
            ("lowest-confidence", 0.5), ("epic", 0.1)]
        assert all(r["poisons"] == 6 and r["clean"] == 54 for r in rows)
    # after the last epoch the model is the trained one: the rule computed here agrees
    data = poisons.apply(train)
    model.eval()
    with torch.no_grad():
        own = torch.softmax(model(data.images.float() / 255), 1)
    own = own.gather(1, data.labels[:, None]).squeeze(1)
    poisoned = torch.zeros(len(data), dtype=torch.bool)
    poisoned[poisons.indices] = True
    rule = [r for r in result["curves"][3] if r["detector"] == "lowest-confidence"]
    assert [(r["poisons_flagged"], r["clean_flagged"]) for r in rule] == [
        (int((own[poisoned] < t).sum()), int((own[~poisoned] < t).sum()))
        for t in (0.25, 0.5, 0.9)]
    write_curves({"patch": result}, tmp_path)
    stored = json.loads((tmp_path / "curves.json").read_text())["patch"]
    assert stored["curves"]["3"] == result["curves"][3]
    assert (tmp_path / "curves-1.png").stat().st_size > 0 and (tmp_path / "curves-3.png").exists()
    with pytest.raises(ValueError, match="after 1 to 3"):
        measure_curves(model, train, test, poisons, config, at=[4], sweeps=SWEEPS)


def test_the_command_skips_the_sets_it_has_measured_with_the_same_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from epic.cli import main

    poisons, out = tmp_path / "patch", tmp_path / "curves"
    assert main(["craft", "--attack", "patch", "--subset", "100", "--budget", "4",
                 "--source-class", "1", "--adversarial-class", "3", "--out", str(poisons)]) == 0
    measure = ["bench", "curves", "--subset", "100", "--epochs", "2", "--poisons", str(poisons),
               "--out", str(out)]
    assert main([*measure, "--at", "2"]) == 0
    first = (out / "curves.json").read_text()
    assert sorted(json.loads(first)["patch"]["curves"]) == ["2"]
    assert (out / "curves-2.png").exists()
    capsys.readouterr()
    assert main([*measure, "--at", "2"]) == 0
    assert "measured already" in capsys.readouterr().out
    assert (out / "curves.json").read_text() == first
    assert main([*measure, "--at", "1", "2"]) == 0  # other options: measured again
    assert sorted(json.loads((out / "curves.json").read_text())["patch"]["curves"]) == ["1", "2"]
    # a set added to those read back is measured beside them, and the summary holds both
    other = tmp_path / "other"
    assert main(["craft", "--attack", "patch", "--subset", "100", "--budget", "6",
                 "--source-class", "1", "--adversarial-class", "3", "--out", str(other)]) == 0
    assert main([*measure[:-3], str(poisons), str(other), "--out", str(out), "--at", "1", "2"]
                ) == 0
    assert sorted(json.loads((out / "curves.json").read_text())) == ["other", "patch"]
    assert "| detector (its option) | patch | other |" in (out / "curves.md").read_text()
    for malformed in ('{"patch": [1, 2]}', '{"patch": {"curves": {}, "test_acc": 0.5}}',
                      '{"patch": {"curves": {"x": []}, "test_acc": 0.5, "attack_success": 0}}'):
        (out / "curves.json").write_text(malformed)
        with pytest.raises(SystemExit):
            main([*measure, "--at", "2"])
        assert "not a curves.json written by epic bench curves" in capsys.readouterr().err


def test_the_summary_gives_each_detectors_best_point_within_the_clean_limit(
        tmp_path: Path) -> None:
    from epic.bench.curves import curves_markdown

    def row(detector: str, value: float, found: int, clean: int) -> dict[str, object]:
        return {"detector": detector, "option": "o", "value": value, "default": False,
                "poisons_flagged": found, "poisons": 10, "clean_flagged": clean,
                "clean": 1000, "recall": found / 10, "clean_share": clean / 1000}

    rows = [row("a", 1, 3, 5), row("a", 2, 6, 20), row("a", 3, 9, 21),  # 21 > 2% of 1000
            row("b", 1, 10, 50), row("c", 1, 0, 0), row("c", 2, 0, 3)]
    results = {"set": {"attack_success": 0.5, "test_acc": 0.75, "curves": {4: rows}}}
    table = curves_markdown(results, clean_limit=0.02)
    assert "| undefended: attack success, accuracy | 50.0%, 75.0% |" in table
    # a: 60% at 2.0% (90% takes 2.1%); b: no value flags so few; c: the fewer clean of two 0%
    assert [line for line in table.splitlines() if line.startswith("| a")
            or line.startswith("| b") or line.startswith("| c")] == [
        "| a (o) | 60% @ 2.0% |", "| b (o) | – |", "| c (o) | 0% @ 0.0% |"]
    write_curves(results, tmp_path)
    assert (tmp_path / "curves.md").read_text() == curves_markdown(results)
