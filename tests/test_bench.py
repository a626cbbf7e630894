from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from epic.bench import (
    ResultStore,
    cluster_size_rounds,
    run_trials,
    summarize,
    to_markdown,
    trial_id,
    write_report,
)
from epic.bench.report import _time_scale, defense_label, defense_labels
from epic.cli import build_parser, main
from epic.cli.common import parse_command
from epic.data import load_digits
from epic.defenses import RandomDrop, RunFacts, build_defense, parse_spec
from epic.poisons import PoisonSet
from epic.training import TrainConfig

from .conftest import SETTING, requires_cifar, seeded_convnet


def test_defense_specs_name_a_defense_and_its_option() -> None:
    assert parse_spec("epic-0.3") == ("epic", {"fraction": 0.3})
    assert parse_spec("deep-knn") == ("deep-knn", {})
    assert parse_spec("ap-0.25") == ("adversarial-poisoning", {"share": 0.25})
    assert parse_spec("random-0.1") == ("random", {"drop_fraction": 0.1})
    with pytest.raises(ValueError, match="unknown defense"):
        parse_spec("magic")
    assert parse_spec("random-as-epic-0.1") == ("random", {"replay_of": "epic-0.1"})
    assert parse_spec("random-as-highest-loss") == ("random", {"replay_of": "highest-loss"})
    assert parse_spec("retrain-after-groups-epic-0.1") == (
        "retrain", {"replay_of": "groups-epic-0.1"})
    for unscheduled in ("none", "dp-sgd", "random", "random-0.1", "retrain-after-epic-0.1"):
        with pytest.raises(ValueError, match="on a schedule"):
            parse_spec(f"random-as-{unscheduled}")
        with pytest.raises(ValueError, match="on a schedule"):
            parse_spec(f"retrain-after-{unscheduled}")
    with pytest.raises(ValueError, match="unknown defense 'magic'"):
        parse_spec("random-as-magic")
    # the drop counts come from the replayed trial's record: without them, an error, not a
    # 1% random drop under the control's name
    with pytest.raises(ValueError, match="replays the drops of a epic-0.1 trial"):
        build_defense("random-as-epic-0.1", RunFacts(num_examples=10, epochs=4))
    with pytest.raises(ValueError, match="trains without what a epic-0.1 trial dropped"):
        build_defense("retrain-after-epic-0.1", RunFacts(num_examples=10, epochs=4))


def test_a_replaying_random_drop_drops_as_many_at_the_same_epochs() -> None:
    drop = RandomDrop(counts={3: 4, 1: 2, 6: 0}, num_examples=10,
                      generator=torch.Generator().manual_seed(0))
    assert [e for e in range(9) if drop.due(e)] == [1, 3, 6]
    data = torch.zeros(10, 1)
    sizes = []
    for epoch in (1, 3, 6):
        sizes.append(len(drop.update(torch.nn.Identity(), data, epoch).dropped))
    assert sizes == [2, 4, 0]
    assert drop.keep_mask is not None and int((~drop.keep_mask).sum()) == 6
    with pytest.raises(ValueError, match="counts must map"):
        RandomDrop(counts={2: -1})


def test_the_report_names_rows_by_what_sets_their_victims_apart() -> None:
    def label(scenario: str, **config: object) -> str:
        return defense_label({"defense": "epic-0.2", "scenario": scenario, "config": config})

    assert label("transfer", augment=False) == "epic-0.2"
    assert label("transfer", augment=True) == "epic-0.2 (crop+flip)"
    assert label("scratch", augment=True) == "epic-0.2"  # augmenting is the norm there
    assert label("transfer", augment=True, round_embeddings="train-pass") == (
        "epic-0.2 (train-pass, crop+flip)")
    assert label("transfer", augment=False, grad_clip=1.0) == "epic-0.2 (batch clip-noise)"


def test_rows_of_one_defense_on_different_schedules_are_never_pooled() -> None:
    def record(defense: str, warmup: int | None, every: int | None) -> dict[str, object]:
        return {"defense": defense, "scenario": "scratch", "config": {},
                "schedule": {"warmup": warmup, "every": every, "until": None}}

    records = [record("groups", 5, 2), record("groups", 2, 1), record("groups", 5, 2),
               record("epic-0.1", 5, 2), record("none", None, None)]
    assert defense_labels(records) == [
        "groups (from epoch 5, every 2)", "groups (from epoch 2, every 1)",
        "groups (from epoch 5, every 2)", "epic-0.1", "none"]


