"""torchvision's ImageNet networks (ResNet-18/34/50, Inception-v3), staged and adapted to small inputs.

The networks are torchvision's own constructors (`weights=None`: kdarena
never downloads anything); their submodules are adopted under the same
names, so a torchvision state_dict loads as is.

Small inputs:
- ResNets: when the image the stem sees is under 64 px (`stem="auto"`), the
  7×7 stride-2 conv and the max-pool are replaced by a 3×3 stride-1 conv and
  nothing — the usual CIFAR adaptation (RepDistiller's ResNet50, kuangliu's
  CIFAR ResNets). At 32×32 the four stages are then 32/16/8/4 px; at 224 the
  network is exactly torchvision's. `stem="imagenet"` keeps the ImageNet stem
  at any size (e.g. to load ImageNet weights), `stem="cifar"` forces the
  small one.
- Inception-v3 needs at least 75×75 pixels. Inputs smaller than that are
  upsampled (bilinear) to 75×75 inside the model, so the architecture stays
  torchvision's and ImageNet-shaped weights still fit; `resize` chooses
  another size (299 is the network's native resolution — far costlier).
  The upsampling is part of the deployed model and so of its cost (it adds
  no FLOPs as counted).
- `resize` (both families): upsample every input to `resize`×`resize` first.
- `in_channels != 3` replaces the first conv with a freshly initialised one.

Stages: ResNets — the four residual layers (`layer1`…`layer4`) after the
last block's ReLU, `preact` the last block's residual sum. Inception-v3 —
the three Inception grids: `Mixed_5d` (35×35 at 299 px), `Mixed_6e` (17×17)
and `Mixed_7c` (8×8); `preact` is the concat of each branch's final BN
output (every channel of an Inception block ends in its branch's ReLU).

`weights`: the path of a local state_dict (e.g. torchvision's
`resnet18-f37072fd.pth` fetched by the user, or a saved kdarena model).
It must match the built network; the one exception is the classifier
(`fc`), which is left freshly initialised, with a warning, when only its
shape differs — the fine-tune-a-pretrained-teacher case (ImageNet weights,
10 classes).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from .base import StagedModel, StageOutput
from .formats import read_tensors, unwrap

_NO_DOWNLOAD = ("kdarena never downloads weights: pass the path of a local state_dict file "
                "(one saved with torch.save(model.state_dict(), path))")
_CLASSIFIER = ("fc.weight", "fc.bias")


def load_local_weights(model: nn.Module, path: str | Path, *, classifier: tuple[str, str] = _CLASSIFIER,
                       own_prefix: str = "") -> None:
    """Load a local state_dict (or `.safetensors` file) into `model`, or raise a UserError naming the file.

    `classifier` names the weight and bias left freshly initialised when only
    their shape differs; `own_prefix` is removed from a file whose every key
    has it (a kdarena wrapper's own state_dict loaded into the network it wraps).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"weights file '{p}' does not exist; {_NO_DOWNLOAD}")
    state = unwrap(read_tensors(p, "weights file", _NO_DOWNLOAD))
    if state is not None and own_prefix and all(k.startswith(own_prefix) for k in state):
        state = {k[len(own_prefix):]: v for k, v in state.items()}
    if state is None:
        raise UserError(f"weights file '{p}' does not hold a state_dict (a mapping of names to tensors); "
                        f"{_NO_DOWNLOAD}")
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    skip = []
    if wrong and set(wrong) <= set(classifier) and not missing and not unexpected:
        skip = wrong
        warnings.warn(f"weights file '{p}': classifier shape {tuple(state[classifier[0]].shape)} does not "
                      f"match this model's {tuple(own[classifier[0]].shape)}; loaded everything else and "
                      "kept a freshly initialised classifier", stacklevel=3)
    elif missing or unexpected or wrong:
        problems = ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
                    + [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        hint = ""
        if any(k.startswith(("conv1.", "Conv2d_1a")) for k in wrong):
            hint = (" The first conv differs: weights for 3-channel ImageNet input need in_channels=3 and,"
                    " for a ResNet below 64 px, stem='imagenet' (optionally resize=224).")
        raise UserError(f"weights file '{p}' does not fit this model: {'; '.join(problems[:5])}{more}.{hint}")
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)


def _fresh_conv(c_in: int, c_out: int, k: int, stride: int, padding: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _check_resize(resize: int | None) -> None:
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be a positive pixel size or None, got {resize}")


class TorchvisionResNet(StagedModel):
    """torchvision `arch` (resnet18/34/50) with a small-input stem; see the module docstring."""

    # RepDistiller / mdistiller `resnetv2.py` (their CIFAR ResNet18/50: this network with the small stem):
    # torchvision's names but for the projection shortcut and the classifier
    REFERENCE_RENAMES = ((r"\.shortcut\.", ".downsample."), (r"^linear\.", "fc."))
    TORCHVISION_KEYS = True

    ARCHS = ("resnet18", "resnet34", "resnet50")

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int, arch: str = "resnet18",
                 stem: str = "auto", resize: int | None = None, weights: str | None = None):
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"arch must be one of {', '.join(self.ARCHS)}, got {arch!r}")
        if stem not in ("auto", "cifar", "imagenet"):
            raise ValueError(f"stem must be 'auto', 'cifar' or 'imagenet', got {stem!r}")
        _check_resize(resize)
        import torchvision  # here, not at the top: it costs every process ~1 s that never builds one

        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        seen = resize or input_size
        self.small_stem = stem == "cifar" or (stem == "auto" and seen < 64)
        if self.small_stem:
            net.conv1 = _fresh_conv(in_channels, 64, 3, 1, 1)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = _fresh_conv(in_channels, 64, 7, 2, 3)
        for name, child in net.named_children():
            self.add_module(name, child)
        self.resize = resize
        if weights is not None:
            load_local_weights(self, weights)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        x = _resize(x, self.resize)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages, preact = [], []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer[:-1]:
                x = block(x)
            x, z = _block_with_preact(layer[-1], x)
            stages.append(x)
            preact.append(z)
        return StageOutput(self.fc(torch.flatten(self.avgpool(x), 1)), stages, preact)


