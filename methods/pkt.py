"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

PKT matches how each sample's neighbours are distributed in the student's
and the teacher's embedding, not the embeddings themselves. On the
penultimate embeddings `e_i` (B×D; the last stage global-average-pooled
when it is a spatial map, as RepDistiller's `feat[-1]`; an MLP's last
hidden layer as it is), with the cosine-similarity kernel scaled to [0, 1]:

    x̂_i    = e_i / (‖e_i‖₂ + ε)
    K_ij   = (⟨x̂_i, x̂_j⟩ + 1) / 2
    P_ij   = K_ij / Σ_j K_ij                     (row i: a distribution over j, self included)
    L_PKT  = 1/B² · Σ_i Σ_j P^t_ij · log((P^t_ij + ε) / (P^s_ij + ε))
    L      = CE + β·L_PKT

Convention (RepDistiller `distiller_zoo/PKT.py` @ b84f547, the authors'
code, also mdistiller `mdistiller/distillers/PKT.py` @ a08d46f): the KL is a
plain mean over the B² entries, i.e. the batch-mean of the rows' KL
divergences divided by B once more; ε = 1e-7 inside the logarithm and the
norms. β = 30000 is RepDistiller's `-b 30000` for CIFAR-100 (mdistiller's
FEAT_WEIGHT too), which compensates that 1/B² and the small KLs. The
teacher's distribution carries no gradient. Deviation: the reference sets
NaN entries of the normalised embeddings to 0; a NaN can only come from a
NaN embedding here (ε keeps zero vectors at zero), and it is left to reach
the loss so that the engine stops the run as diverged instead of hiding it.
The norm's gradient at a zero embedding is 0 (the reference's `sqrt` gives
NaN there). Products run with autocast off, in at least float32, never demoted.

Diagnostics per epoch: `pkt_loss`, the unweighted L_PKT.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import Distiller, MethodParams, PairInfo, StepInfo, cross_entropy
from .features import full_precision, pooled_embedding, promote
from .space import FloatRange

EPS = 1e-7


def conditional_probabilities(e: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """B×B: row i is sample i's cosine kernel to every sample, scaled to [0, 1] and normalised to sum 1."""
    x = e / (torch.linalg.vector_norm(e, dim=1, keepdim=True) + eps)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean over the B² entries of P_t·log((P_t+ε)/(P_s+ε)), on two B×D embeddings (any D each)."""
    with full_precision(student.device):
        dtype = torch.promote_types(promote(student).dtype, promote(teacher).dtype)
        s, t = student.flatten(1).to(dtype), teacher.flatten(1).to(dtype)
        with torch.no_grad():
            p_t = conditional_probabilities(t, eps)
        p_s = conditional_probabilities(s, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKTParams(MethodParams):
    pkt_weight: float = Field(30000.0, ge=0, description="weight β of L_PKT (a mean over B² entries)")


class PKT(Distiller):
    name = "pkt"
    Params = PKTParams
    space = {"pkt_weight": FloatRange(3e3, 3e5, log=True)}
    reference = ("Passalis & Tefas, ECCV 2018; RepDistiller distiller_zoo/PKT.py @ b84f547 on the pooled penultimate "
                 "embedding; KL as a mean over B² entries (batch-mean KL / B)")

    @classmethod
    def check_pair(cls, params: PKTParams, pair: PairInfo) -> str | None:
        return None  # similarities between samples: any embedding widths, spatial or not

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, step: StepInfo | None):
        p: PKTParams = self.params
        out = self.student.forward_stages(images)
        teacher = self.teacher_forward(images)
        loss = pkt_loss(pooled_embedding(out.stages[-1]), pooled_embedding(teacher.stages[-1]))
        self.record("pkt_loss", loss.detach())
        return out.logits, {"loss_ce": cross_entropy(out.logits, labels), "loss_pkt": p.pkt_weight * loss}
