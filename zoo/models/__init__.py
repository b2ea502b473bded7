"""Model registry: every teacher and student by name.

`build_model(name, num_classes=…, in_channels=…, input_size=…, **options)`
gives a `StagedModel`; options are each constructor's keyword arguments
(width multiplier, depth, hidden sizes, …). Besides the names in `MODELS`,
`timm/NAME` builds any model timm knows (`timm_models.py`, when timm is
installed); `model_problem` is the one check of a name both building and
config validation make.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..errors import UserError
from .base import StagedModel, StageOutput, StageShape, stage_shapes
from .cnn import SmallCNN
from .imagenet import TorchvisionInceptionV3, TorchvisionResNet
from .mlp import MLP
from .mobilenetv2 import MobileNetV2
from .resnet_cifar import CifarResNet
from .resnext import ResNeXt
from .shufflenetv1 import ShuffleNetV1
from .shufflenetv2 import ShuffleNetV2
from .timm_models import PREFIX as TIMM_PREFIX
from .timm_models import TimmModel, is_timm, timm_problem
from .vgg import VGG
from .wrn import WideResNet



@dataclass(frozen=True)
class ModelEntry:
    ctor: Callable[..., StagedModel]
    # the input `kdarena models` profiles it at: its home dataset's shape
    in_channels: int
    input_size: int
    num_classes: int
    summary: str


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(MLP, 1, 28, 10, "MLP; hidden=[1200,1200] teacher, [800,800] student (MNIST papers)"),
    "cnn": ModelEntry(SmallCNN, 1, 8, 10, "small plain CNN, >=3 stages; digits/MNIST/CIFAR sizes"),
}

_CIFAR100 = (3, 32, 100)
_IMAGENET = (3, 224, 1000)


def _add(name: str, ctor: Callable[..., StagedModel], shape: tuple[int, int, int], summary: str) -> None:
    MODELS[name] = ModelEntry(ctor, *shape, summary)


# CIFAR ResNets (RepDistiller / mdistiller): basic blocks, filters 16/32/64 or the ×4 family 32/64/128/256
_add("resnet_cifar", CifarResNet, _CIFAR100, "CIFAR ResNet, any depth 6n+2 (options depth, filters, width)")
for _depth in (8, 14, 20, 32, 44, 56, 110):
    _add(f"resnet{_depth}", partial(CifarResNet, depth=_depth), _CIFAR100,
         f"CIFAR ResNet-{_depth}, basic blocks, 16/32/64 channels (RepDistiller)")
for _depth in (8, 32):
    _add(f"resnet{_depth}x4", partial(CifarResNet, depth=_depth, filters=(32, 64, 128, 256)), _CIFAR100,
         f"CIFAR ResNet-{_depth}×4, basic blocks, 64/128/256 channels (RepDistiller)")

# Wide ResNets WRN-depth-k
_add("wrn", WideResNet, _CIFAR100, "Wide ResNet WRN-d-k, pre-activation (options depth, widen_factor, drop_rate)")
for _depth, _k in ((16, 1), (16, 2), (16, 4), (16, 8), (28, 2), (28, 4), (28, 10), (40, 1), (40, 2), (40, 4)):
    _add(f"wrn_{_depth}_{_k}", partial(WideResNet, depth=_depth, widen_factor=_k), _CIFAR100,
         f"Wide ResNet WRN-{_depth}-{_k} (RepDistiller / AT)")

# CIFAR VGG with batch norm (RepDistiller)
for _depth in (8, 11, 13, 16, 19):
    _add(f"vgg{_depth}", partial(VGG, depth=_depth), _CIFAR100,
         f"CIFAR VGG-{_depth} with BN, one linear classifier (RepDistiller; option width)")

# mobile and grouped-conv families
_add("mobilenetv2", MobileNetV2, _CIFAR100, "MobileNetV2, CIFAR variant (options width, expand)")
_add("mobilenetv2_half", partial(MobileNetV2, width=0.5), _CIFAR100,
     "MobileNetV2 ×0.5: RepDistiller's 'MobileNetV2' student (option expand)")
_add("shufflenetv1", ShuffleNetV1, _CIFAR100,
     "ShuffleNetV1, CIFAR variant (option groups 1/2/3/4/8; RepDistiller's ShuffleV1 at 3)")
_add("shufflenetv2", ShuffleNetV2, _CIFAR100,
     "ShuffleNetV2, CIFAR variant (option width = net size 0.2…2; RepDistiller's ShuffleV2 at 1)")
_add("resnext", ResNeXt, _CIFAR100,
     "CIFAR ResNeXt (options depth, cardinality, bottleneck_width, stage_channels, stem_channels)")
for _c, _d in ((2, 32), (4, 16), (2, 64), (8, 64)):
    _add(f"resnext29_{_c}x{_d}d", partial(ResNeXt, depth=29, cardinality=_c, bottleneck_width=_d), _CIFAR100,
         f"CIFAR ResNeXt-29 ({_c}×{_d}d)")

# torchvision ImageNet networks; 3×3 stem below 64 px (ResNets), upsampled below 75 px (Inception)
for _arch in TorchvisionResNet.ARCHS:
    _add(_arch, partial(TorchvisionResNet, arch=_arch), _IMAGENET,
         f"torchvision {_arch}; CIFAR stem under 64 px (options stem, resize, weights=local file)")
_add("inception_v3", TorchvisionInceptionV3, (3, 299, 1000),
     "torchvision Inception-v3, no aux head; inputs under 75 px upsampled (options resize, dropout, weights)")
del _depth, _k, _c, _d, _arch

# RepDistiller's and mdistiller's names for the same networks (their model_dict keys), so their configs and
# checkpoints' names work as they are; the others (resnet8x4, wrn_40_2, …) are already the zoo's own
ALIASES: dict[str, str] = {"vgg13_bn": "vgg13", "mobile_half": "mobilenetv2_half", "MobileNetV2": "mobilenetv2_half",
                           "ShuffleV1": "shufflenetv1", "ShuffleV2": "shufflenetv2", "ResNet18": "resnet18", "ResNet50": "resnet50"}


def resolve(name: str) -> str | None:
    """The zoo's name for `name` (itself, or the network its alias names); None when it is neither."""
    name = ALIASES.get(name, name)
    return name if name in MODELS else None


