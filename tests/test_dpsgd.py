"""DP-SGD through Opacus (epic.defenses.DPSGD): per-example clipping, privacy accounting,
models with batch norm, transfer learning, resume, and the clip-and-noise it is not."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from epic.defenses import DPSGD, ClipNoise, Defense
from epic.training import TrainConfig, train

from .conftest import seeded_convnet

needs_opacus = pytest.mark.skipif(importlib.util.find_spec("opacus") is None,
                                  reason="opacus is not installed (the [dp] extra)")
# torch's note that the first layer's input needs no gradient, once per Opacus-hooked run
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _one_step(defense: Defense | None, outlier: float) -> torch.Tensor:
    """The update ``(2, 4)`` one SGD step (lr 1) makes to a zero linear layer on a batch of
    three ordinary examples (feature 0, gradient norm 0.07) and one outlier (feature 1,
    gradient norm 0.7 x ``outlier``), run through the hooks as the trainer calls them."""
    layer = nn.Linear(4, 2, bias=False)
    nn.init.zeros_(layer.weight)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    module, stepper = layer, optimizer
    if defense is not None:
        module, stepper = defense.setup(layer, layer, optimizer, num_examples=40, batch_size=4)
    x = torch.zeros(4, 4)
    x[:3, 0] = 0.1
    x[3, 1] = outlier
    loss = F.cross_entropy(module(x), torch.zeros(4, dtype=torch.long))
    stepper.zero_grad(set_to_none=True)
    loss.backward()
    if defense is not None:
        defense.after_backward(list(layer.parameters()))
    stepper.step()
    if defense is not None:
        defense.teardown()
    return -layer.weight.detach().clone()


@needs_opacus
def test_every_example_is_clipped_so_an_outlier_cannot_dominate() -> None:
    plain = _one_step(None, 1e4)
    dp = _one_step(DPSGD(clip=1.0, noise=0.0), 1e4)
    # undefended, the outlier's feature takes the step; under DP-SGD its part is capped:
    # a larger outlier moves the weights no further, and no more than one clipped example
    assert plain[:, 1].norm() > 1000 * plain[:, 0].norm()
    torch.testing.assert_close(dp, _one_step(DPSGD(clip=1.0, noise=0.0), 1e2))
    assert dp[:, 1].norm() <= 1.0 / 4 + 1e-6 < plain[:, 1].norm()
    # the ordinary examples, inside the bound, step as they would undefended
    torch.testing.assert_close(dp[:, 0], plain[:, 0])
    # clipping the batch gradient instead lets the outlier's direction swamp theirs
    batch = _one_step(ClipNoise(clip=1.0, noise=0.0), 1e4)
    assert batch[:, 0].norm() < 1e-3 * plain[:, 0].norm()


@needs_opacus
def test_noise_is_added_and_seeded() -> None:
    quiet = _one_step(DPSGD(clip=1.0, noise=0.0), 1.0)
    noisy = _one_step(DPSGD(clip=1.0, noise=1.0, seed=3), 1.0)
    assert not torch.allclose(noisy, quiet)
    torch.testing.assert_close(noisy, _one_step(DPSGD(clip=1.0, noise=1.0, seed=3), 1.0))


def _transfer(tiny_data, defense: Defense, epochs: int = 3, **kw):  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    model = seeded_convnet(train_data)
    config = TrainConfig(epochs=epochs, batch_size=16, scenario="transfer", augment=False,
                         lr=0.05)
    return model, train(model, train_data, test_data, config, defense=defense, **kw)


@needs_opacus
def test_epsilon_is_reported_grows_with_epochs_and_shrinks_with_noise(tiny_data) -> None:  # type: ignore[no-untyped-def]
    _, result = _transfer(tiny_data, DPSGD(noise=1.0))
    spent = [m["dp_epsilon"] for m in result.metrics]
    assert 0 < spent[0] < spent[1] < spent[2] == result.summary["dp_epsilon"]
    assert result.summary["dp_delta"] == 1e-5
    _, quieter = _transfer(tiny_data, DPSGD(noise=2.0))
    assert quieter.summary["dp_epsilon"] < result.summary["dp_epsilon"]
    _, tighter = _transfer(tiny_data, DPSGD(noise=1.0, delta=1e-3))
    assert tighter.summary["dp_epsilon"] < result.summary["dp_epsilon"]
    _, none = _transfer(tiny_data, DPSGD(noise=0.0), epochs=1)
    assert none.summary["dp_epsilon"] is None  # no noise: no guarantee


@needs_opacus
def test_transfer_trains_only_the_last_layer_and_converts_nothing(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, _ = tiny_data
    frozen = seeded_convnet(train_data)
    model, result = _transfer(tiny_data, DPSGD(noise=0.5))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.body.modules())
    body = model.body.state_dict()
    assert all(torch.equal(v, body[k]) for k, v in frozen.body.state_dict().items())
    assert not torch.equal(model.classifier.weight, frozen.classifier.weight)
    # Opacus is gone from the model afterwards: no hooks, no per-example gradients
    assert not model.classifier._forward_hooks and not model.classifier._backward_hooks
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert result.summary["dp_epsilon"] > 0


@needs_opacus
def test_a_scratch_model_with_batch_norm_trains_with_group_norms(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    model = seeded_convnet(train_data)
    norms = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    result = train(model, train_data, test_data,
                   TrainConfig(epochs=4, batch_size=16, lr=0.05, augment=False),
                   defense=DPSGD(noise=0.3), out=tmp_path)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    # the batch norms' own scales, now the group norms', trained with the rest
    assert len(groups) == len(norms) == 3
    assert all(g.weight is w for g, w in zip(groups, norms, strict=True))
    assert not torch.equal(norms[0], torch.ones_like(norms[0]))
    losses = [m["train_loss"] for m in result.metrics]
    assert losses[-1] < losses[0] and result.summary["test_acc"] > 0.5
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert not any("running_mean" in k for k in saved)  # model.pt holds the group norms
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


class _Crash(RuntimeError):
    pass


@needs_opacus
def test_resume_continues_the_noise_and_the_accounting(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, full = _transfer(tiny_data, DPSGD(noise=1.0), out=tmp_path / "full")

    def crash(epoch, _):  # type: ignore[no-untyped-def]
        if epoch == 1:
            raise _Crash

    with pytest.raises(_Crash):
        _transfer(tiny_data, DPSGD(noise=1.0), out=tmp_path / "cut", on_epoch_end=crash)
    again, resumed = _transfer(tiny_data, DPSGD(noise=1.0), out=tmp_path / "cut", resume=True)

    def strip(metrics):  # type: ignore[no-untyped-def]
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    assert strip(resumed.metrics) == strip(full.metrics)
    assert torch.equal(again.classifier.weight, model.classifier.weight)
    with pytest.raises(ValueError, match="defense.noise: 1.0 there, 2.0 here"):
        _transfer(tiny_data, DPSGD(noise=2.0), out=tmp_path / "cut", resume=True)


def test_without_opacus_the_error_names_the_extra(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "opacus", None)
    layer = nn.Linear(2, 2)
    with pytest.raises(ImportError, match=r"epic-defense\[dp\]"):
        DPSGD().setup(layer, layer, torch.optim.SGD(layer.parameters(), lr=0.1),
                      num_examples=10, batch_size=2)
