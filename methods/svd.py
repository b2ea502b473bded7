"""SVD distilled feature vectors (Lee, Kim, Song, ECCV 2018).

Distilled stages: every spatial stage, student and teacher paired by
relative depth (`features.paired_stages`); at least two are needed, as the
loss relates adjacent stages. Where a pair's H×W differ, the larger map is
average-pooled to the smaller. Where channel counts differ, a training-only
1×1 conv adapter (no bias) maps the student's map to the teacher's channels
(outside `student.`: counted in `extra_params`, trained by the student's
optimizer, never deployed). The maps are each stage's output after its
activation (`StageOutput.stages`).

Per distilled stage `l`, `F^l` (B×C×H×W) becomes `X` (B×HW×C) and a thin SVD
`X = UΣVᵀ` gives right singular vectors (columns of `V`, channel space):

1. Teacher: top `k` vectors (`k = dfv`), student: top `k + 3` candidates,
   each normalised to unit length; `σ̃ = σ_t[:k] / ‖σ_t[:k]‖`.
   Clamping: a stage has only `r = min(HW, C)` singular vectors, and the
   kernel of step 4 pairs DFV `j` of adjacent stages, so one `k` serves all
   stages: `k = min(dfv, min_l r_l)`, and the candidates of stage `l` are
   `min(k + 3, r_l)`. (Default digits pair: 2×2 last stage, so r = 4 and
   dfv = 8 runs as k = 4 with 4 candidates there.)
2. Teacher signs are canonicalised (each vector's largest-magnitude entry
   positive). With `M = V_sᵀV_t` ((k+3)×k), teacher vector `j` takes the
   student candidate `i* = argmax_i |M_ij|`, flipped by `sign(M_i*j)`
   (two teacher vectors may take the same candidate).
3. DFVs `d_t^j = σ̃_t^j·v_t^j`, `d_s^j = σ̃_t^j·v̂_s^j` (teacher σ̃ for both).
4. Adjacent stages are related by an element-wise RBF kernel
   `K_l[b,m,n,j] = exp(−(d^l[b,m,j] − d^{l+1}[b,n,j])² / w)`, `m` over the
   channels of stage `l`, `n` over those of stage `l+1`, `w = kernel_width`.
5. `L_SVD = mean_b Σ_l Σ_{m,n,j} (K_s^l − K_t^l)²`, non-finite entries zeroed.

The SVD runs in float64 (the DFVs, entries in [−1, 1], then go back to
float32 for the kernel), autocast off. Its backward (`GuardedSVD`) is the
analytic SVD gradient with the two divisions that blow up regularised:
`1/E` for `E = σ_k² − σ_j²` becomes `E/(E² + δ²)` with `δ = 1e-4·σ_max²`,
and `1/σ` becomes `σ/(σ² + (1e-4·σ_max)²)`; anything non-finite left is
zeroed. Where a gap is ≥ 1% of `σ_max²` this is the exact gradient to a
relative 1e-4; it is at most `1/(2δ)` where values (nearly) coincide — there
the singular vectors are not unique, and the exact gradient is inf/NaN.

Training (`stages`):
- 1: `CE + svd_weight·L_SVD`. With `clip` (the paper's multi-task rule), the
  gradient of each student parameter tensor θ is
  `∇_θCE + clip(∇_θ(svd_weight·L_SVD), ‖∇_θCE‖·sigmoid(epoch))`,
  `clip(g, c) = g·min(1, c/‖g‖)`, `epoch` 0-based (the first epoch lets the
  distillation gradient reach half the CE gradient's norm). Adapters only
  see `L_SVD` and take its gradient unclipped.
- 2: `svd_weight·L_SVD` alone for `round(init_epochs·epochs)` epochs
  (clamped to 1..epochs−1), then `CE` alone; no clipping (one loss at a time).

Diagnostics per epoch: `svd_loss` (`L_SVD` without `svd_weight`, in epochs
that compute it), `stage`, and with clipping `clip_ratio`, the mean over
student parameter tensors of the fraction `min(1, c/‖g‖)` of the
distillation gradient kept.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, paired_stages, pool_to_match, promote
from .fsp import channel_adapters, stage_one_epochs
from .space import Choice, FloatRange

SVD_EPS = 1e-4  # relative regulariser of the SVD backward's divisions
CANDIDATES_EXTRA = 3  # student candidates beyond k (the paper's k + 3)


class GuardedSVD(torch.autograd.Function):
    """Thin SVD of a batch of matrices, returning (σ, V), with a backward that stays finite.

    Backward (gradient of U unused, so zero): with `E_jk = σ_k² − σ_j²`,
    `∇X = U [diag(∇σ) + diag(σ)·(skew(Vᵀ∇V) ∘ 1/E)] Vᵀ + U diag(1/σ) ∇Vᵀ (I − VVᵀ)`,
    `skew(A) = A − Aᵀ`, where `1/E` and `1/σ` are regularised (module docstring).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.mT
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor | None, grad_v: torch.Tensor | None):
        u, s, v = ctx.saved_tensors
        tiny = torch.finfo(s.dtype).tiny
        top = s[..., :1]  # σ_max of each matrix
        inner = torch.zeros(s.shape + s.shape[-1:], dtype=s.dtype, device=s.device)
        if grad_s is not None:
            inner = inner + torch.diag_embed(grad_s)
        grad_x = None
        if grad_v is not None:
            s2 = s * s
            e = s2.unsqueeze(-2) - s2.unsqueeze(-1)
            delta = (SVD_EPS * top * top).unsqueeze(-1) + tiny
            inv_e = e / (e * e + delta * delta)
            vtg = v.mT @ grad_v
            inner = inner + s.unsqueeze(-1) * (vtg - vtg.mT) * inv_e
            inv_s = s / (s * s + (SVD_EPS * top) ** 2 + tiny)
            residual = grad_v.mT - (grad_v.mT @ v) @ v.mT  # ∇Vᵀ (I − VVᵀ)
            grad_x = u @ (inv_s.unsqueeze(-1) * residual)
        out = u @ inner @ v.mT
        if grad_x is not None:
            out = out + grad_x
        return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def _nonzero_sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


