"""timm's models as teachers and students: `arch: timm/NAME`, any name `timm.list_models()` knows.

timm is an optional extra (`pip install 'kdarena[timm]'`); without it a
`timm/` arch is a UserError naming the extra.

The network is `timm.create_model(NAME, pretrained=False, num_classes=…,
in_chans=…, **options)`: class count and input channels come from the
dataset, every other option goes to timm (e.g. `drop_rate`, or `img_size`
and `patch_size` for a ViT, whose `img_size` defaults to the dataset's input
size). kdarena never downloads: `pretrained: true` needs `weights: PATH`, a
local state_dict or `.safetensors` file (such as a hub repository's
`model.safetensors`, fetched by the user); a classifier of another shape is
left freshly initialised, as for torchvision's networks.

Stages: the feature levels timm's `forward_intermediates` returns (a CNN's
stem and stages, a ViT's blocks as B×C×h×w maps); the logits are
`forward_head` of its final features, the same as the model's own forward.
timm gives no pre-activations, so `preact` holds the same maps as `stages`.
The network is held as `net`: a kdarena `student.pt` of one has `net.` keys,
and either that or timm's own keys load as `weights`, or as a teacher's
`checkpoint` (format `timm`, detected by `auto`).
"""

from __future__ import annotations

import difflib
import inspect

import torch

from ..errors import UserError
from .base import StagedModel, StageOutput
from .imagenet import load_local_weights

PREFIX = "timm/"
_EXTRA = "pip install 'kdarena[timm]'"
# create_model's own arguments kdarena sets, or that would load or fetch weights behind its back
_RESERVED = {
    "in_chans": "it is the dataset's channel count",
    "checkpoint_path": "give options.weights: PATH instead (kdarena loads tensors only)",
    "pretrained_cfg": "kdarena never downloads; give options.weights: PATH",
    "pretrained_cfg_overlay": "kdarena never downloads; give options.weights: PATH",
    "cache_dir": "kdarena never downloads; give options.weights: PATH",
}


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError(f"timm models need the timm package, which is not installed: {_EXTRA}") from None
    return timm


def timm_problem(arch: str) -> str | None:
    """Why `arch` (`timm/NAME`) cannot be built here, or None when timm knows NAME."""
    name = arch[len(PREFIX):]
    try:
        timm = _timm()
    except UserError as exc:
        return f"{arch}: {exc}"
    if name and timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ";"
    return f"timm has no model {name[:60]!r} (timm {timm.__version__}){hint} timm.list_models() lists its names"


class TimmModel(StagedModel):
    """A timm network behind the feature contract; see the module docstring."""

    TIMM_KEYS_UNDER = "net."

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int, name: str,
                 weights: str | None = None, pretrained: bool = False, **options):
        super().__init__()
        problem = timm_problem(PREFIX + name)
        if problem:
            raise UserError(problem)
        for key, why in _RESERVED.items():
            if key in options:
                raise UserError(f"timm/{name}: option {key!r} is not accepted: {why}")
        if pretrained and weights is None:
            raise UserError(f"timm/{name}: pretrained: true asks for weights, and kdarena never downloads them; give "
                            f"options.weights: PATH, a local state_dict or .safetensors file (e.g. the model.safetensors"
                            f" of the hub's timm/{name}), or drop pretrained")
        self.net = self._create(name, num_classes, in_channels, input_size, options)
        self._check_runs(name, in_channels, input_size)
        if weights is not None:
            head = self.net.pretrained_cfg.get("classifier") or "fc"
            load_local_weights(self.net, weights, classifier=(f"{head}.weight", f"{head}.bias"), own_prefix="net.")

    @staticmethod
    def _create(name: str, num_classes: int, in_channels: int, input_size: int, options: dict) -> torch.nn.Module:
        timm = _timm()
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
        native = net.pretrained_cfg.get("input_size", (0, 0, 0))[-1]
        if ("img_size" not in options and native != input_size
                and "img_size" in inspect.signature(type(net).__init__).parameters):
            # a fixed-size network (ViT): its position embeddings are built for the dataset's size instead
            net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                    img_size=input_size, **options)
        if not hasattr(net, "forward_intermediates"):
            raise ValueError(f"timm's {type(net).__name__} exposes no forward_intermediates, which kdarena reads "
                             "stage features through; pick another timm model")
        return net

    def _check_runs(self, name: str, in_channels: int, input_size: int) -> None:
        """One dry run at the dataset's size: a network too deep or patched too coarsely for it fails here, not mid-run."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.forward_stages(torch.zeros(1, in_channels, input_size, input_size))
        except (RuntimeError, AssertionError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(f"it does not run on {in_channels}×{input_size}×{input_size} inputs ({first}); "
                             f"choose a smaller timm model or options that fit, e.g. img_size/patch_size for a "
                             f"ViT") from None
        finally:
            self.train(was_training)

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        final, stages = self.net.forward_intermediates(x)
        return StageOutput(self.net.forward_head(final), list(stages), list(stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