def test_the_time_axis_is_logarithmic_only_where_run_times_span_orders_of_magnitude() -> None:
    assert _time_scale([3.0, 9.5, 1721.0]) == "log"  # cached-feature and crop+flip victims
    assert _time_scale([3.0, 9.5, 38.9]) == "linear"
    assert _time_scale([0.0, 5.0]) == "linear"  # zero-time rows do not force a log axis
    assert _time_scale([]) == "linear"


def test_summarize_averages_per_group() -> None:
    base = {"attack": "bp", "scenario": "transfer", "seconds": 2.0, "poisons": 5,
            "poisons_dropped": 0, "examples_dropped": 0}
    recs = [base | {"defense": "none", "attack_success": 1.0, "test_acc": 0.9},
            base | {"defense": "none", "attack_success": 0.0, "test_acc": 0.8},
            base | {"defense": "epic-0.1", "attack_success": 0.0, "test_acc": 0.85}]
    recs[2] |= {"poisons_dropped": 4, "examples_dropped": 10, "examples": 100}
    rows = {r["defense"]: r for r in summarize(recs)}
    assert rows["none"]["n"] == 2 and rows["none"]["attack_success"] == 0.5
    # standard error of (1, 0): sample sd sqrt(0.5) over sqrt(2)
    assert rows["none"]["attack_success_se"] == pytest.approx(0.5)
    assert rows["none"]["test_acc"] == pytest.approx(0.85)
    assert rows["epic-0.1"]["poisons_dropped"] == pytest.approx(0.8)
    assert rows["epic-0.1"]["examples_dropped"] == pytest.approx(0.1)
    assert "| transfer | bp | none | 2 | 50.0% ± 50.0 |" in to_markdown(summarize(recs))


