"""Multi-Level Logit Distillation (Jin, Wang, Lin, CVPR 2023).

Logits are aligned at three levels, at several temperatures, on a weakly
and a strongly augmented view of each batch (`w`: the recipe's augmentation;
`s`: `Strong()`, the engine's second view). With `P = softmax(z/τ)` (B×C),

- instance: `KD_τ = τ²·KL(P_t ‖ P_s)`, batch-mean (KD's soft term);
- class: `CC_τ = ‖P_tᵀP_t − P_sᵀP_s‖²_F / C` (C×C class correlations);
- batch: `BC_τ = ‖P_tP_tᵀ − P_sP_sᵀ‖²_F / B` (B×B sample similarities);

over `τ ∈ S = (T, 3, 5, 2, 6)`, T the `temperature` parameter (4). The
prediction-confidence masks come from the teacher's weak-view softmax at
τ = 1: a sample is kept when its top probability is ≤ the batch median, a
class when its summed probability over the batch is ≤ the class median
(medians by linear interpolation, numpy's `percentile(·, 50)`).

    L_ce = w_ce·(CE(z_s^w, y) + CE(z_s^s, y))
    L_kd = w_kd·( m̄·Σ_{τ∈S} KD_τ(w) + Σ_{τ∈{T,3,5}} KD_τ(s) + Σ_{τ∈{2,6}} KD_τ(w) )
    L_cc = w_kd·c̄·Σ_{τ∈S} CC_τ(w)
    L_bc = w_kd·m̄·Σ_{τ∈S} BC_τ(w)

Reference: Jin-Ying/Multi-Level-Logit-Distillation
`mdistiller/distillers/KD_ours.py` @ 5ee473f (the class the README calls
MLKD; `configs/cifar100/ours/*.yaml` and `engine/cfg.py`: CE_WEIGHT 0.1,
KD_WEIGHT 0.9, TEMPERATURE 4; its AugTrainer feeds the weak and the strong
view; sunshangquan/logit-standardization-KD has the same code as
`MLKD.py` @ f6e5aa5). We follow that code, including what differs from a
reading of the paper:
- the masks multiply losses that are already batch-reduced, so `(loss ·
  mask).mean()` is the loss times the kept fraction: `m̄ = mean(mask)` (about
  ½) and `c̄` for classes, not a per-sample selection;
- the "strong" instance sum takes τ ∈ {T, 3, 5} on the strong view and
  τ ∈ {2, 6} on the weak view again, unmasked;
- the class and batch terms use the weak view only (the code computes
  strong-view versions and never adds them to the loss);
- the student and the teacher each run the two views in separate forward
  passes (BatchNorm statistics per view), and the weak-view logits are what
  train accuracy is measured on.

Approximated: the authors' strong view is an independent crop + flip then
PIL RandAugment(2 ops, random magnitude per op) + Cutout (up to half the
side) per sample; ours is `Strong()` — crop + flip and 2 RandAugment-style
batched tensor ops at magnitude 9/30, no Cutout (kdarena.zoo.augment).

`logit_std=True` (Sun et al., CVPR 2024; their `MLKD.py` @ f6e5aa5): the
logits are z-scored per sample (`kd.standardize`) in the instance-level
KD terms only, as the authors do; the class and batch terms and the masks
keep the raw logits. Their CIFAR recipe with it sets T = 2 and KD weight 9.

Cost: two student and two teacher forward passes per step.
Diagnostics per epoch: `sample_kept` (m̄) and `class_kept` (c̄).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kdarena.zoo.augment import Strong

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, promote
from .kd import kd_loss
from .space import Choice, FloatRange

EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # after the `temperature` parameter, in the authors' order
STRONG_VIEW_TEMPERATURES = 3  # the first three of the set use the strong view in the "strong" instance sum


def class_correlation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """‖P_tᵀP_t − P_sᵀP_s‖²_F / C, P = softmax(z/τ)."""
    with full_precision(student_logits.device):
        p_s = (promote(student_logits) / tau).softmax(dim=1)
        p_t = (promote(teacher_logits) / tau).softmax(dim=1)
        return (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / p_s.shape[1]


def batch_correlation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """‖P_tP_tᵀ − P_sP_sᵀ‖²_F / B, P = softmax(z/τ)."""
    with full_precision(student_logits.device):
        p_s = (promote(student_logits) / tau).softmax(dim=1)
        p_t = (promote(teacher_logits) / tau).softmax(dim=1)
        return (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / p_s.shape[0]


def kept_fractions(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m̄, c̄): the fraction of samples whose top teacher probability is ≤ the median, and of classes whose
    summed probability is ≤ the median; softmax at τ = 1, medians interpolated linearly."""
    with torch.no_grad():
        p = promote(teacher_logits).softmax(dim=1)
        confidence = p.max(dim=1).values
        class_confidence = p.sum(dim=0)
        sample_kept = (confidence <= torch.quantile(confidence, 0.5)).to(p.dtype).mean()
        class_kept = (class_confidence <= torch.quantile(class_confidence, 0.5)).to(p.dtype).mean()
    return sample_kept, class_kept


