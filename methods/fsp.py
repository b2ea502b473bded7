"""FSP matrices: the flow of solution procedure (Yim, Joo, Bae, Kim, CVPR 2017).

For two feature maps of one network with equal H×W, `F¹` (m channels) and
`F²` (n channels), the FSP matrix of a sample is the m×n matrix
`G[i,j] = Σ_{s,t} F¹[s,t,i]·F²[s,t,j] / (h·w)`.

Layer pairs are consecutive distilled stages: the student's and teacher's
spatial stages are paired by relative depth (`features.paired_stages`) and
pair `k` is (stage `k`, stage `k+1`) of that list, in each network. Within a
pair the larger map is average-pooled to the smaller one's H×W. The maps are
each stage's output after its activation (`StageOutput.stages`).

`L_FSP = mean_x Σ_k w_k ‖G_t^k − G_s^k‖²`: the squared entries are SUMMED
over each m×n matrix, as in the paper (code that averages over entries
instead is smaller by a factor m·n), then averaged over the batch. `w_k` is
`pair_weights[k]` (default 1 for every pair: the paper's equal λ_i).

Where teacher and student channel counts differ at a stage, a training-only
1×1 conv adapter (no bias) maps the student's map to the teacher's channel
count before its FSP matrices are formed. Adapters live outside `student.`:
they count as `extra_params`, are trained by the student's optimizer and are
never deployed.

Training (`stages`):
- 2 (the paper): for the first `n₁ = round(init_epochs · epochs)` epochs —
  clamped to 1..epochs−1 so that both stages run (a 1-epoch run is CE
  only) — the loss is `fsp_weight · L_FSP` alone (the student learns the
  teacher's flow; `fsp_weight` then acts as that stage's step size); the
  remaining epochs train on `CE` alone, without running the teacher.
- 1: `CE + fsp_weight · L_FSP` throughout (`fsp_weight = 0` is the baseline).

Diagnostics per epoch: `fsp_loss` (`L_FSP` without `fsp_weight`, in epochs
that compute it) and `stage` (1 or 2; always 1 in the one-stage variant).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, paired_stages, pool_to_match, promote
from .space import Choice, FloatRange


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """B×m×n FSP matrices of two B×C×H×W maps; the larger map is average-pooled to the smaller's H×W."""
    first, second = pool_to_match(first, second)
    h, w = first.shape[-2:]
    return torch.einsum("bihw,bjhw->bij", first, second) / (h * w)


def stage_one_epochs(fraction: float, total_epochs: int) -> int:
    """Epochs of a two-stage method's first stage: round(fraction·total), kept within 1..total−1."""
    if total_epochs < 2:
        return 0
    return min(max(1, int(fraction * total_epochs + 0.5)), total_epochs - 1)


def channel_adapters(pairs: list[tuple[int, int]], pair: PairInfo) -> nn.ModuleList:
    """Per (student, teacher) stage pair: a 1×1 conv (no bias) to the teacher's channels, or Identity if equal."""
    return nn.ModuleList(
        nn.Identity() if pair.student_stages[s].channels == pair.teacher_stages[t].channels
        else nn.Conv2d(pair.student_stages[s].channels, pair.teacher_stages[t].channels, 1, bias=False)
        for s, t in pairs
    )


class FSPParams(MethodParams):
    fsp_weight: float = Field(0.01, ge=0, description="weight λ of L_FSP (0 with stages=1: the baseline)")
    pair_weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="per layer-pair weights w_k, one per consecutive stage pair (default: 1 each)")
    stages: Literal[1, 2] = Field(2, description="2: L_FSP alone for init_epochs, then CE; 1: CE + λ·L_FSP")
    init_epochs: float = Field(0.2, gt=0, lt=1, description="fraction of the epochs spent on L_FSP alone (stages=2)")


class FSP(Distiller):
    name = "fsp"
    Params = FSPParams
    reference = ("Yim et al., CVPR 2017 (two-stage: FSP then CE); RepDistiller distiller_zoo/FSP.py @ b84f547 for the "
                 "matrices and pooling; squared entries summed over each m×n matrix as in the paper, where RepDistiller "
                 "averages them (ours = theirs × m·n); 1×1 adapters where channel counts differ")
    space = {
        "fsp_weight": FloatRange(1e-3, 10.0, log=True),
        "stages": Choice((1, 2)),
        "init_epochs": FloatRange(0.05, 0.3),
    }

    def __init__(self, student, teacher, params: FSPParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)
        self.adapters = channel_adapters(self.pairs, pair)
        n = len(self.pairs) - 1
        self.register_buffer("pair_weight", torch.tensor(params.pair_weights or [1.0] * n), persistent=False)

    @classmethod
    def check_pair(cls, params: FSPParams, pair: PairInfo) -> str | None:
        pairs = paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)
        if not any(s.spatial for s in pair.student_stages) or not any(s.spatial for s in pair.teacher_stages):
            who = "student" if not any(s.spatial for s in pair.student_stages) else "teacher"
            return f"fsp needs spatial feature maps (B×C×H×W) in both networks; the {who} has none"
        if len(pairs) < 2:
            return "fsp needs at least 2 spatial stages in both networks to form a layer pair"
        if params.pair_weights is not None and len(params.pair_weights) != len(pairs) - 1:
            return (f"pair_weights has {len(params.pair_weights)} entries but this pair has "
                    f"{len(pairs) - 1} FSP layer pairs; give one weight per pair")
        return None

    def fsp_loss(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        """`L_FSP = mean_b Σ_k w_k ‖G_t^k − G_s^k‖²` (entries summed) over the distilled stages."""
        with full_precision(student_maps[0].device):
            s = [a(promote(student_maps[i])) for a, (i, _) in zip(self.adapters, self.pairs)]
            t = [promote(teacher_maps[j]) for _, j in self.pairs]
            total = s[0].new_zeros(())
            for k in range(len(self.pairs) - 1):
                diff = fsp_matrix(t[k], t[k + 1]) - fsp_matrix(s[k], s[k + 1])
                total = total + self.pair_weight[k] * diff.pow(2).sum(dim=(1, 2)).mean()
        return total

    def classifier_free_epochs(self, total_epochs: int) -> int:
        p: FSPParams = self.params
        return stage_one_epochs(p.init_epochs, total_epochs) if p.stages == 2 else 0

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        p: FSPParams = self.params
        out = self.student.forward_stages(images)
        first = stage_one_epochs(p.init_epochs, step.total_epochs)
        if p.stages == 2 and step.epoch >= first:
            self.record("stage", 2)
            return out.logits, {"loss_ce": cross_entropy(out.logits, labels)}
        teacher = self.teacher_forward(images)
        loss = self.fsp_loss(out.stages, teacher.stages)
        self.record("fsp_loss", loss.detach())
        self.record("stage", 1)
        if p.stages == 2:
            return out.logits, {"loss_fsp": p.fsp_weight * loss}
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_fsp": p.fsp_weight * loss}
