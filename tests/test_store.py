"""The benchmark store: trial identity, validation on read, torn tails, two runs on one store."""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from epic.bench import ResultStore, plan_trials, run_trials, summarize, to_markdown, trial_id
from epic.bench.presets import PRESETS, preset_steps
from epic.cli import build_parser, main
from epic.cli.bench import trial_setting
from epic.cli.common import train_config
from epic.data import ImageData
from epic.errors import EpicError
from epic.poisons import PoisonSet
from epic.training import TrainConfig

from .conftest import SETTING, seeded_convnet

REPO = Path(__file__).resolve().parents[1]

# row 0 of benchmarks/results/cpu-scratch-sa/bench/results.jsonl as written before trials had
# an identity (no poisons_sha256), its command line cut to one poison set and data under data/
OLD_ARGV = ["bench", "run", "--dataset", "cifar10", "--data-dir", "data", "--model", "convnet",
            "--test-subset", "1000", "--setups",
            "data/poisoning-benchmark/cifar10_from_scratch.pickle", "--first", "3",
            "--victim-per-class", "1000", "--exact-test", "1000", "--epochs", "20",
            "--poisons", "poisons/sa/setup-000", "--defenses", "none", "--out", "bench"]
SETUP = {"id": 0, "target_index": 7762, "target_class": 7, "base_class": 3, "bases": 500,
         "repeated_bases": 0, "file": "cifar10_from_scratch.pickle (sha256 cd763e45a9dc)",
         "scenario": "scratch", "victim_per_class": 1000, "exact_test": 1000,
         "target_stand_in": True}
OLD = {"key": "setup-000/none/scratch/0", "poisons_dir": "poisons/sa/setup-000",
       "attack": "sleeper_agent", "scenario": "scratch", "defense": "none", "seed": 0,
       "eps": 0.06274509803921569, "target_class": 7, "adversarial_class": 3,
       "wall_seconds": 846.335, "run_dir": "bench/trials/setup-000_none_scratch_0",
       "device": "cpu", "setup": SETUP, "schedule": {"warmup": None, "every": None, "until": None},
       "config": {"epochs": 20, "scenario": "scratch", "lr": None, "momentum": 0.9,
                  "nesterov": True, "weight_decay": 0.0005, "batch_size": 128,
                  "milestones": None, "gamma": 0.1, "augment": True, "seed": 0,
                  "grad_clip": None, "grad_noise": 0.0},
       "run": {"torch": "2.13.0+cpu", "numpy": "2.4.6", "python": "3.11.7",
               "git_revision": "daa1beab74187b2697f1d05f9f23d790231e36bf"},
       "argv": OLD_ARGV, "test_acc": 0.622, "epochs": 20, "seconds": 842.47,
       "examples_dropped": 0, "examples": 10000, "attack_success": 0.13725490196078433,
       "poisons": 100, "poisons_dropped": 0, "patch_free_success": 0.058823529411764705}


def _poison_set(folder: Path, *, attack: str = "sleeper_agent", seed: int = 0) -> Path:
    """A seeded three-poison set with OLD's facts, saved to ``folder``."""
    g = torch.Generator().manual_seed(seed)
    PoisonSet(torch.tensor([0, 3, 6]), torch.randint(0, 256, (3, 3, 8, 8), generator=g,
                                                     dtype=torch.uint8),
              torch.zeros(1, 3, 8, 8, dtype=torch.uint8), target_class=7, adversarial_class=3,
              eps=16 / 255, metadata={"attack": attack, "setup": SETUP}).save(folder)
    return folder


def _plan(argv: list[str]) -> list[Any]:
    """The trials ``epic bench run`` with ``argv`` plans, without running anything."""
    args = build_parser().parse_args(argv)
    return list(plan_trials(args.poisons, args.defenses, seeds=args.seeds,
                            config=train_config(args), setting=trial_setting(args),
                            warmup=args.warmup, every=args.every, until=args.until,
                            context={"argv": argv}))


def _ids(argv: list[str]) -> list[str]:
    """The identities ``epic bench run`` with ``argv`` plans."""
    return [t.id for t in _plan(argv)]


def _with(argv: list[str], option: str, *values: str) -> list[str]:
    """``argv`` with ``option``'s values replaced (or the option added)."""
    if option not in argv:
        return [*argv, option, *values]
    i = argv.index(option) + 1
    while i < len(argv) and not argv[i].startswith("--"):
        i += 1
    return [*argv[:argv.index(option) + 1], *values, *argv[i:]]


