"""Cost profiling: parameter and MAC counts against published figures; the model is left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdarena.zoo.cost import Cost, count_params, profile_cost
from kdarena.zoo.models import build_model



def _cost(name: str, *, num_classes: int, in_channels: int, input_size: int, **options) -> Cost:
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size, **options)
    return profile_cost(model, in_channels=in_channels, input_size=input_size, latency=False)


def test_resnet18_matches_torchvision_metadata():
    cost = _cost("resnet18", num_classes=1000, in_channels=3, input_size=224)
    assert cost.params == 11_689_512
    assert cost.macs == pytest.approx(1.814e9, rel=0.01)
    assert cost.macs == cost.flops // 2


# RepDistiller's published student costs at 32×32, 100 classes
@pytest.mark.parametrize(("name", "params", "macs"), [
    ("resnet20", 0.28e6, 40.8e6),
    ("resnet32", 0.47e6, 69.1e6),
    ("resnet8x4", 1.23e6, 177e6),
    ("wrn_16_2", 0.70e6, 101e6),
    ("vgg8", 3.97e6, 96.2e6),
])
def test_cifar_students_match_published_costs(name, params, macs):
    cost = _cost(name, num_classes=100, in_channels=3, input_size=32)
    assert cost.params == pytest.approx(params, rel=0.02)
    assert cost.macs == pytest.approx(macs, rel=0.02)


def test_resnet20_exact_count():
    assert _cost("resnet20", num_classes=100, in_channels=3, input_size=32).params == 278_324


def test_mlp_macs_are_the_weight_multiplies():
    cost = _cost("mlp", num_classes=10, in_channels=1, input_size=28, hidden=[800, 800])
    assert cost.macs == 784 * 800 + 800 * 800 + 800 * 10
    assert cost.params == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10


def test_profile_leaves_the_model_and_the_callers_threads_untouched():
    model = build_model("cnn", num_classes=10, in_channels=1, input_size=8).to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cost = profile_cost(model, in_channels=1, input_size=8, latency=True)
        assert torch.get_num_threads() == 2  # measured on LATENCY_THREADS, then the caller's count is back
    finally:
        torch.set_num_threads(threads)
    assert 0 <= cost.latency_iqr_ms < cost.latency_ms  # the noise of a batch-1 forward is a fraction of it
    assert model.training
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats included
    assert cost.latency_ms > 0 and math.isfinite(cost.latency_ms)
    assert cost.params == count_params(model)


def test_latency_can_be_skipped():
    model = build_model("cnn", num_classes=10, in_channels=1, input_size=8)
    cost = profile_cost(model, in_channels=1, input_size=8, latency=False)
    assert math.isnan(cost.latency_ms) and math.isnan(cost.latency_iqr_ms)


def test_count_params_counts_shared_weights_once():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(net) == 20


def test_cost_is_frozen():
    cost = Cost(params=1, flops=4, macs=2, latency_ms=float("nan"))
    with pytest.raises(AttributeError):
        cost.params = 2  # type: ignore[misc]
