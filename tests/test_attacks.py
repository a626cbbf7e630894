"""Attacks: constraints of the sets they craft, that they optimize what they claim, CLI."""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from epic.attacks import (
    ATTACKS,
    BlendedBackdoor,
    BullseyePolytope,
    FeatureCollision,
    GradientMatching,
    PatchBackdoor,
    SleeperAgent,
    build_attack,
    is_backdoor,
    make_trigger,
    register_attack,
)
from epic.attacks.gradient import gradient_norms, surrogate_config
from epic.cli import main
from epic.data import ImageData, load_digits
from epic.formats import write_poisons
from epic.models import Classifier, build_model
from epic.poisons import PoisonSet, PoisonSetError
from epic.training import TrainConfig, train

from .conftest import seeded_convnet


@pytest.fixture(scope="module")
def digits() -> tuple[ImageData, ImageData]:
    return load_digits()


@pytest.fixture(scope="module")
def model(digits: tuple[ImageData, ImageData]) -> Classifier:
    tr, te = digits
    torch.manual_seed(0)
    m = build_model("convnet", num_classes=10, in_channels=1, mean=tr.mean, std=tr.std)
    train(m, tr, te, TrainConfig(epochs=3, seed=0))
    return m


def _check_constraints(ps: PoisonSet, tr: ImageData, eps_steps: int) -> None:
    base = tr.images[ps.indices]
    assert ps.images.dtype == torch.uint8
    assert int((ps.images.short() - base.short()).abs().max()) <= eps_steps
    assert ps.labels is None  # clean label
    assert torch.all(tr.labels[ps.indices] == ps.adversarial_class)
    md = ps.metadata
    for key in ("attack", "hyperparameters", "seed", "model", "seconds"):
        assert key in md
    ps.validate(tr)