def mlkd_losses(weak: tuple[torch.Tensor, torch.Tensor], strong: tuple[torch.Tensor, torch.Tensor],
                temperature: float, logit_std: bool = False) -> dict[str, torch.Tensor]:
    """The unweighted level sums `{"kd", "cc", "bc"}` (before w_kd) and the kept fractions `{"m", "c"}`.

    `weak` and `strong` are (student logits, teacher logits) of each view.
    """
    (s_w, t_w), (s_s, t_s) = (tuple(promote(z) for z in view) for view in (weak, strong))
    temps = (temperature, *EXTRA_TEMPERATURES)
    m, c = kept_fractions(t_w)
    kd_weak = sum(kd_loss(s_w, t_w, tau, logit_std) for tau in temps)
    kd_strong = sum(kd_loss(s_s, t_s, tau, logit_std) for tau in temps[:STRONG_VIEW_TEMPERATURES])
    kd_strong = kd_strong + sum(kd_loss(s_w, t_w, tau, logit_std) for tau in temps[STRONG_VIEW_TEMPERATURES:])
    return {
        "kd": m * kd_weak + kd_strong,
        "cc": c * sum(class_correlation(s_w, t_w, tau) for tau in temps),
        "bc": m * sum(batch_correlation(s_w, t_w, tau) for tau in temps),
        "m": m,
        "c": c,
    }


class MLKDParams(MethodParams):
    ce_weight: float = Field(0.1, ge=0, description="weight of CE on each view")
    kd_weight: float = Field(0.9, ge=0, description="weight of every instance-, class- and batch-level term")
    temperature: float = Field(4.0, gt=0, description="the first temperature T of the set (T, 3, 5, 2, 6)")
    logit_std: bool = Field(False, description="z-score logits in the instance-level terms (Sun et al. 2024)")


class MLKD(Distiller):
    name = "mlkd"
    Params = MLKDParams
    reference = ("Jin et al., Multi-Level Logit Distillation, CVPR 2023; Jin-Ying/Multi-Level-Logit-Distillation "
                 "mdistiller/distillers/KD_ours.py @ 5ee473f; τ ∈ (T,3,5,2,6), KD ×τ², masks as kept fractions, "
                 "strong view approximated by batched RandAugment-style ops")
    space = {
        "temperature": FloatRange(1.0, 8.0, log=True),
        "kd_weight": FloatRange(0.1, 10.0, log=True),
        "logit_std": Choice((False, True)),
    }
    strong_view = Strong()

    @classmethod
    def check_pair(cls, params: MLKDParams, pair: PairInfo) -> str | None:
        if pair.num_classes < 2:
            return f"mlkd's class-level alignment and confidence masks need at least 2 classes; the data has {pair.num_classes}"
        return None

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: MLKDParams = self.params
        if step is None or step.strong_images is None:
            raise ValueError("mlkd needs the strong view of each batch (StepInfo.strong_images): "
                             "the engine supplies it because MLKD sets strong_view")
        weak = self.student(images)
        strong = self.student(step.strong_images)
        t_weak = self.teacher_forward(images).logits
        t_strong = self.teacher_forward(step.strong_images).logits
        terms = mlkd_losses((weak, t_weak), (strong, t_strong), p.temperature, p.logit_std)
        self.record("sample_kept", terms["m"])
        self.record("class_kept", terms["c"])
        return weak, {
            "loss_ce": p.ce_weight * (cross_entropy(weak, labels) + cross_entropy(strong, labels)),
            "loss_kd": p.kd_weight * terms["kd"],
            "loss_cc": p.kd_weight * terms["cc"],
            "loss_bc": p.kd_weight * terms["bc"],
        }
