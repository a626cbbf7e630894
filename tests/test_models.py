from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epic.models import MODELS, build_model


@pytest.mark.parametrize("name", ["convnet", "resnet18-small", "vgg16-small", "fastnet"])
def test_features_feed_the_last_linear_layer(name: str) -> None:
    torch.manual_seed(0)
    m = build_model(name, num_classes=7, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3).eval()
    x = torch.rand(4, 3, 32, 32)
    feats = m.features(x)
    assert feats.shape == (4, m.feature_dim)
    assert torch.allclose(m.classifier(feats), m(x), atol=1e-6)
    assert m.classifier.out_features == 7


def test_paper_architectures_have_their_published_sizes() -> None:
    sizes = {n: sum(p.numel() for p in build_model(n, num_classes=10, in_channels=3,
                                                   mean=[0.5] * 3, std=[0.2] * 3).parameters())
             for n in ("resnet18", "vgg16")}
    assert 11.1e6 < sizes["resnet18"] < 11.2e6
    assert 14.7e6 < sizes["vgg16"] < 14.8e6


def test_fast_net_has_airbench_layout_and_size() -> None:
    m = build_model("fastnet", num_classes=10, in_channels=3, mean=[0.5] * 3, std=[0.2] * 3)
    convs = [x for x in m.body.modules() if isinstance(x, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 64, 64, 128, 128, 128, 128]
    assert convs[0].kernel_size == (2, 2) and m.feature_dim == 128
    assert 0.56e6 < sum(p.numel() for p in m.parameters()) < 0.58e6


def test_normalization_is_inside_the_model() -> None:
    m = build_model("convnet", num_classes=2, in_channels=1, mean=[0.3], std=[0.1])
    x = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(m.normalize(x), torch.zeros_like(x))


def test_reset_classifier_changes_only_the_last_layer() -> None:
    torch.manual_seed(0)
    m = build_model("convnet", num_classes=3, in_channels=1, mean=[0.5], std=[0.2])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.reset_classifier()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_unknown_model_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet50", num_classes=10, in_channels=3, mean=[0.5] * 3, std=[0.2] * 3)
    assert set(MODELS) >= {"resnet18", "vgg16", "convnet"}


def test_eval_mode_restores_every_submodules_mode_also_on_an_error() -> None:
    from epic.models import eval_mode

    model = build_model("convnet", num_classes=3, in_channels=3, mean=(0.5,) * 3,
                        std=(0.25,) * 3)
    model.train()
    model.body.eval()  # a frozen body inside a training model, as in transfer learning
    with pytest.raises(KeyError), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise KeyError
    assert model.training and model.classifier.training and not model.body.training


def test_the_worked_example_model_trains_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The body of docs/models.md, imported as a module: registered by its decorator, built
    by name, trained by `epic train --model`, with EPIC's embeddings and features on it."""
    import re
    import sys
    import types

    from epic.cli import main
    from epic.models import register_model

    doc = Path(__file__).resolve().parent.parent / "docs" / "models.md"
    source = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)[0]
    module = types.ModuleType("twoconv")
    sys.modules["twoconv"] = module
    try:
        exec(compile(source, str(doc), "exec"), module.__dict__)  # noqa: S102
        assert MODELS["twoconv"] is module.twoconv_body
        m = build_model("twoconv", num_classes=10, in_channels=3, mean=[0.5] * 3,
                        std=[0.25] * 3)
        assert m.features(torch.rand(2, 3, 32, 32)).shape == (2, 32)
        assert main(["train", "--model", "twoconv", "--subset", "200", "--test-subset", "50",
                     "--epochs", "3", "--defense", "epic", "--warmup", "1", "--every", "1",
                     "--until", "3", "--out", str(tmp_path / "t"), "--device", "cpu",
                     "--no-progress"]) == 0
        with pytest.raises(ValueError, match="'twoconv' is taken"):
            register_model("twoconv")(lambda c: (torch.nn.Identity(), 1))
    finally:
        MODELS.pop("twoconv", None)
        sys.modules.pop("twoconv", None)