def known_models() -> str:
    """The list an unknown-model message ends with."""
    return f"known models: {', '.join(sorted(MODELS))} (and the reference names {', '.join(sorted(ALIASES))})"


def model_problem(name: str, shown: str | None = None) -> str | None:
    """Why `name` names no buildable model (`shown` is how to quote it), or None when it does."""
    if is_timm(name):
        return timm_problem(name)
    if resolve(name) is None:
        return (f"unknown model {shown or repr(name)}; {known_models()}, "
                f"or {TIMM_PREFIX}NAME for any model of timm ({TIMM_PREFIX}resnet18, {TIMM_PREFIX}test_vit, …)")
    return None


def build_model(name: str, *, num_classes: int, in_channels: int, input_size: int, **options) -> StagedModel:
    """Construct a registered model (by its name or an alias) or a timm model; unknown names or options are a UserError."""
    problem = model_problem(name)
    if problem:
        raise UserError(problem)
    # a timm model's options are timm's own keyword arguments: timm itself names one it does not take
    ctor = partial(TimmModel, name=name[len(TIMM_PREFIX):]) if is_timm(name) else MODELS[resolve(name)].ctor
    allowed = _option_names(ctor)
    unknown = [] if is_timm(name) else sorted(set(options) - allowed)
    if unknown:
        raise UserError(
            f"model '{name}' has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(sorted(allowed)) or 'none'}"
        )
    try:
        return ctor(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **options)
    except (ValueError, TypeError) as exc:
        raise UserError(f"model '{name}' cannot be built with {options or 'its defaults'}: {exc}") from exc


def _option_names(ctor: Callable[..., StagedModel]) -> set[str]:
    fn = ctor.func if isinstance(ctor, partial) else ctor
    params = inspect.signature(fn).parameters
    fixed = set(ctor.keywords) if isinstance(ctor, partial) else set()
    return {p for p in params if p not in {"self", "num_classes", "in_channels", "input_size"} | fixed}


__all__ = ["ALIASES", "MODELS", "ModelEntry", "StagedModel", "StageOutput", "StageShape", "build_model", "known_models",
           "model_problem", "resolve", "stage_shapes"]