def test_run_trials_resumes_and_reports(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    idx = torch.tensor([0, 3, 6])
    PoisonSet(idx, train_data.images[idx], test_data.images[:1], target_class=0,
              adversarial_class=1, eps=8 / 255, metadata={"attack": "copy"}).save(tmp_path / "p")

    def make(seed: int):  # type: ignore[no-untyped-def]
        return seeded_convnet(train_data, seed)

    store = ResultStore(tmp_path / "bench" / "results.jsonl")
    kwargs = {"seeds": [0], "train_data": train_data, "test_data": test_data, "make_model": make,
              "config": TrainConfig(epochs=3, batch_size=16), "store": store,
              "setting": SETTING,
              "out": tmp_path / "bench", "warmup": 1, "every": 1}
    first = run_trials([tmp_path / "p"], ["none", "epic-0.3"], **kwargs)  # type: ignore[arg-type]
    assert [r["defense"] for r in first] == ["none", "epic-0.3"]
    assert first[0]["attack"] == "copy" and first[0]["examples_dropped"] == 0
    # schedule flags mean nothing to a defense without rounds: not part of its trial
    assert first[0]["schedule"] == {"warmup": None, "every": None, "until": None}
    assert run_trials([tmp_path / "p"], ["none"],  # type: ignore[arg-type]
                      **kwargs | {"warmup": None, "every": None}) == []
    # what the defaults resolved to is stored with the row, beside what was specified
    assert first[1]["config"]["lr"] is None and first[1]["schedule"]["until"] is None
    assert first[1]["resolved"]["lr"] == 0.1 and first[1]["resolved"]["milestones"] == [2]
    assert first[1]["resolved"]["defense"]["until"] == 2
    assert first[1]["resolved"]["defense"]["warmup"] == 1
    # the EPIC trial's counts are those of the rounds in its run folder
    rounds = json.loads((Path(first[1]["run_dir"]) / "defense.json").read_text())
    assert [r["epoch"] for r in rounds] == [1]  # until the last milestone (2)
    gone = {i for r in rounds for i in r["dropped"]}
    assert first[1]["examples_dropped"] == len(gone) > 0
    assert first[1]["poisons_dropped"] == len(gone & {0, 3, 6})
    assert run_trials([tmp_path / "p"], ["none", "epic-0.3"], **kwargs) == []  # type: ignore[arg-type]
    # rounds from the training pass are another trial, reported under their own name
    passes = parse_command(build_parser(), ["bench", "run", "--poisons", "p", "--defenses",
                                            "epic-0.3", "--round-embeddings", "train-pass"])
    config = TrainConfig(epochs=3, batch_size=16, round_embeddings=passes.round_embeddings)
    other = run_trials([tmp_path / "p"], ["epic-0.3"], **kwargs | {"config": config})  # type: ignore[arg-type]
    assert len(other) == 1 and other[0]["config"]["round_embeddings"] == "train-pass"
    assert {r["defense"] for r in summarize(store.load())} == {
        "none", "epic-0.3", "epic-0.3 (train-pass)"}
    page = write_report(store.load(), tmp_path / "report")
    assert "<table>" in page.read_text() and "± " in page.read_text()  # with standard errors
    # the scan page's policy: data: images and its own style, nothing else, no script
    assert "default-src 'none'; img-src data:; style-src 'sha256-" in page.read_text()
    assert "<script" not in page.read_text()
    # the cluster-size figure's data: every kept example at the round, poisons apart
    sizes = cluster_size_rounds(store.load())
    assert set(sizes) == {("copy", "epic-0.3"), ("copy", "epic-0.3 (train-pass)")}
    at_round = sizes[("copy", "epic-0.3")][1]
    assert sum(at_round["clean"].values()) == 57 and sum(at_round["poisons"].values()) == 3
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {
        "summary.md", "summary.json", "success_vs_time.png", "cluster_sizes.png",
        "drop_curve.png", "report.html"}
    rows = {r["defense"]: r for r in json.loads(
        (tmp_path / "report" / "summary.json").read_text())}
    assert sorted(rows) == ["epic-0.3", "epic-0.3 (train-pass)", "none"]
    assert rows["none"]["n"] == rows["epic-0.3"]["n"] == 1
    assert rows["epic-0.3"]["examples_dropped"] == pytest.approx(len(gone) / 60)  # a share
    assert rows["none"]["test_acc"] == first[0]["test_acc"]
    # zero epochs is another trial, with nothing measured: stored, skipped on a rerun, reported
    # the random control replays the EPIC trial's rounds: as many drops, at the same epochs
    with pytest.raises(ValueError, match=r"run it first \(defenses epic-0.2\)"):
        run_trials([tmp_path / "p"], ["random-as-epic-0.2"], **kwargs)  # type: ignore[arg-type]
    control = run_trials([tmp_path / "p"], ["random-as-epic-0.3"], **kwargs)  # type: ignore[arg-type]
    replayed = json.loads((Path(control[0]["run_dir"]) / "defense.json").read_text())
    assert [(r["epoch"], len(r["dropped"])) for r in replayed] == [
        (r["epoch"], len(r["dropped"])) for r in rounds]
    assert control[0]["examples_dropped"] == first[1]["examples_dropped"]
    # filter, then retrain: a fresh model without all of it, from the first epoch
    retrained = run_trials([tmp_path / "p"], ["retrain-after-epic-0.3"], **kwargs)  # type: ignore[arg-type]
    again = json.loads((Path(retrained[0]["run_dir"]) / "defense.json").read_text())
    assert [(r["epoch"], set(r["dropped"])) for r in again] == [(0, gone)]
    assert [retrained[0][k] for k in ("examples_dropped", "poisons_dropped")] == [
        first[1][k] for k in ("examples_dropped", "poisons_dropped")]
    zero = run_trials([tmp_path / "p"], ["none", "epic-0.3"],  # type: ignore[arg-type]
                      **kwargs | {"config": TrainConfig(epochs=0, batch_size=16)})
    assert [r["test_acc"] for r in zero] == [None, None] and len(store.load()) == 7
    assert len({trial_id(r) for r in store.load()}) == 7
    assert len({r["run_dir"] for r in store.load()}) == 7
    assert run_trials([tmp_path / "p"], ["none"],  # type: ignore[arg-type]
                      **kwargs | {"config": TrainConfig(epochs=0, batch_size=16)}) == []
    assert "| scratch | copy | none | 2 | 0.0% ± 0.0 |" in to_markdown(summarize(store.load()))
    write_report(store.load(), tmp_path / "report")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_sgd_rows_carry_the_privacy_spent(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("opacus")
    train_data, test_data = tiny_data
    idx = torch.tensor([0, 3, 6])
    PoisonSet(idx, train_data.images[idx], test_data.images[:1], target_class=0,
              adversarial_class=1, eps=8 / 255, metadata={"attack": "copy"}).save(tmp_path / "p")
    store = ResultStore(tmp_path / "bench" / "results.jsonl")
    model = seeded_convnet(train_data)
    rows = run_trials([tmp_path / "p"], ["dp-sgd", "clip-noise"], seeds=[0],
                      train_data=train_data, test_data=test_data,
                      make_model=lambda seed: model,
                      config=TrainConfig(epochs=2, batch_size=16, scenario="transfer",
                                         augment=False),
                      setting=SETTING, store=store, out=tmp_path / "bench")
    assert rows[0]["dp_epsilon"] > 0 and rows[0]["dp_delta"] == 1e-5
    assert "dp_epsilon" not in rows[1]
    # a row stored when "dp-sgd" clipped and noised the batch gradient is not DP-SGD's
    before = rows[1] | {"defense": "dp-sgd", "config": rows[1]["config"] | {
        "grad_clip": 1.0, "grad_noise": 0.01}}
    summary = {r["defense"]: r for r in summarize([*rows, before])}
    assert summary["dp-sgd"]["n"] == 1 and summary["dp-sgd (batch clip-noise)"]["n"] == 1
    table = to_markdown(list(summary.values()))
    assert table.splitlines()[0].endswith("| epsilon (delta) |")
    epsilon = f"{rows[0]['dp_epsilon']:.3g} (1e-05) |"
    marked = {line.split(" | ")[2] for line in table.splitlines()[2:] if line.endswith(epsilon)}
    assert marked == {"dp-sgd"}


def test_bench_cli_resumes_reruns_and_tells_epochs_apart(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = load_digits()
    idx = torch.tensor([0, 1, 2])
    PoisonSet(idx, train_data.images[idx], test_data.images[:1], target_class=0,
              adversarial_class=1, eps=8 / 255, metadata={"attack": "copy"}).save(tmp_path / "p")
    out, store = tmp_path / "bench", ResultStore(tmp_path / "bench" / "results.jsonl")
    run = ["bench", "run", "--subset", "300", "--test-subset", "100", "--poisons",
           str(tmp_path / "p"), "--defenses", "none", "--epochs", "2", "--out", str(out)]
    assert main(run) == 0 and len(store.load()) == 1
    assert main(run) == 0 and len(store.load()) == 1  # done: not run again
    assert main(run[:-3] + ["3", "--out", str(out)]) == 0 and len(store.load()) == 2
    capsys.readouterr()
    assert main(["bench", "rerun", str(store.path), "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["reproduced"]
    with pytest.raises(SystemExit):  # rerun into a folder that holds the trial: told, no crash
        main(["bench", "rerun", str(store.path), "0", "--out", str(out)])
    assert "already holds this trial" in capsys.readouterr().err


@requires_cifar
def test_a_committed_transfer_row_reruns_with_its_head_drawn_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows stored before the new last layer came from the run's seed drew it from torch's
    global RNG after the model's seeded construction: `bench rerun` draws it so again."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    store = "benchmarks/results/cpu-transfer/bench/results.jsonl"
    row = 43  # setup-003/epic-0.2/transfer/0: a victim of a few seconds
    assert ResultStore(store).load()[row]["config"]["head_rng"] == "global"
    assert main(["bench", "rerun", store, str(row), "--out", str(tmp_path), "--data-dir",
                 os.environ["EPIC_DATA_DIR"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["reproduced"]


def test_victim_features_reuse_the_clean_features_and_replace_the_poisons(
        tiny_data, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from epic.bench import runner
    from epic.gradients import feature_embeddings

    train_data, test_data = tiny_data
    model = seeded_convnet(train_data)
    idx = torch.tensor([3, 7, 11])
    shifted = (train_data.images[idx].short() + 40).clamp(0, 255).to(torch.uint8)
    poisons = PoisonSet(idx, shifted, test_data.images[:1], target_class=0,
                        adversarial_class=1, eps=40 / 255)
    expected = feature_embeddings(model, poisons.apply(train_data))[0]
    first = runner.victim_features(model, train_data, poisons, tmp_path / "cache")
    torch.testing.assert_close(first, expected)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    passes: list[int] = []

    def counted(m, data, **kw):  # type: ignore[no-untyped-def]
        passes.append(len(data))
        return feature_embeddings(m, data, **kw)

    monkeypatch.setattr(runner, "feature_embeddings", counted)
    again = runner.victim_features(model, train_data, poisons, tmp_path / "cache")
    assert passes == [3] and torch.equal(again, first)  # only the poisons, the rest cached
    other = seeded_convnet(train_data, seed=1)  # another body: its own clean features
    runner.victim_features(other, train_data, poisons, tmp_path / "cache")
    assert passes == [3, len(train_data), 3]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_rows_of_the_retired_batch_clip_noise_rerun_as_clip_noise() -> None:
    from epic.bench.runner import rerun_defense

    row = {"defense": "dp-sgd", "config": {"grad_clip": 1.0, "grad_noise": 0.01}}
    assert rerun_defense(row) == "clip-noise"  # what the row ran, with the same noise stream
    assert rerun_defense({"defense": "dp-sgd", "config": {"grad_clip": None,
                                                          "grad_noise": 0.0}}) == "dp-sgd"
    assert rerun_defense({"defense": "epic-0.1", "config": {}}) == "epic-0.1"
    with pytest.raises(ValueError, match="defense clip-noise and its dp_clip"):
        rerun_defense({"defense": "dp-sgd", "config": {"grad_clip": 2.0, "grad_noise": 0.5}})


def test_a_rerun_on_another_device_is_judged_by_its_outcome() -> None:
    """A row stored from a GPU and rerun on the CPU takes other arithmetic: the verdict names
    both devices and whether the attack's outcome held, instead of a bare "differs"."""
    from epic.bench.runner import compare_rerun

    stored = {"key": "k", "attack_success": 1.0, "test_acc": 0.893, "poisons_dropped": 65,
              "examples_dropped": 3796, "device": "cuda:0 (NVIDIA H200)"}
    same_device = compare_rerun(stored, stored)
    assert same_device["reproduced"] and same_device["verdict"] == "reproduced"
    rerun = stored | {"test_acc": 0.889, "poisons_dropped": 61, "device": "cpu"}
    result = compare_rerun(stored, rerun)
    assert not result["reproduced"] and result["same_outcome"]
    assert result["verdict"] == ("DIFFERS: test_acc, poisons_dropped (stored on cuda:0 (NVIDIA "
                                 "H200), rerun on cpu: the arithmetic differs across devices; "
                                 "the attack's outcome held)")
    flipped = compare_rerun(stored, rerun | {"attack_success": 0.0})
    assert not flipped["same_outcome"] and flipped["verdict"].endswith("did NOT hold)")
    old_row = {k: v for k, v in stored.items() if k != "device"}  # rows before the field: cpu
    assert compare_rerun(old_row, old_row | {"device": "cpu"})["reproduced"]


def test_errors_of_the_benchmark_speak_of_parameters_the_cli_spells_as_flags() -> None:
    from epic.bench.runner import replayed_rounds, rerun_defense
    from epic.cli import _as_flag
    from epic.errors import EpicError

    record = {"key": "setup-000/random-as-epic-0.1/scratch/0", "defense": "random-as-epic-0.1",
              "poisons_dir": "nowhere", "poisons_sha256": "0", "config": {}, "seed": 0}
    with pytest.raises(EpicError, match=r"run it first \(defenses epic-0.1\)") as e:
        replayed_rounds({}, record, "epic-0.1")
    assert "(--defenses epic-0.1)" in e.value.worded(_as_flag)
    with pytest.raises(EpicError) as e:
        rerun_defense({"defense": "dp-sgd", "config": {"grad_clip": 2.0, "grad_noise": 0.5}})
    assert "--" not in str(e.value)
    assert "with --defense clip-noise and its --dp-clip and --dp-noise" in e.value.worded(_as_flag)


def test_detection_pools_each_detectors_drops_per_poison_set() -> None:
    """Recall, clean examples flagged and precision per (attack, poison count, defense),
    pooled over the row's trials; defenses that drop nothing by design are not detectors."""
    from epic.bench.report import detection, detection_markdown

    def rec(defense: str, poisons: int, hit: int, dropped: int) -> dict[str, Any]:
        return {"attack": "badnets", "defense": defense, "poisons": poisons,
                "examples": 1000, "poisons_dropped": hit, "examples_dropped": dropped,
                "scenario": "scratch", "config": {}}

    rows = detection([rec("none", 10, 0, 0), rec("dp-sgd", 10, 0, 0),
                      rec("epic-0.1", 10, 2, 100), rec("epic-0.1", 10, 4, 50),
                      rec("epic-0.1", 30, 30, 30), rec("deep-knn", 10, 0, 0)])
    assert [(r["defense"], r["poisons"], r["n"]) for r in rows] == [
        ("deep-knn", 10, 1), ("epic-0.1", 10, 2), ("epic-0.1", 30, 1)]
    knn, pooled, all_of_them = rows
    assert knn["recall"] == 0 and knn["precision"] is None
    assert pooled["recall"] == 6 / 20 and pooled["clean_flagged"] == 144 / 1980
    assert pooled["precision"] == 6 / 150 and all_of_them["clean_flagged"] == 0
    table = detection_markdown(rows)
    assert "| badnets | 10 | epic-0.1 | 2 | 30.0% | 7.27% | 4.0% |" in table
    assert "| badnets | 10 | deep-knn | 1 | 0.0% | 0.00% | – |" in table


def test_paired_compares_defenses_on_the_same_poison_set_and_seed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pairs are the same scenario, attack, poison set and seed; a side run twice, or missing,
    makes no pair; the sign test counts only the pairs that differ."""
    from epic.bench.report import paired, paired_markdown, sign_test

    def rec(defense: str, poisons: str, seed: int, success: float) -> dict[str, Any]:
        return {"attack": "sleeper_agent", "scenario": "scratch", "defense": defense,
                "poisons_dir": poisons, "seed": seed, "attack_success": success,
                "test_acc": 0.6, "seconds": 1.0, "config": {}, "schedule": {}}

    records = [rec("epic-0.1", "a", 0, 0.10), rec("groups-epic-0.1", "a", 0, 0.15),
               rec("epic-0.1", "a", 1, 0.20), rec("groups-epic-0.1", "a", 1, 0.20),
               rec("epic-0.1", "b", 0, 0.30), rec("groups-epic-0.1", "b", 0, 0.40),
               rec("groups-epic-0.1", "b", 1, 0.90),  # no EPIC trial of b with seed 1
               rec("epic-0.1", "c", 0, 0.50), rec("epic-0.1", "c", 0, 0.70),
               rec("groups-epic-0.1", "c", 0, 0.00)]  # EPIC ran twice on c: which is its pair?
    (row,) = paired(records, "epic-0.1")
    assert (row["defense"], row["against"], row["pairs"]) == ("groups-epic-0.1", "epic-0.1", 3)
    assert row["difference"] == pytest.approx(0.05)  # (0.05 + 0 + 0.10) / 3
    assert (row["higher"], row["equal"], row["lower"]) == (2, 1, 0)
    assert row["p"] == sign_test(2, 0) == 0.5
    assert [r["defense"] for r in paired(records, "groups-epic-0.1")] == ["epic-0.1"]
    assert paired(records, "none") == []
    assert "| groups-epic-0.1 | epic-0.1 | 3 | +5.0 ± 2.9 points | 2 / 1 / 0 | 0.5 |" in (
        paired_markdown([row]))
    assert sign_test(0, 0) == 1.0 and sign_test(10, 0) == pytest.approx(2 / 1024)

    store = tmp_path / "bench" / "results.jsonl"
    store.parent.mkdir()
    store.write_text("".join(json.dumps(r | {"key": str(i), "eps": 0.1, "target_class": 0,
                                             "adversarial_class": 1, "wall_seconds": 1.0,
                                             "run_dir": f"t/{i}", "device": "cpu",
                                             "setup": None, "run": {}, "argv": [],
                                             "epochs": 1, "examples": 10, "poisons": 1,
                                             "poisons_dropped": 0, "examples_dropped": 0})
                                 + "\n" for i, r in enumerate(records)))
    report = ["bench", "report", str(store), "--out", str(tmp_path / "report")]
    assert main([*report, "--against", "epic-0.1"]) == 0
    assert "| groups-epic-0.1 | epic-0.1 | 3 | +5.0 ± 2.9 points |" in capsys.readouterr().out
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<td>+5.0 ± 2.9 points</td>" in page
    assert json.loads((tmp_path / "report" / "paired.json").read_text())[0]["pairs"] == 3
    with pytest.raises(SystemExit):
        main([*report, "--against", "epic-0.2"])
    assert (f"--against epic-0.2: no such defense in {store}; it has epic-0.1, groups-epic-0.1"
            in capsys.readouterr().err)