def canonical_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each column of B×C×k `v` so that its largest-magnitude entry is positive."""
    idx = v.abs().argmax(dim=1, keepdim=True)
    return v * _nonzero_sign(v.gather(1, idx))


def align(candidates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For each column j of B×C×k `target`, the column of B×C×c `candidates` most (anti)parallel to it, sign-fixed.

    `M = candidatesᵀ·target`; column j gets candidate `i* = argmax_i |M_ij|` times `sign(M_i*j)`.
    """
    m = candidates.mT @ target  # B×c×k
    best = m.abs().argmax(dim=1, keepdim=True)  # B×1×k
    picked = candidates.gather(2, best.expand(-1, candidates.shape[1], -1))
    return picked * _nonzero_sign(m.gather(1, best)).detach()


def rbf(a: torch.Tensor, b: torch.Tensor, width: float) -> torch.Tensor:
    """`K[b,m,n,j] = exp(−(a[b,m,j] − b[b,n,j])² / width)` for B×C₁×k `a` and B×C₂×k `b`."""
    return torch.exp(-(a.unsqueeze(2) - b.unsqueeze(1)).pow(2) / width)


def svd_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], k: int, width: float) -> torch.Tensor:
    """`L_SVD` of matched lists of B×C×H×W maps (equal channels per stage; H×W pooled to match)."""
    d_s, d_t = [], []
    dtype = promote(student_maps[0]).dtype  # the SVD runs in float64; the loss in the inputs' precision, at least float32
    for fs, ft in zip(student_maps, teacher_maps):
        fs, ft = pool_to_match(fs, ft)
        xs = fs.double().flatten(2).mT  # B×HW×C
        xt = ft.detach().double().flatten(2).mT
        with torch.no_grad():
            _, s_t, vh_t = torch.linalg.svd(xt, full_matrices=False)
            v_t = canonical_signs(_unit(vh_t.mT[..., :k], dim=1))
            sigma = _unit(s_t[..., :k], dim=-1).unsqueeze(1)  # B×1×k
        _, v_s = GuardedSVD.apply(xs)
        v_s = _unit(v_s[..., :min(k + CANDIDATES_EXTRA, v_s.shape[-1])], dim=1)
        d_t.append((sigma * v_t).to(dtype))
        d_s.append((sigma * align(v_s, v_t)).to(dtype))
    total = student_maps[0].new_zeros((), dtype=dtype)
    for l in range(len(d_s) - 1):
        diff = rbf(d_s[l], d_s[l + 1], width) - rbf(d_t[l], d_t[l + 1], width)
        sq = torch.nan_to_num(diff.pow(2), nan=0.0, posinf=0.0, neginf=0.0)
        total = total + sq.sum(dim=(1, 2, 3)).mean()
    return total


class SVDParams(MethodParams):
    dfv: int = Field(1, ge=1, description="number k of distilled feature vectors per stage (clamped to min(HW, C))")
    kernel_width: float = Field(8.0, gt=0, description="RBF kernel width w")
    svd_weight: float = Field(1.0, ge=0, description="weight of L_SVD (0 with stages=1: the baseline)")
    clip: bool = Field(True, description="multi-task gradient clipping of the distillation gradient (stages=1)")
    stages: Literal[1, 2] = Field(1, description="1: CE + weight·L_SVD; 2: L_SVD alone for init_epochs, then CE")
    init_epochs: float = Field(0.2, gt=0, lt=1, description="fraction of the epochs spent on L_SVD alone (stages=2)")