def _block_with_preact(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision BasicBlock/Bottleneck's forward, also returning the sum before its last ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = F.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    from torchvision.models.resnet import Bottleneck

    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(F.relu(out)))
    z = out + identity
    return F.relu(z), z


# Inception-v3's modules in forward order (torchvision's Inception3._forward), without the aux head
_INCEPTION_ORDER = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                    "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                    "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
# the stage ends, with the branch convs whose ReLU outputs are concatenated, in concat order
_INCEPTION_STAGES = {
    "Mixed_5d": ("branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"),
    "Mixed_6e": ("branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"),
    "Mixed_7c": ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b",
                 "branch_pool"),
}
INCEPTION_MIN_SIZE = 75


class TorchvisionInceptionV3(StagedModel):
    """torchvision Inception-v3 (no aux head), inputs under 75 px upsampled; see the module docstring."""

    TORCHVISION_KEYS = True

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int, resize: int | None = None,
                 dropout: float = 0.5, weights: str | None = None):
        super().__init__()
        _check_resize(resize)
        if resize is not None and resize < INCEPTION_MIN_SIZE:
            raise ValueError(f"Inception-v3 needs inputs of at least {INCEPTION_MIN_SIZE} px, got resize={resize}")
        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                              num_classes=num_classes, dropout=dropout)
        if in_channels != 3:
            net.Conv2d_1a_3x3.conv = _fresh_conv(in_channels, 32, 3, 2, 0)
        for name, child in net.named_children():
            if child is not None:
                self.add_module(name, child)
        self.resize = resize
        if weights is not None:
            load_local_weights(self, weights)

    def _run(self, x: torch.Tensor, collect: bool) -> StageOutput:
        x = _resize(x, self.resize)
        if min(x.shape[-2:]) < INCEPTION_MIN_SIZE:
            x = _resize(x, INCEPTION_MIN_SIZE)
        stages, preact = [], []
        for name in _INCEPTION_ORDER:
            block = getattr(self, name)
            if collect and name in _INCEPTION_STAGES:
                x, z = _inception_with_preact(block, _INCEPTION_STAGES[name], x)
                stages.append(x)
                preact.append(z)
            else:
                x = block(x)
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return StageOutput(self.fc(x), stages, preact)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        return self._run(x, collect=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, collect=False).logits


def _inception_with_preact(block: nn.Module, branches: tuple[str, ...],
                           x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an Inception block, capturing each output branch's BN output (before its in-place ReLU)."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        getattr(block, name).bn.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.clone()))
        for name in branches
    ]
    try:
        out = block(x)
    finally:
        for h in handles:
            h.remove()
    return out, torch.cat([captured[name] for name in branches], 1)