def _state(m: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_bullseye_polytope_pulls_poison_mean_to_target(digits, model) -> None:
    tr, te = digits
    before = _state(model)
    attack = BullseyePolytope(eps=16 / 255, budget=10, iterations=40)
    ps = attack.craft(model, tr, te.images[0], int(te.labels[0]), 3, seed=1)
    _check_constraints(ps, tr, 16)
    assert len(ps) == 10 and ps.metadata["attack"] == "bullseye_polytope"
    assert ps.metadata["hyperparameters"]["iterations"] == 40
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
    with torch.no_grad():
        ft = model.features(te.images[:1].float() / 255)[0]
        clean = model.features(tr.images[ps.indices].float() / 255).mean(0)
        pois = model.features(ps.images.float() / 255).mean(0)
    assert (pois - ft).norm() < 0.9 * (clean - ft).norm()
    again = attack.craft(model, tr, te.images[0], int(te.labels[0]), 3, seed=1)
    assert torch.equal(again.images, ps.images) and torch.equal(again.indices, ps.indices)


def test_feature_collision_moves_each_poison_towards_target(digits, model) -> None:
    tr, te = digits
    ps = FeatureCollision(eps=16 / 255, budget=6, iterations=40).craft(
        model, tr, te.images[1], int(te.labels[1]), 4, seed=0)
    _check_constraints(ps, tr, 16)
    model.eval()
    with torch.no_grad():
        ft = model.features(te.images[1:2].float() / 255)
        d_clean = (model.features(tr.images[ps.indices].float() / 255) - ft).norm(dim=1)
        d_pois = (model.features(ps.images.float() / 255) - ft).norm(dim=1)
    assert bool((d_pois < d_clean).all())


def test_feature_collision_soft_constraint_only(digits, model) -> None:
    tr, te = digits
    ps = FeatureCollision(eps=1.0, budget=3, iterations=20).craft(
        model, tr, te.images[1], int(te.labels[1]), 4, seed=0)
    assert ps.eps == 1.0
    ps.validate(tr)


def test_gradient_matching_aligns_gradients(digits, model) -> None:
    tr, te = digits
    attack = GradientMatching(budget=8, iterations=12, restarts=2)
    ps = attack.craft(model, tr, te.images[2], int(te.labels[2]), 7, seed=0)
    _check_constraints(ps, tr, 16)
    loss = ps.metadata["final_loss"]
    assert loss < 1  # cosine similarity above zero after crafting
    assert ps.metadata["hyperparameters"]["restarts"] == 2
    # the crafted poisons align better than the clean bases
    from epic.alignment import alignment_loss, gradient_norm, parameter_gradient

    m = copy.deepcopy(model).eval()
    tx = te.images[2:3].float() / 255
    tg = parameter_gradient(m, tx, torch.tensor([7]), 8)
    y = tr.labels[ps.indices]
    clean = alignment_loss(m, tr.images[ps.indices].float() / 255, y, tg, gradient_norm(tg))
    pois = alignment_loss(m, ps.images.float() / 255, y, tg, gradient_norm(tg))
    assert float(pois.detach()) < float(clean.detach())
    assert loss < float(clean.detach())  # the loss the attack recorded, too (0.43 vs 0.58)


def test_sleeper_agent_backdoor_set(digits, model) -> None:
    tr, te = digits
    ps = SleeperAgent(budget=6, iterations=6, retrain_every=3, retrain_epochs=1).craft(
        model, tr, 1, 8, seed=0)
    _check_constraints(ps, tr, 16)
    assert ps.trigger is not None and ps.trigger.shape == (1, 2, 2)
    assert len(ps.target_images) == 0 and ps.target_class == 1
    assert len(ps.evaluation_images(te)) == int((te.labels == 1).sum())
    # poisons are the adversarial-class images with the largest gradient norms
    members = (tr.labels == 8).nonzero().squeeze(1)
    norms = gradient_norms(model, tr, members)
    top = members[norms.argsort(descending=True)[:6]].sort().values
    assert torch.equal(ps.indices, top)


def test_sleeper_agents_surrogate_is_retrained_as_the_clean_model_was(tmp_path: Path) -> None:
    config = surrogate_config(TrainConfig(epochs=16, milestones=(10, 14), batch_size=512,
                                          schedule="step"), 8, seed=3)
    assert (config.epochs, config.milestones, config.seed, config.batch_size) == (
        8, (5, 7), 3, 512)  # the decays at the same share of the shorter run
    assert surrogate_config(TrainConfig(epochs=40), 5, seed=0).milestones is None  # defaults
    # epic craft hands the surrogate its own training options
    assert main(["craft", "--attack", "sa", "--epochs", "2", "--batch-size", "32",
                 "--milestones", "1", "--iterations", "2", "--retrain-epochs", "1",
                 "--budget", "5", "--out", str(tmp_path / "sa"), "--device", "cpu"]) == 0
    tr, _ = load_digits()
    recorded = PoisonSet.load(tmp_path / "sa", tr).metadata["hyperparameters"]
    assert recorded["retrain_epochs"] == 1
    assert (recorded["retrain_config"]["batch_size"], recorded["retrain_config"]["epochs"],
            recorded["retrain_config"]["milestones"]) == (32, 2, [1])


@pytest.mark.parametrize("clean_label", [False, True])
def test_patch_backdoor(digits, clean_label: bool) -> None:
    tr, _ = digits
    ps = PatchBackdoor(budget=0.01, clean_label=clean_label).craft(None, tr, 2, 6, seed=0)
    assert len(ps) == round(0.01 * len(tr)) and ps.eps == 1.0
    assert ps.trigger is not None
    base_class = 6 if clean_label else 2
    assert torch.all(tr.labels[ps.indices] == base_class)
    if clean_label:
        assert ps.labels is None
    else:
        assert ps.labels is not None and torch.all(ps.labels == 6)
        assert ps.metadata["clean_label"] is False
    # each poison differs from its base only inside one patch-sized window
    diff = (ps.images != tr.images[ps.indices]).any(1)
    assert int(diff.flatten(1).sum(1).max()) <= ps.trigger.shape[1] * ps.trigger.shape[2]
    ps.validate(tr)


def test_a_planted_patch_backdoor_works_with_its_patch_only(digits) -> None:
    """BadNets on digits: 40 training 2s get the patch and the label 6. The victim calls most
    patched test 2s a 6 and the same 2s without the patch not; a model trained without the
    poisons calls none of the patched 2s a 6."""
    tr, te = digits
    ps = PatchBackdoor(budget=40).craft(None, tr, 2, 6, seed=0)
    config = TrainConfig(epochs=8, batch_size=64, lr=0.05)
    poisoned = train(seeded_convnet(tr), tr, te, config, poisons=ps).summary
    assert poisoned["attack_success"] > 0.7 and poisoned["patch_free_success"] < 0.1  # .84, 0
    clean = train(seeded_convnet(tr), tr, te, config)
    assert ps.success(clean.model, te) < 0.1  # 0
    assert poisoned["test_acc"] > 0.9 and clean.summary["test_acc"] > 0.9


def test_a_blended_backdoor_works_with_its_pattern_only(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Blended injection on digits: 40 training 2s get a noise pattern mixed in at 0.2 and the
    label 6; no pixel moves by more than 0.2. The victim calls most test 2s with the pattern
    a 6 and the same 2s without it not. The set keeps its blend through a save, and a format
    that would read it back as a patch refuses to write it."""
    tr, te = digits
    ps = BlendedBackdoor(budget=40, alpha=0.2).craft(None, tr, 2, 6, seed=0)
    assert ps.trigger is not None and tuple(ps.trigger.shape) == tr.shape
    assert ps.eps == 0.2 and ps.trigger_blend == 0.2 and ps.metadata["attack"] == "blend"
    moved = (ps.images.short() - tr.images[ps.indices].short()).abs()
    assert int(moved.max()) <= round(0.2 * 255) and int(moved.max()) > 0
    source = ps.evaluation_images(te)
    expected = (0.8 * te.images[te.labels == 2].float() + 0.2 * ps.trigger.float()).round()
    assert torch.equal(source, expected.to(torch.uint8))
    config = TrainConfig(epochs=8, batch_size=64, lr=0.05)
    poisoned = train(seeded_convnet(tr), tr, te, config, poisons=ps).summary
    assert poisoned["attack_success"] > 0.7 and poisoned["patch_free_success"] < 0.1
    again = PoisonSet.load(ps.save(tmp_path / "blend"), tr)
    assert again.trigger_blend == 0.2 and torch.equal(again.evaluation_images(te), source)
    with pytest.raises(PoisonSetError, match="write this set as epic"):
        write_poisons(ps, tr, tmp_path / "bench", "benchmark")
    assert not (tmp_path / "bench").exists()
    meta = json.loads((tmp_path / "blend" / "poisons.json").read_text())
    for bad in (0, 1.5, True, "0.2"):  # a stranger's file: refused on reading, by field
        (tmp_path / "blend" / "poisons.json").write_text(json.dumps(
            meta | {"metadata": meta["metadata"] | {"trigger_blend": bad}}))
        with pytest.raises(PoisonSetError, match="'trigger_blend' must be a number"):
            PoisonSet.load(tmp_path / "blend", tr)
    as_patch = PoisonSet(**{**ps.__dict__, "trigger": ps.trigger[:, :4, :4]})
    with pytest.raises(PoisonSetError, match="a blended trigger covers the image"):
        as_patch.validate(tr)


def test_a_blended_backdoor_from_the_command_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--alpha sets the blend; an export that cannot keep it is refused after the set itself
    is saved."""
    argv = ["craft", "--attack", "blend", "--alpha", "0.1", "--budget", "5", "--source-class",
            "1", "--adversarial-class", "3", "--out", str(tmp_path / "b"), "--device", "cpu"]
    assert main(argv) == 0
    tr, _ = load_digits()
    ps = PoisonSet.load(tmp_path / "b", tr)
    assert (ps.trigger_blend, ps.eps, len(ps)) == (0.1, 0.1, 5)
    with pytest.raises(SystemExit):
        main([*argv[:-4], "--out", str(tmp_path / "c"), "--export", "benchmark"])
    assert "write this set as epic" in capsys.readouterr().err
    assert PoisonSet.load(tmp_path / "c", tr).trigger_blend == 0.1  # nothing lost


def test_make_trigger_is_seeded() -> None:
    a = make_trigger(3, 8, generator=torch.Generator().manual_seed(0))
    b = make_trigger(3, 8, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 8, 8) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0, 255}


def test_saved_set_round_trips_and_load_rejects_tampering(digits, model, tmp_path) -> None:
    tr, te = digits
    ps = BullseyePolytope(budget=5, iterations=5).craft(model, tr, te.images[0],
                                                        int(te.labels[0]), 3, seed=0)
    ps.save(tmp_path / "p")
    got = PoisonSet.load(tmp_path / "p", tr)
    assert torch.equal(got.images, ps.images) and got.metadata == json.loads(
        json.dumps(ps.metadata))
    import numpy as np

    with np.load(tmp_path / "p" / "poisons.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["images"] = arrays["images"].copy()
    arrays["images"][0] = 255 - arrays["images"][0]
    np.savez(tmp_path / "p" / "poisons.npz", **arrays)
    with pytest.raises(PoisonSetError, match="exceed eps"):
        PoisonSet.load(tmp_path / "p", tr)


def test_craft_cli_writes_a_loadable_set(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bp"
    rc = main(["craft", "--attack", "bp", "--epochs", "1", "--iterations", "3",
               "--target-index", "4", "--out", str(out), "--export", "benchmark", "--json",
               "--device", "cpu"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["attack"] == "bullseye_polytope" and summary["poisons"] == 13
    tr, _ = load_digits()
    ps = PoisonSet.load(out, tr)
    assert ps.metadata["target_index"] == 4 and ps.eps == 8 / 255
    from epic.formats import import_benchmark

    again = import_benchmark(out / "benchmark", tr)
    assert torch.equal(again.images, ps.images)
    rc = main(["train", "--epochs", "2", "--scenario", "transfer", "--pretrained",
               str(out / "clean_model" / "model.pt"), "--poisons", str(out), "--out",
               str(tmp_path / "run"), "--json", "--device", "cpu"])
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all("attack_success" in m for m in metrics)
    # the last is whether the victim, as saved, calls the target the adversarial class
    victim = build_model("convnet", num_classes=10, in_channels=1, mean=tr.mean, std=tr.std)
    victim.load_state_dict(torch.load(tmp_path / "run" / "model.pt", weights_only=True))
    with torch.no_grad():
        flipped = victim.eval()(ps.target_images.float() / 255).argmax(1) == ps.adversarial_class
    assert len(flipped) == 1 and metrics[-1]["attack_success"] == float(flipped[0])


def test_craft_trains_its_clean_model_as_train_does(tmp_path: Path) -> None:
    options = ["--subset", "200", "--test-subset", "50", "--epochs", "2", "--lr", "0.03",
               "--weight-decay", "0.001", "--milestones", "1", "--batch-size", "64",
               "--eval-every", "2", "--seed", "5", "--device", "cpu"]
    assert main(["craft", "--attack", "fc", "--budget", "3", "--iterations", "2", *options,
                 "--out", str(tmp_path / "p")]) == 0
    assert main(["train", *options, "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    crafted = json.loads((tmp_path / "p" / "clean_model" / "config.json").read_text())
    trained = json.loads((tmp_path / "t" / "config.json").read_text())
    assert crafted["config"] == trained["config"]
    assert crafted["config"]["lr"] == 0.03 and crafted["config"]["milestones"] == [1]
    clean = torch.load(tmp_path / "p" / "clean_model" / "model.pt", weights_only=True)
    same = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    assert torch.equal(clean["classifier.weight"], same["classifier.weight"])


@pytest.mark.slow
def test_demo_attack_works_and_epic_stops_it(capsys) -> None:
    rc = main(["demo", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["undefended"]["attack_success"] > 0.4
    assert r["epic"]["attack_success"] < r["undefended"]["attack_success"] / 2
    # all but a borderline one or two (which one differs between processors)
    assert r["epic"]["poisons_dropped"] >= 0.95 * r["epic"]["poisons"]


DOC = Path(__file__).resolve().parent.parent / "docs" / "attacks.md"


@pytest.mark.usefixtures("registries")
def test_the_worked_example_attack_needs_nothing_but_its_file(tmp_path: Path, capsys,  # type: ignore[no-untyped-def]
                                                              monkeypatch) -> None:
    # the RandomNoise file of docs/attacks.md, imported as a module: its decorator registers it
    source = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[1]
    module = types.ModuleType("noise")
    monkeypatch.setitem(sys.modules, "noise", module)
    exec(compile(source, str(DOC), "exec"), module.__dict__)  # noqa: S102
    assert ATTACKS["noise"] is module.RandomNoise and not is_backdoor("noise")
    assert main(["craft", "--attack", "noise", "--eps", "4", "--budget", "7", "--epochs", "1",
                 "--target-index", "2", "--out", str(tmp_path / "n"), "--device", "cpu"]) == 0
    tr, te = load_digits()
    ps = PoisonSet.load(tmp_path / "n", tr)
    assert ps.metadata["attack"] == "noise" and len(ps) == 7 and ps.eps == 4 / 255
    assert ps.adversarial_class == (int(te.labels[2]) + 1) % 10
    moved = (ps.images.short() - tr.images[ps.indices].short()).abs()
    assert 0 < int(moved.max()) <= 4
    # a flag whose option the attack lacks is refused, in the command line's words
    with pytest.raises(SystemExit):
        main(["craft", "--attack", "noise", "--restarts", "2", "--epochs", "1",
              "--out", str(tmp_path / "m"), "--device", "cpu"])
    assert "--attack noise takes no --restarts" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"attack noise takes no iterations \(its options: eps"):
        build_attack("noise", iterations=3)
    with pytest.raises(ValueError, match="unknown attack 'magic'"):
        build_attack("magic")
    with pytest.raises(TypeError, match="a dataclass with a str 'name'"):
        register_attack(type("Bare", (), {"name": "bare"}))



def test_craft_attack_dispatches_by_kind_and_names_what_is_missing() -> None:
    from epic.attacks import craft_attack
    from epic.errors import EpicError

    tr, te = load_digits()
    ps = craft_attack("patch", None, tr, te, source_class=2, budget=5, seed=1)
    assert len(ps) == 5 and (ps.target_class, ps.adversarial_class) == (2, 3)
    with pytest.raises(EpicError, match="backdoor: it needs source_class"):
        craft_attack("patch", None, tr, te)
    with pytest.raises(EpicError, match="needs a target_index and a model"):
        craft_attack("fc", None, tr, te, target_index=0)


def test_a_patch_backdoor_is_crafted_without_training_a_model(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The patch uses no model: no clean model is trained for it, and --patch-size sets its
    side."""
    with caplog.at_level(logging.INFO, logger="epic"):
        assert main(["craft", "--attack", "patch", "--patch-size", "3", "--budget", "5",
                     "--source-class", "1", "--adversarial-class", "3", "--epochs", "50",
                     "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert "clean model" not in caplog.text and not (tmp_path / "p" / "clean_model").exists()
    tr, _ = load_digits()
    ps = PoisonSet.load(tmp_path / "p", tr)
    assert ps.trigger is not None and ps.trigger.shape[1:] == (3, 3) and len(ps) == 5
    assert (ps.target_class, ps.adversarial_class) == (1, 3)
