"""Distillation methods, one file each, and the engine that trains any of them.

Adding a method: one file with a `Distiller` subclass, one line here, its tests.
"""

from __future__ import annotations

from kdarena.zoo.errors import UserError

from .ab import AB
from .adversarial import Adversarial
from .at import AT
from .base import Distiller, MethodParams, PairInfo, StepInfo
from .baseline import Baseline
from .cc import CC
from .crd import CRD
from .ctkd import CTKD
from .dist import DIST
from .dkd import DKD
from .fitnets import FitNets
from .fsp import FSP
from .ft import FT
from .ickd import ICKD
from .kd import KD
from .mlkd import MLKD
from .ofd import OFD
from .nst import NST
from .pkt import PKT
from .reviewkd import ReviewKD
from .rkd import RKD
from .sp import SP
from .svd import SVD
from .vid import VID
from .wasserstein import Wasserstein

METHODS: dict[str, type[Distiller]] = {
    "baseline": Baseline,
    "kd": KD,
    "fitnets": FitNets,
    "fsp": FSP,
    "svd": SVD,
    "adversarial": Adversarial,
    "wasserstein": Wasserstein,
    "at": AT,
    "dkd": DKD,
    "dist": DIST,
    "ctkd": CTKD,
    "mlkd": MLKD,
    "rkd": RKD,
    "pkt": PKT,
    "sp": SP,
    "cc": CC,
    "nst": NST,
    "vid": VID,
    "ab": AB,
    "ft": FT,
    "ofd": OFD,
    "reviewkd": ReviewKD,
    "crd": CRD,
    "ickd": ICKD,
}


def get_method(name: str) -> type[Distiller]:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Distiller", "MethodParams", "PairInfo", "StepInfo", "get_method"]
