"""Weight initialisation shared by the CIFAR model definitions."""

from __future__ import annotations

from torch import nn


def init_conv_bn(module: nn.Module, *, linear_std: float | None = None) -> None:
    """He-normal (fan-out) convs with zero bias, BatchNorm γ=1 β=0.

    `N(0, sqrt(2/n))` with `n = k·k·out_channels` is exactly Kaiming normal in
    fan-out mode, the initialisation of the RepDistiller definitions.
    `linear_std`: draw Linear weights from `N(0, linear_std)` with zero bias
    (VGG, MobileNetV2); None keeps PyTorch's default Linear init but zeroes
    the bias (ResNet, WRN).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