def test_an_old_record_keeps_its_identity(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _poison_set(Path("poisons/sa/setup-000"))
    _poison_set(Path("poisons/sa/setup-001"))
    store = ResultStore("bench/results.jsonl")
    store.append(OLD)
    assert trial_id(store.load()[0]) == trial_id(OLD)
    # the same trial from a rerun that picks more setups, writes elsewhere, runs on a device
    again = _with(_with(_with(OLD_ARGV, "--first", "8"), "--poisons", "poisons/sa/setup-000",
                        "poisons/sa/setup-001"), "--out", "elsewhere") + ["--device", "cpu"]
    assert _ids(again)[0] == trial_id(OLD) != _ids(again)[1]
    # a re-craft into the folder that changes what the old row carries (the attack) is new
    _poison_set(Path("poisons/sa/setup-000"), attack="another")
    assert _ids(again)[0] != trial_id(OLD)


def test_a_store_reads_every_record_in_the_current_schema(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """A version-1 record (OLD: no schema field, its configuration as it was then) is read with
    today's configuration fields, the retired settings that were off left out; a record from a
    newer epic is skipped, by line number, rather than misread."""
    from epic.bench.schema import VERSION

    store = ResultStore(tmp_path / "results.jsonl")
    store.append(OLD)
    with open(store.path, "a") as f:  # append() refuses it: written by hand here
        f.write(json.dumps(OLD | {"schema": VERSION + 1}) + "\n")
    with caplog.at_level(logging.WARNING):
        records = store.load()
    assert len(records) == 1 and store.skipped == 1
    assert "line 2 skipped: written by a newer epic" in caplog.text
    config = records[0]["config"]
    assert records[0]["schema"] == VERSION and "grad_clip" not in config
    # OLD's settings, defaults else, its head drawn from torch's global RNG, every last batch
    # trained on
    assert config == dataclasses.asdict(TrainConfig(epochs=20, head_rng="global", min_batch=1))
    assert records[0]["setting"] == {
        "dataset": "cifar10", "subset": None, "test_subset": 1000, "model": "convnet",
        "pretrained": None, "setups": OLD_ARGV[OLD_ARGV.index("--setups") + 1],
        "victim_per_class": 1000, "exact_test": 1000}
    assert "schema" not in OLD and "channels_last" not in OLD["config"]  # read, not changed


def test_what_defines_a_trial_changes_its_identity(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for folder in ("x/set", "y/set"):
        _poison_set(Path(folder))  # same files, same name, two places
    argv = _with(OLD_ARGV, "--poisons", "x/set")
    first = _ids(argv)
    assert _ids(list(argv)) == first  # the same arguments plan the same trial
    assert _ids(_with(argv, "--poisons", "./x/../x/set")) == first  # and so does the same folder
    others = [_with(argv, "--poisons", "y/set"), _with(argv, "--epochs", "30"),
              _with(argv, "--model", "convnet-512"), _with(argv, "--test-subset", "500"),
              _with(argv, "--seeds", "1"), _with(argv, "--defenses", "epic-0.1"),
              _with(_with(argv, "--defenses", "epic-0.1"), "--warmup", "5"),
              _with(argv, "--lr", "0.01")]
    ids = [_ids(a)[0] for a in others]
    assert first[0] not in ids and len(set(ids)) == len(ids)
    # a schedule means nothing to a defense without rounds: the undefended trial is the same
    assert _ids(_with(argv, "--warmup", "5")) == first
    # a stored record keeps the poisons' hash: new images in the folder make a new trial
    plan = functools.partial(plan_trials, ["x/set"], ["none"], seeds=[0], config=TrainConfig(),
                             setting=SETTING)
    trial = next(plan())
    _poison_set(Path("x/set"), seed=1)
    assert trial_id(trial.record) == trial.id != next(plan()).id


def test_a_trial_is_what_was_resolved_not_how_it_was_spelled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The setting is part of a trial's identity from the resolved options, for a caller of the
    library as for the command line; a default given explicitly is the same trial."""
    monkeypatch.chdir(tmp_path)
    _poison_set(Path("x/set"))
    argv = _with(OLD_ARGV, "--poisons", "x/set")
    dropped = [a for i, a in enumerate(argv)
               if a != "--model" and (i == 0 or argv[i - 1] != "--model")]
    assert "convnet" not in dropped and _ids(dropped) == _ids(argv)  # convnet is the default
    assert _ids(_with(argv, "--exact-test", "1000")) == _ids([*argv, "--exact-test=1000"])
    assert _ids(_with(argv, "--setups", "./data/poisoning-benchmark/../poisoning-benchmark/"
                                          "cifar10_from_scratch.pickle")) == _ids(argv)

    def planned(setting: dict[str, Any]) -> str:
        return next(plan_trials(["x/set"], ["none"], seeds=[0], config=TrainConfig(),
                                setting=setting)).id

    assert planned(SETTING) != planned(SETTING | {"model": "resnet18"})
    assert planned(SETTING) != planned(SETTING | {"dataset": "cifar10"})
    with pytest.raises(EpicError, match="must name its model"):
        planned({"dataset": "cifar10"})


def test_a_checkout_that_moves_keeps_its_trials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record's setting names its files relative to where the command ran, as its poison
    folder: a copy of the folder elsewhere (a clean checkout) plans the trials it stores."""
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    _poison_set(Path("x/set"))
    Path("model.pt").write_bytes(b"weights")
    argv = [*_with(OLD_ARGV, "--poisons", "x/set"), "--pretrained", "model.pt"]
    [trial] = _plan(argv)
    assert _ids(_with(argv, "--pretrained", str(Path("model.pt").resolve()))) == _ids(argv)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    assert trial.record["setting"]["pretrained"] == "model.pt"
    assert [trial_id(trial.record)] == _ids(argv)


STORED = sorted(p.parents[1].name
                for p in (REPO / "benchmarks/results").glob("*/bench/results.jsonl"))


def test_every_committed_store_belongs_to_a_preset() -> None:
    """A preset meant for a GPU (paper scale) may have no store here yet; a store must have one."""
    assert STORED and set(STORED) <= set(PRESETS)


@pytest.mark.parametrize("name", STORED)
def test_committed_stores_are_done_for_a_rerun_of_their_preset(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row of a committed store is a trial its preset plans, and none is there twice;
    but for the rows that "dp-sgd" ran when it clipped and noised the batch gradient (their
    configuration says so): kept as the record of what ran, a rerun runs DP-SGD instead."""
    monkeypatch.chdir(REPO)
    out = Path("benchmarks/results") / name
    records = [r for store in sorted(out.glob("*/results.jsonl"))  # bench/, any study's own
               for r in ResultStore(store).load()]
    batch_level = [r for r in records if r["config"].get("grad_clip") is not None]
    assert {r["defense"] for r in batch_level} <= {"dp-sgd"}
    records = [r for r in records if r not in batch_level]
    planned: set[str] = set()
    for step in preset_steps(name, data_dir="../shared/data", out=out):
        argv: list[str] = []
        for arg in step.argv:  # expand the poison-set glob as run_preset does
            argv += sorted(glob.glob(arg)) if "*" in arg else [arg]
        # poison sets named one by one that are not crafted yet have no trials yet
        argv = [a for a in argv if not a.startswith(f"{out}/poisons/") or Path(a).exists()]
        if argv[:2] == ["bench", "run"] and "--poisons" in argv \
                and not argv[argv.index("--poisons") + 1].startswith("--"):  # sets crafted
            planned.update(_ids(argv))
    digests: dict[str, str | None] = {}
    stored = [trial_id(r, digests) for r in records]
    assert records and set(stored) <= planned and len(set(stored)) == len(stored)


def test_a_torn_last_line_is_cut_before_the_next_append(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ResultStore(tmp_path / "r.jsonl")
    store.append(OLD)
    with open(store.path, "ab") as f:
        f.write(b'{"key": "b", "x"')  # a writer killed mid-line
    size = store.path.stat().st_size
    with caplog.at_level(logging.WARNING, logger="epic.bench.store"):
        assert len(store.load()) == 1 and store.skipped == 1
        assert "line 2 skipped: cut short" in caplog.text
        store.append(OLD | {"seed": 1})
    offset = len(json.dumps(OLD)) + 1
    assert f"{store.path}: cut off its torn last line ({size - offset} bytes from byte " \
           f"{offset}" in caplog.text
    assert [r["seed"] for r in store.load()] == [0, 1] and store.skipped == 0
    # a complete last line that only lacks its newline is kept
    store.path.write_bytes(store.path.read_bytes().rstrip(b"\n"))
    store.append(OLD | {"seed": 2})
    assert [r["seed"] for r in store.load()] == [0, 1, 2]
    with pytest.raises(ValueError, match="no 'key'"):
        store.append({"x": 2})


def test_lines_that_are_not_trial_records_are_skipped_by_line_number(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ResultStore(tmp_path / "r.jsonl")
    zero_epochs = OLD | {"test_acc": None, "attack_success": None, "patch_free_success": None,
                         "epochs": 0}
    bad = [b"{}", b"[1, 2]", b"null", b'"text"', b'{"key": "x"}', b"\xff\xfe", b"[" * 100_000,
           json.dumps(OLD | {"attack_success": True}).encode(),
           json.dumps(OLD | {"seconds": "fast"}).encode(),
           json.dumps(OLD | {"test_acc": float("nan")}).encode(),
           json.dumps(OLD | {"seconds": 10 ** 400}).encode(),
           json.dumps(OLD | {"argv": ["bench", 3]}).encode(),
           json.dumps(OLD | {"poisons_dir": "a\0b"}).encode()]
    store.path.write_bytes(b"\n".join([*bad, json.dumps(zero_epochs).encode(), b"",
                                       json.dumps(OLD).encode()]) + b"\n")
    with caplog.at_level(logging.WARNING, logger="epic.bench.store"):
        records = store.load()
        assert store.skipped == len(bad) and [r["test_acc"] for r in records] == [None, 0.622]
        for number in range(1, len(bad) + 1):
            assert f"r.jsonl line {number} skipped" in caplog.text
        warnings = len(caplog.records)
        store.load()
    assert len(caplog.records) == warnings  # once per store object, not once per read
    row = summarize(records)[0]
    assert row["n"] == 2 and row["test_acc"] == 0.622 and row["test_acc_se"] == 0.0
    assert summarize([zero_epochs])[0]["test_acc"] is None
    assert "| scratch | sleeper_agent | none | 1 | – | – |" in to_markdown(summarize([zero_epochs]))


def test_report_of_a_store_with_junk_and_zero_epoch_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "r.jsonl"
    store.write_text("{}\n" + json.dumps(OLD | {"test_acc": None, "attack_success": None}) + "\n")
    assert main(["bench", "report", str(store), "--out", str(tmp_path / "report"),
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert "(1 unreadable lines skipped)" in out
    assert json.loads(out.splitlines()[-1])[0]["test_acc"] is None


def test_a_claim_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.jsonl")
    with store.claim("t1") as mine, store.claim("t1") as again, store.claim("t2") as other:
        assert mine and not again and other
    with store.claim("t1") as mine:
        assert mine
    # a holder killed mid-trial leaves its claim file behind, but not its lock
    fork = multiprocessing.get_context("fork")
    held = fork.Queue()
    holder = fork.Process(target=_hold_claim, args=(store.path, held))
    holder.start()
    try:
        assert held.get(timeout=30)
        with store.claim("t1") as mine:
            assert not mine
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    with store.claim("t1") as mine:
        assert mine


def _hold_claim(path: Path, held: Any) -> None:
    with ResultStore(path).claim("t1") as mine:
        held.put(mine)
        signal.pause()


def test_two_runs_on_one_store_run_each_trial_once(tiny_data: tuple[ImageData, ImageData],
                                                  tmp_path: Path) -> None:
    train_data, test_data = tiny_data
    idx = torch.tensor([0, 3, 6])
    dirs = [str(tmp_path / name) for name in ("p0", "p1")]
    for d in dirs:
        PoisonSet(idx, train_data.images[idx], test_data.images[:1], target_class=0,
                  adversarial_class=1, eps=8 / 255, metadata={"attack": "copy"}).save(d)
    fork = multiprocessing.get_context("fork")
    start, results = fork.Barrier(2), fork.Queue()
    runs = [fork.Process(target=_bench, args=(tmp_path / "bench", dirs, tiny_data, start,
                                              results)) for _ in range(2)]
    for run in runs:
        run.start()
    written = [results.get(timeout=300) for _ in runs]
    for run in runs:
        run.join()
    stored = ResultStore(tmp_path / "bench" / "results.jsonl").load()
    ids = [trial_id(r) for r in stored]
    assert len(stored) == 4 == len(set(ids)) == sum(map(len, written))
    assert sorted(k for w in written for k in w) == sorted(r["key"] for r in stored)


def _bench(out: Path, dirs: list[str], data: tuple[ImageData, ImageData], start: Any,
           results: Any) -> None:
    train_data, test_data = data
    torch.set_num_threads(1)  # a forked process's torch runs on one thread, as in DataLoader
    start.wait()
    written = run_trials(dirs, ["none", "epic-0.3"], seeds=[0], train_data=train_data,
                         test_data=test_data,
                         make_model=functools.partial(seeded_convnet, train_data),
                         config=TrainConfig(epochs=1, batch_size=16), setting=SETTING,
                         store=ResultStore(out / "results.jsonl"), out=out, warmup=0, every=1)
    results.put([r["key"] for r in written])
