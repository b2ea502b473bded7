"""Contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020).

The student's and the teacher's penultimate features are embedded
(`e(x) = normalise(W·x + b)`, one linear head each, `feat_dim` wide) and
contrasted, with noise-contrastive estimation, against a memory bank that
holds one embedding per training image for each network:

    h(v, m) = exp(⟨v, m⟩ / τ) / Z                        (Z fixed on the first batch: mean(exp(⟨v, m⟩/τ))·N)
    L_NCE(v, M) = −1/B · Σ_b [ log h_b⁺/(h_b⁺ + K/N + ε) + Σ_{k=1..K} log (K/N)/(h_bk + K/N + ε) ]
    L_CRD = L_NCE(e_s, M_t) + L_NCE(e_t, M_s)
    L     = CE + α·τ_kd²·KL(p_t^τ ‖ p_s^τ) + β·L_CRD

`h⁺` scores an anchor against its own image's slot in the other network's
bank; the `K` negatives are other training images' slots; `N` is the
training split's size (`pair.num_train`), `ε = 1e-7`. After each step the
batch's slots move towards the new embeddings and are renormalised:
`M[i] ← normalise(m·M[i] + (1−m)·e_i)`, `m = nce_m` (M_s from the student's,
M_t from the teacher's embeddings). The banks start uniform in ±√(3/D).

Reference: RepDistiller (HobbitLong/RepDistiller @ b84f547) `crd/criterion.py`
(`CRDLoss`, `ContrastLoss`, `Embed`), `crd/memory.py` (`ContrastMemory`),
`dataset/cifar100.py` (`CIFAR100InstanceSample`, mode "exact") and
`train_student.py` (feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5; the
loss `γ·CE + α·KD + β·CRD` with γ=1, β=0.8 and α=0 — `-a 1` is its "CRD+KD";
mdistiller's CRD has the same defaults). The features are the last stage's
output, global-average-pooled where it is a map (RepDistiller's `feat[-1]`),
an MLP's last hidden layer as it is — so CRD serves MLPs.

Negatives, as RepDistiller's "exact" mode: the positive is the anchor's own
slot; the K negatives are drawn uniformly among training images of other
classes, without replacement unless K exceeds their number. The engine
passes each batch's training-split indices (`wants_indices`) but not the
split's labels, so the method learns them as batches arrive (a registered
buffer): an image not yet seen counts as a candidate, so in the first epoch
a negative may share the anchor's class (≈1/C of the unseen ones); from
the second epoch on the rule is exact. Draws use the global torch RNG of
the bank's device, which the engine checkpoints, so a resumed run draws the
same negatives. `K = min(nce_k, N − 1)`: on a training split of at most
16384 images (digits: 1295) K is clamped to N − 1, and — K then exceeding
the other classes' count — the draws are with replacement, as the
reference's would be.

State in registered buffers (checkpointed, resumed): both banks (N × D),
the learnt labels (N) and the two Z constants. The scores are computed as
`anchor · bankᵀ` then gathered (B×N products rather than a B×(K+1)×D copy of
the bank: the same numbers, far less memory), in at least float32 with
autocast off (exp(⟨v, m⟩/0.07) needs more than bf16's 8 bits).

Diagnostics per epoch: `crd_loss` (unweighted L_CRD), `positive_score` (the
mean ⟨e_s, M_t⁺⟩ of an anchor with its own slot) and `nce_k` (K as run).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, promote
from .kd import kd_loss
from .space import Choice, FloatRange

EPS = 1e-7


def nce_scores(bank: torch.Tensor, anchors: torch.Tensor, contrast_idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(⟨anchor_b, bank[contrast_idx[b, k]]⟩ / τ), B×(K+1); the bank carries no gradient."""
    dots = anchors @ bank.detach().to(anchors.dtype).t()
    return torch.exp(dots.gather(1, contrast_idx) / temperature)


