"""Small builders the method tests share: digits-shaped (1×8×8, 10 classes) models and their pair info."""

from __future__ import annotations

import torch

from kdarena.methods import PairInfo
from kdarena.zoo.models import StagedModel, build_model, stage_shapes

CPU = torch.device("cpu")


def digits_model(arch: str, seed: int, **options) -> StagedModel:
    torch.manual_seed(seed)
    return build_model(arch, num_classes=10, in_channels=1, input_size=8, **options)


def digits_cnn(seed: int, channels: int = 8) -> StagedModel:
    return digits_model("cnn", seed, channels=channels)


def digits_pair(student: StagedModel, teacher: StagedModel) -> PairInfo:
    return PairInfo(stage_shapes(student, 1, 8), stage_shapes(teacher, 1, 8), 10, 1, 8)


def uninterrupted_and_resumed(make_distiller, data, recipe, tmp_path, stop_after: int = 1):
    """(FitResult of an uninterrupted run, FitResult of a run interrupted after `stop_after` epochs and resumed).

    `make_distiller()` builds a fresh distiller (fresh weights) each time, as a new process would.
    """
    import pytest

    from kdarena.methods.engine import fit

    def run(ckpt, stop=None):
        def on_epoch(e):
            if stop is not None and e.epoch + 1 == stop:
                raise KeyboardInterrupt
        return fit(make_distiller(), data, recipe, device=CPU, checkpoint_path=ckpt, on_epoch=on_epoch)

    full = run(tmp_path / "uninterrupted.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed.pt", stop=stop_after)
    torch.manual_seed(1234)  # a new process: its own random state; the checkpoint carries the rest
    return full, run(tmp_path / "resumed.pt")