class SVD(Distiller):
    name = "svd"
    Params = SVDParams
    reference = ("Lee, Kim, Song, ECCV 2018; RepDistiller distiller_zoo/KDSVD.py @ b84f547 (RBF width 8, squared "
                 "differences summed / B) and the authors' TF sseung0703/SSKD_SVD nets/Distillation.py, train.py @ "
                 "59184b4 (gradient clipping by ‖∇CE‖·sigmoid(epoch)); their TF loss is ½·Σ·√k, summed over the batch")
    space = {
        "dfv": Choice((1, 2, 4, 8)),
        "kernel_width": FloatRange(1.0, 32.0, log=True),
        "svd_weight": FloatRange(0.1, 10.0, log=True),
        "clip": Choice((True, False)),
        "stages": Choice((1, 2)),
    }

    def __init__(self, student, teacher, params: SVDParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        self.pairs = paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)
        self.adapters = channel_adapters(self.pairs, pair)
        self.k = min(params.dfv, *(self._rank(s, t) for s, t in self.pairs))

    def _rank(self, s: int, t: int) -> int:
        ss, ts = self.pair.student_stages[s], self.pair.teacher_stages[t]
        return min(ss.height * ss.width, ts.height * ts.width, ts.channels)

    @classmethod
    def check_pair(cls, params: SVDParams, pair: PairInfo) -> str | None:
        if not any(s.spatial for s in pair.student_stages) or not any(s.spatial for s in pair.teacher_stages):
            who = "student" if not any(s.spatial for s in pair.student_stages) else "teacher"
            return f"svd needs spatial feature maps (B×C×H×W) in both networks; the {who} has none"
        if len(paired_stages(pair.student_stages, pair.teacher_stages, spatial_only=True)) < 2:
            return "svd needs at least 2 spatial stages in both networks (its kernel relates adjacent stages)"
        return None

    def distill_loss(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        with full_precision(student_maps[0].device):
            s = [a(promote(student_maps[i])) for a, (i, _) in zip(self.adapters, self.pairs)]
            t = [promote(teacher_maps[j]) for _, j in self.pairs]
            return svd_loss(s, t, self.k, self.params.kernel_width)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo):
        p: SVDParams = self.params
        out = self.student.forward_stages(images)
        if p.stages == 2 and step.epoch >= stage_one_epochs(p.init_epochs, step.total_epochs):
            self.record("stage", 2)
            return out.logits, {"loss_ce": cross_entropy(out.logits, labels)}
        loss = self.distill_loss(out.stages, self.teacher_forward(images).stages)
        self.record("svd_loss", loss.detach())
        self.record("stage", 1)
        if p.stages == 2:
            return out.logits, {"loss_svd": p.svd_weight * loss}
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_svd": p.svd_weight * loss}

    def backward(self, losses: dict[str, torch.Tensor], step: StepInfo) -> None:
        if not (self.params.clip and "loss_ce" in losses and "loss_svd" in losses):
            return super().backward(losses, step)
        student = [p for p in self.student.parameters() if p.requires_grad]
        extra = [p for p in self.adapters.parameters() if p.requires_grad]
        g_ce = torch.autograd.grad(losses["loss_ce"], student, retain_graph=True, allow_unused=True)
        g_kd = torch.autograd.grad(losses["loss_svd"], student + extra, allow_unused=True)
        ratios = clip_gradients(student, g_ce, g_kd[:len(student)], 1.0 / (1.0 + math.exp(-step.epoch)))
        for p, g in zip(extra, g_kd[len(student):]):
            p.grad = None if g is None else torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        if ratios is not None:
            self.record("clip_ratio", ratios)


def clip_gradients(params: list[nn.Parameter], main: tuple, distill: tuple, factor: float) -> torch.Tensor | None:
    """Write `p.grad = g_main + g_distill·min(1, factor·‖g_main‖/‖g_distill‖)` per tensor; return the mean kept fraction.

    Missing gradients count as zero. The fraction is averaged over the
    tensors that have a nonzero distillation gradient (None if there are none).
    """
    kept = []
    for p, gm, gd in zip(params, main, distill):
        if gd is None:
            p.grad = gm
            continue
        gd = torch.nan_to_num(gd, nan=0.0, posinf=0.0, neginf=0.0)
        gm = torch.zeros_like(p) if gm is None else gm
        norm = gd.norm()
        ratio = torch.where(norm > 0, (factor * gm.norm() / norm.clamp_min(1e-30)).clamp(max=1.0), 1.0)
        p.grad = gm + gd * ratio
        kept.append(torch.where(norm > 0, ratio, float("nan")))
    if not kept:
        return None
    kept_t = torch.stack(kept)
    valid = ~torch.isnan(kept_t)
    return kept_t[valid].mean() if valid.any() else None