def nce_loss(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller's ContrastLoss on normalised scores p (B×(K+1), column 0 the positive)."""
    k = p.shape[1] - 1
    noise = k / n_data
    log_positive = torch.log(p[:, 0] / (p[:, 0] + noise + EPS))
    log_negative = torch.log(noise / (p[:, 1:] + noise + EPS))
    return -(log_positive.sum() + log_negative.sum()) / p.shape[0]


def crd_objective(e_s: torch.Tensor, e_t: torch.Tensor, bank_s: torch.Tensor, bank_t: torch.Tensor,
                  contrast_idx: torch.Tensor, z_s: float, z_t: float, temperature: float, n_data: int) -> torch.Tensor:
    """L_CRD = L_NCE(e_s against the teacher's bank) + L_NCE(e_t against the student's bank)."""
    student_side = nce_scores(bank_t, e_s, contrast_idx, temperature) / z_s
    teacher_side = nce_scores(bank_s, e_t, contrast_idx, temperature) / z_t
    return nce_loss(student_side, n_data) + nce_loss(teacher_side, n_data)


class Embed(nn.Module):
    """Linear head then unit L2 norm (RepDistiller's `Embed`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(promote(self.linear(x.flatten(1))), dim=1)


def penultimate(x: torch.Tensor) -> torch.Tensor:
    """The last stage as a B×D vector: a map is global-average-pooled, an MLP's hidden layer taken as is."""
    return F.adaptive_avg_pool2d(x, 1).flatten(1) if x.dim() == 4 else x


class CRDParams(MethodParams):
    crd_weight: float = Field(0.8, ge=0, description="weight β of L_CRD (RepDistiller's -b 0.8)")
    alpha: float = Field(0.0, ge=0, description="weight α of the kd term, added to CE (RepDistiller's -a; 1: CRD+KD)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the kd term")
    feat_dim: int = Field(128, ge=1, description="embedding width D")
    nce_k: int = Field(16384, ge=1, description="negatives per anchor K (clamped to N−1)")
    nce_t: float = Field(0.07, gt=0, description="NCE temperature τ")
    nce_m: float = Field(0.5, ge=0, lt=1, description="memory momentum m")


class CRD(Distiller):
    name = "crd"
    Params = CRDParams
    wants_indices = True
    data_parallel_refusal = ("its memory bank is updated at each batch's training-split indices, so data-parallel "
                             "workers, each training other rows, would hold different banks")
    space = {
        "crd_weight": FloatRange(0.1, 5.0, log=True),
        "alpha": FloatRange(0.0, 1.0),
        "nce_t": FloatRange(0.03, 0.3, log=True),
        "nce_k": Choice((1024, 4096, 16384)),
        "feat_dim": Choice((64, 128, 256)),
    }
    reference = ("Tian et al., ICLR 2020; RepDistiller crd/criterion.py + crd/memory.py @ b84f547 on the pooled "
                 "penultimate feature; 'exact' negatives of other classes, labels learnt as batches arrive; "
                 "K clamped to N−1")

    def __init__(self, student, teacher, params: CRDParams, pair: PairInfo):
        super().__init__(student, teacher, params, pair)
        n, d = pair.num_train, params.feat_dim
        s, t = pair.student_stages[-1], pair.teacher_stages[-1]
        self.embed_s = Embed(s.channels, d)
        self.embed_t = Embed(t.channels, d)
        self.n_data = n
        self.nce_k = min(params.nce_k, n - 1)
        bound = 1.0 / math.sqrt(d / 3)
        self.register_buffer("memory_s", torch.rand(n, d).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_t", torch.rand(n, d).mul_(2 * bound).sub_(bound))
        self.register_buffer("labels", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("z", torch.full((2,), -1.0, dtype=torch.float64))  # Z of the student's, teacher's side

    @classmethod
    def check_pair(cls, params: CRDParams, pair: PairInfo) -> str | None:
        if pair.num_train < 2:
            return (f"crd without indices: its memory bank needs the training split's size and each batch's "
                    f"training-split indices, and this pair carries num_train {pair.num_train}")
        return None

    @torch.no_grad()
    def sample_negatives(self, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B×(K+1) bank rows: each anchor's own, then K images of other classes (see the module docstring)."""
        self.labels[indices] = labels
        candidates = (self.labels.unsqueeze(0) != labels.unsqueeze(1)).float()  # the anchor's own slot excluded
        counts = candidates.sum(1)
        negatives = torch.empty(len(indices), self.nce_k, dtype=torch.long, device=indices.device)
        enough = counts >= self.nce_k
        if enough.any():
            negatives[enough] = torch.multinomial(candidates[enough], self.nce_k, replacement=False)
        if (~enough).any():
            negatives[~enough] = torch.multinomial(candidates[~enough], self.nce_k, replacement=True)
        return torch.cat([indices.unsqueeze(1), negatives], dim=1)

    def contrast(self, e_s: torch.Tensor, e_t: torch.Tensor, indices: torch.Tensor,
                 contrast_idx: torch.Tensor) -> torch.Tensor:
        """L_CRD for embeddings of the images at `indices`, then the momentum update of their slots."""
        p: CRDParams = self.params
        with torch.no_grad():
            if self.z[0] < 0:  # fixed once, from the first batch (RepDistiller's Z_v1, Z_v2)
                self.z[0] = nce_scores(self.memory_t, e_s, contrast_idx, p.nce_t).mean() * self.n_data
                self.z[1] = nce_scores(self.memory_s, e_t, contrast_idx, p.nce_t).mean() * self.n_data
        loss = crd_objective(e_s, e_t, self.memory_s, self.memory_t, contrast_idx,
                             float(self.z[0]), float(self.z[1]), p.nce_t, self.n_data)
        with torch.no_grad():  # out of place: the backward pass still needs the banks the scores were read from
            for name, e in (("memory_s", e_s), ("memory_t", e_t)):
                bank = getattr(self, name)
                moved = bank[indices] * p.nce_m + e.detach().to(bank.dtype) * (1 - p.nce_m)
                setattr(self, name, bank.index_copy(0, indices, F.normalize(moved, dim=1)))
        return loss

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: CRDParams = self.params
        if step is None or step.indices is None:
            raise RuntimeError("crd needs each batch's training-split indices (StepInfo.indices; wants_indices)")
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        with full_precision(images.device):
            e_s = self.embed_s(promote(penultimate(out.stages[-1])))
            e_t = self.embed_t(promote(penultimate(teacher.stages[-1])))
            indices = step.indices.to(self.memory_s.device)
            contrast_idx = self.sample_negatives(indices, labels.to(indices.device))
            with torch.no_grad():
                self.record("positive_score", (e_s * self.memory_t[indices].to(e_s.dtype)).sum(1).mean())
            loss = self.contrast(e_s, e_t, indices, contrast_idx)
        self.record("crd_loss", loss.detach())
        self.record("nce_k", self.nce_k)
        losses = {"loss_ce": cross_entropy(out.logits, labels), "loss_crd": p.crd_weight * loss}
        if p.alpha > 0:
            losses["loss_kd"] = p.alpha * kd_loss(out.logits, teacher.logits, p.temperature)
        return out.logits, losses
