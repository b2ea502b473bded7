"""Knowledge review (Chen, Liu, Zhao, Jia, CVPR 2021): attention-based fusion and the hierarchical context loss.

Each student level is compared with the teacher's level of the same depth
through a review path: the deepest student feature is transformed first,
and each shallower level fuses its own feature with the (upsampled) fused
result of the levels below it before being compared.

Levels (shallow → deep): the last `n` spatial stages of each network,
aligned from the deepest (`n` the smaller count, as mdistiller's lists),
plus a 1×1 "pooled" level, the global average of the last stage's output.
Student side: the stages' outputs after activation (mdistiller's default
`STU_PREACT: False`; `student_preact: true` takes the pre-activations);
teacher side: the stages' pre-activations (`preact`) and the pooled output,
as mdistiller's `preact_feats[1:] + [pooled_feat]`.

ABF (attention-based fusion), one per level, training-only (outside
`student.`: counted in `extra_params`, trained by the student's optimizer,
never deployed); `mid = min(512, C_s of the deepest stage)`:

    x  = BN(conv1×1(F_s))                                 (C_s → mid)
    deepest level: no fusion;  others:  y = nearest-upsample(r_deeper, H_s×W_s),
                                        [a, b] = sigmoid(conv1×1([x, y]))  (2 maps),  x = a·x + b·y
    x  = nearest-resize(x, H_t×W_t) where the sizes differ
    out = BN(conv3×3(x))  (mid → C_t);   r = x is passed to the next shallower level

(conv1 and conv2 weights: Kaiming-uniform with a=1, as the reference.)

HCL (hierarchical context loss) per level, then summed over levels:

    HCL(o, t) = [MSE(o, t) + Σ_k 2^−k·MSE(P_ℓk(o), P_ℓk(t))] / (1 + Σ_k 2^−k)

over the pyramid levels ℓ ∈ (4, 2, 1) with ℓ < H, in that order (k = 1, 2, …
counts the levels kept), `P_ℓ` = adaptive average pooling to ℓ×ℓ, MSE =
mean over every element. Convention (mdistiller `hcl_loss`): a level equal
to (or above) the map's height H is skipped, not pooled to itself, and
adaptive pooling to a size that does not divide H averages overlapping bins
(bin i spans rows ⌊iH/ℓ⌋ … ⌈(i+1)H/ℓ⌉−1).

    L = CE + w·min((e+1)/(warmup·E), 1)·Σ_levels HCL

`e` the 0-based epoch, `E` the run's epochs: mdistiller's
`min(epoch / WARMUP_EPOCHS, 1)` with its 1-based epoch, so the first epoch
already carries 1/(warmup·E) of the weight; `warmup` is 20/240 (its 20
warm-up epochs of 240) as a fraction; 0 turns the warm-up off. `w = 5`
is mdistiller's `configs/cifar100/reviewkd.yaml` (its cfg.py default is 1).

Reference: mdistiller (megvii-research/mdistiller @ a08d46f)
`mdistiller/distillers/ReviewKD.py`, `configs/cifar100/reviewkd.yaml`,
`mdistiller/engine/cfg.py`. mdistiller's spatial sizes (`SHAPES`,
`OUT_SHAPES`) and channels come from its per-architecture config; here they
come from the pair's stage shapes, with H×W in place of its square sizes.

Diagnostics per epoch: `hcl_loss` (unweighted Σ HCL) and `warmup` (the factor).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import needs_spatial, promote
from .ofd import aligned_stages
from .space import FloatRange

PYRAMID = (4, 2, 1)
MAX_MID_CHANNELS = 512


def hcl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """One level's hierarchical context loss (see the module docstring)."""
    s, t = promote(student), promote(teacher)
    dtype = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dtype), t.to(dtype)
    h = s.shape[2]
    loss, weight, total = F.mse_loss(s, t), 1.0, 1.0
    for level in PYRAMID:
        if level >= h:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        total += weight
    return loss / total


def hcl_loss(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    return sum(hcl(s, t) for s, t in zip(students, teachers))


def warmup_factor(warmup: float, step: StepInfo | None) -> float:
    """mdistiller's min(epoch/warmup_epochs, 1), its epoch 1-based, the warm-up a fraction of the run."""
    if step is None or warmup == 0:
        return 1.0
    return min((step.epoch + 1) / (warmup * step.total_epochs), 1.0)


class ABF(nn.Module):
    """Attention-based fusion of one level (see the module docstring)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKDParams(MethodParams):
    reviewkd_weight: float = Field(5.0, ge=0, description="weight w of Σ HCL (mdistiller's CIFAR-100 config)")
    warmup: float = Field(20 / 240, ge=0, lt=1, description="fraction of the epochs over which w ramps up")
    student_preact: bool = Field(False, description="student levels from pre-activations (mdistiller's STU_PREACT)")


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, 1)


class ReviewKD(Distiller):
    name = "reviewkd"
    Params = ReviewKDParams
    space = {"reviewkd_weight": FloatRange(0.5, 20.0, log=True), "warmup": FloatRange(0.0, 0.3)}
    reference = ("Chen et al., CVPR 2021; mdistiller mdistiller/distillers/ReviewKD.py @ a08d46f; ABF review path "
                 "over the aligned stages + pooled level, HCL skips pyramid levels ≥ H, overlapping adaptive bins, "
                 "weight ramp min(epoch/warm-up, 1)")

    def __init__(self, student, teacher, params: ReviewKDParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = aligned_stages(pair.student_stages, pair.teacher_stages)
        s_shapes = [pair.student_stages[s] for s, _ in self.pairs]
        t_shapes = [pair.teacher_stages[t] for _, t in self.pairs]
        in_channels = [x.channels for x in s_shapes] + [s_shapes[-1].channels]
        out_channels = [x.channels for x in t_shapes] + [t_shapes[-1].channels]
        self.out_sizes = [(x.height, x.width) for x in t_shapes] + [(1, 1)]
        mid = min(MAX_MID_CHANNELS, in_channels[-1])
        # shallow → deep; the deepest (pooled) level has nothing below it to fuse
        self.abfs = nn.ModuleList(ABF(c_in, mid, c_out, fuse=k < len(in_channels) - 1)
                                  for k, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))

    @classmethod
    def check_pair(cls, params: ReviewKDParams, pair: PairInfo) -> str | None:
        for who, shapes in (("student", pair.student_stages), ("teacher", pair.teacher_stages)):
            if not needs_spatial(shapes):
                return (f"reviewkd needs spatial feature maps (B×C×H×W) and the {who} has none "
                        f"(its stages are B×D vectors, as in an MLP); use kd, fitnets or adversarial")
        return None

    def review(self, student_levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs per level, shallow → deep, computed from the deepest level up."""
        outputs: list[torch.Tensor] = []
        residual = None
        for k in reversed(range(len(self.abfs))):
            out, residual = self.abfs[k](student_levels[k], residual, self.out_sizes[k])
            outputs.insert(0, out)
        return outputs

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: ReviewKDParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        student_maps = out.preact if p.student_preact else out.stages
        student_levels = [student_maps[s] for s, _ in self.pairs] + [_pooled(out.stages[self.pairs[-1][0]])]
        teacher_levels = [teacher.preact[t] for _, t in self.pairs] + [_pooled(teacher.stages[self.pairs[-1][1]])]
        loss = hcl_loss(self.review(student_levels), teacher_levels)
        factor = warmup_factor(p.warmup, step)
        self.record("hcl_loss", loss.detach())
        self.record("warmup", factor)
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels),
                            "loss_reviewkd": p.reviewkd_weight * factor * loss}
