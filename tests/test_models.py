"""The model zoo: every registered model keeps the feature contract; options, errors, local weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.nn import functional as F

from kdarena.zoo.errors import UserError
from kdarena.zoo.models import MODELS, StagedModel, build_model, stage_shapes


MLP_LIKE = {"mlp"}


def _check_contract(model: StagedModel, in_channels: int, input_size: int, num_classes: int, name: str):
    model.eval()
    x = torch.randn(2, in_channels, input_size, input_size)
    with torch.no_grad():
        out = model.forward_stages(x)
        logits = model(x)
    assert out.logits.shape == (2, num_classes)
    assert torch.allclose(logits, out.logits, atol=1e-5), "forward() must be forward_stages().logits"
    assert len(out.stages) == len(out.preact) >= (1 if name in MLP_LIKE else 3)
    for s, z in zip(out.stages, out.preact):
        assert s.shape == z.shape
        assert s.dim() == (2 if name in MLP_LIKE else 4)
        # a stage is its preact after the final ReLU — or, for a linear bottleneck, the preact itself
        assert torch.allclose(s, F.relu(z), atol=1e-6) or torch.equal(s, z)
    shapes = stage_shapes(model, in_channels, input_size)
    assert len(shapes) == len(out.stages)
    for shape, s in zip(shapes, out.stages):
        assert shape.channels == s.shape[1]
        if s.dim() == 4:
            assert (shape.height, shape.width, shape.spatial) == (s.shape[2], s.shape[3], True)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_tiny_grey_input(name):
    """1-channel 8×8 (digits-sized) input, 7 classes: logits, stages, preact, stage_shapes, gradients."""
    model = build_model(name, num_classes=7, in_channels=1, input_size=8)
    assert isinstance(model, StagedModel)
    _check_contract(model, 1, 8, 7, name)
    model.train()
    out = model.forward_stages(torch.randn(2, 1, 8, 8))
    (out.logits.sum() + sum(s.mean() for s in out.stages)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_entry_has_a_home_input(name):
    entry = MODELS[name]
    assert entry.in_channels in (1, 3) and entry.input_size >= 8 and entry.num_classes >= 2
    assert entry.summary and "\n" not in entry.summary


@pytest.mark.parametrize(("name", "in_channels", "size", "expected"), [
    ("resnet20", 3, 32, [(16, 32), (32, 16), (64, 8)]),
    ("resnet20", 1, 28, [(16, 28), (32, 14), (64, 7)]),
    ("resnet8x4", 3, 32, [(64, 32), (128, 16), (256, 8)]),
    ("wrn_16_2", 3, 32, [(32, 32), (64, 16), (128, 8)]),
    ("vgg8", 3, 32, [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)]),
    ("vgg8", 1, 28, [(64, 28), (128, 14), (256, 7), (512, 3), (512, 3)]),
    ("mobilenetv2_half", 3, 32, [(12, 16), (16, 8), (48, 4), (1280, 2)]),
    ("shufflenetv2", 3, 32, [(116, 16), (232, 8), (1024, 4)]),
    ("shufflenetv1", 3, 32, [(240, 16), (480, 8), (960, 4)]),
    ("shufflenetv1", 1, 28, [(240, 14), (480, 7), (960, 4)]),
    ("resnext29_4x16d", 3, 16, [(256, 16), (512, 8), (1024, 4)]),
    ("resnet18", 3, 32, [(64, 32), (128, 16), (256, 8), (512, 4)]),
    ("resnet50", 1, 28, [(256, 28), (512, 14), (1024, 7), (2048, 4)]),
    ("resnet18", 1, 64, [(64, 16), (128, 8), (256, 4), (512, 2)]),  # ImageNet stem from 64 px
    ("inception_v3", 3, 32, [(288, 7), (768, 3), (2048, 1)]),
])
def test_stage_shapes_at_dataset_sizes(name, in_channels, size, expected):
    model = build_model(name, num_classes=10, in_channels=in_channels, input_size=size)
    out = _check_contract(model, in_channels, size, 10, name)
    assert [(s.shape[1], s.shape[2]) for s in out.stages] == expected


def test_resnet18_at_imagenet_size_keeps_torchvision_stem():
    model = build_model("resnet18", num_classes=1000, in_channels=3, input_size=224)
    assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, torch.nn.MaxPool2d)
    assert set(model.state_dict()) == set(torchvision.models.resnet18(weights=None).state_dict())
    small = build_model("resnet18", num_classes=10, in_channels=3, input_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    forced = build_model("resnet18", num_classes=10, in_channels=3, input_size=32, stem="imagenet")
    assert forced.conv1.kernel_size == (7, 7)


def test_options_change_the_network():
    def n_params(m):
        return sum(p.numel() for p in m.parameters())

    base = n_params(build_model("resnet20", num_classes=10, in_channels=3, input_size=32))
    half = n_params(build_model("resnet20", num_classes=10, in_channels=3, input_size=32, width=0.5))
    assert half < base / 3
    deep = build_model("resnet_cifar", num_classes=10, in_channels=3, input_size=32, depth=56)
    assert n_params(deep) == n_params(build_model("resnet56", num_classes=10, in_channels=3, input_size=32))
    wide = build_model("wrn", num_classes=10, in_channels=3, input_size=32, depth=16, widen_factor=2)
    assert n_params(wide) == n_params(build_model("wrn_16_2", num_classes=10, in_channels=3, input_size=32))
    g8 = build_model("shufflenetv1", num_classes=10, in_channels=3, input_size=32, groups=8)
    assert g8.stages[2][0].conv3.groups == 8 and g8.classifier.in_features == 1536
    small = build_model("shufflenetv2", num_classes=10, in_channels=3, input_size=32, width=0.5)
    assert n_params(small) < n_params(build_model("shufflenetv2", num_classes=10, in_channels=3, input_size=32))


def test_unknown_model_lists_known_names():
    with pytest.raises(UserError, match="unknown model 'resnet21'") as err:
        build_model("resnet21", num_classes=10, in_channels=3, input_size=32)
    assert "resnet20" in str(err.value) and "wrn_40_2" in str(err.value) and "ShuffleV1" in str(err.value)


def test_reference_names_build_the_same_network():
    for alias, name in (("MobileNetV2", "mobilenetv2_half"), ("ShuffleV1", "shufflenetv1"), ("ResNet50", "resnet50")):
        a = build_model(alias, num_classes=10, in_channels=3, input_size=32)
        b = build_model(name, num_classes=10, in_channels=3, input_size=32)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize(("name", "options", "pattern"), [
    ("resnet20", {"widht": 2}, r"no option 'widht'.*width"),
    ("resnet20", {"depth": 32}, r"no option 'depth'"),  # fixed by the name
    ("resnet_cifar", {"depth": 21}, r"6n\+2"),
    ("wrn", {"depth": 15}, r"6n\+4"),
    ("vgg8", {"weights": "x.pt"}, r"no option 'weights'"),
    ("vgg", {}, r"unknown model"),
    ("shufflenetv2", {"width": 0.7}, r"net size"),
    ("shufflenetv1", {"groups": 5}, r"groups must be one of \[1, 2, 3, 4, 8\]"),
    ("resnext", {"depth": 30}, r"9n\+2"),
    ("resnet18", {"stem": "tiny"}, r"stem"),
    ("inception_v3", {"resize": 32}, r"75"),
])
def test_bad_options_are_user_errors(name, options, pattern):
    with pytest.raises(UserError, match=pattern):
        build_model(name, num_classes=10, in_channels=3, input_size=32, **options)


# --- local weights -------------------------------------------------------------------------------

def test_weights_round_trip(tmp_path):
    a = build_model("resnet18", num_classes=10, in_channels=3, input_size=32).eval()
    path = tmp_path / "teacher.pt"
    torch.save(a.state_dict(), path)
    b = build_model("resnet18", num_classes=10, in_channels=3, input_size=32, weights=str(path)).eval()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_inception_weights_round_trip(tmp_path):
    a = build_model("inception_v3", num_classes=10, in_channels=1, input_size=28).eval()
    path = tmp_path / "inception.pt"
    torch.save({"state_dict": a.state_dict()}, path)  # a checkpoint wrapping the state_dict also loads
    b = build_model("inception_v3", num_classes=10, in_channels=1, input_size=28, weights=str(path)).eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_torchvision_state_dict_loads_and_classifier_mismatch_warns(tmp_path):
    tv = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(tv.state_dict(), path)
    same = build_model("resnet18", num_classes=1000, in_channels=3, input_size=224, weights=str(path))
    assert torch.equal(same.conv1.weight, tv.conv1.weight) and torch.equal(same.fc.weight, tv.fc.weight)
    with pytest.warns(UserWarning, match="classifier"):
        tuned = build_model("resnet18", num_classes=10, in_channels=3, input_size=32, stem="imagenet",
                            weights=str(path))
    assert torch.equal(tuned.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    assert tuned.fc.weight.shape == (10, 512)
    # a small (CIFAR) stem cannot take ImageNet's 7×7 conv: say so and how to fix it
    with pytest.raises(UserError, match=r"resnet18-imagenet\.pth.*conv1\.weight.*stem='imagenet'"):
        build_model("resnet18", num_classes=1000, in_channels=3, input_size=32, weights=str(path))


def test_missing_weights_file_is_a_user_error(tmp_path):
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(UserError, match="never downloads") as err:
        build_model("resnet18", num_classes=10, in_channels=3, input_size=32, weights=str(path))
    assert str(path) in str(err.value)


def test_incompatible_or_corrupt_weights_are_user_errors(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(build_model("resnet34", num_classes=10, in_channels=3, input_size=32).state_dict(), path)
    with pytest.raises(UserError, match=r"r34\.pt.*does not fit.*unexpected layer1\.2"):
        build_model("resnet18", num_classes=10, in_channels=3, input_size=32, weights=str(path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"junk\.pt.*is not a loadable weights file"):
        build_model("resnet50", num_classes=10, in_channels=3, input_size=32, weights=str(junk))
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(UserError, match=r"list\.pt.*does not hold a state_dict"):
        build_model("resnet18", num_classes=10, in_channels=3, input_size=32, weights=str(notdict))


def test_mlp_max_norm_caps_each_hidden_units_incoming_weights_after_every_step(digits):
    """Hinton's MNIST teacher recipe: max-norm 3.5 on each hidden unit, applied by the engine after each step."""
    from kdarena.methods.baseline import Baseline
    from kdarena.methods.engine import fit
    from kdarena.methods.recipe import Recipe
    from helpers import CPU, digits_pair

    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=[32, 32], max_norm=0.5,
                        input_dropout=0.2, dropout=0.5)
    free = build_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=[32, 32])
    free.load_state_dict(model.state_dict())
    for m in (model, free):
        fit(Baseline(m, None, Baseline.Params(), digits_pair(m, m)), digits,
            Recipe(epochs=2, batch_size=64, lr=0.5), device=CPU)
    capped = [float(lin.weight.norm(dim=1).max()) for lin in model.linears]
    uncapped = [float(lin.weight.norm(dim=1).max()) for lin in free.linears]
    assert all(n <= 0.5 + 1e-5 for n in capped)
    assert all(n > 0.5 for n in uncapped)  # the cap did something: without it the norms grow past it
    # the classifier is not a hidden unit: it is left free
    assert float(model.classifier.weight.norm(dim=1).max()) > 0


def test_mlp_input_dropout_drops_inputs_in_training_only():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=[16], input_dropout=0.5)
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    with pytest.raises(UserError, match="input_dropout"):
        build_model("mlp", num_classes=10, in_channels=1, input_size=8, input_dropout=1.0)
    with pytest.raises(UserError, match="max_norm"):
        build_model("mlp", num_classes=10, in_channels=1, input_size=8, max_norm=0)
