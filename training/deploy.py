"""A finished student made deployable: normalisation folded in front, exported, checked against PyTorch.

The deployed model takes what the loaders start from — raw pixels in [0, 1]
(uint8 / 255), float32 NCHW — and applies the training data's mean/std
itself, so a user feeds it images, not kdarena's statistics. Each format is
written to a hidden file beside its destination, loaded back by its own
runtime (onnxruntime, `torch.jit.load`, `torch.export.load`), run on
batches of 1 and `CHECK_BATCH` images and compared with the PyTorch student;
only a file within `TOLERANCE` takes the destination's name, so a failed
export or check leaves nothing behind.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdarena.zoo.errors import UserError

FORMATS = ("onnx", "torchscript", "exported-program")
TOLERANCE = 1e-4
CHECK_BATCH = 8
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
DEPLOY_EXTRA = "pip install 'kdarena[deploy]'"


class CheckFailed(Exception):
    """The export failed, or its outputs differ from PyTorch's by more than `TOLERANCE` (or are not finite)."""


class Normalised(nn.Module):
    """The student behind its input normalisation: raw [0, 1] pixels in, logits out.

    The same arithmetic as the training loaders' `(x - mean) / std`, so the
    deployed model's logits are the student's as it was evaluated.
    """

    def __init__(self, student: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.student = student
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, len(mean), 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, len(std), 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.student((pixels - self.mean) / self.std)


def normalised(student: nn.Module, card: dict[str, Any]) -> Normalised:
    return Normalised(student, card["input"]["mean"], card["input"]["std"]).eval()


def raw_pixels(card: dict[str, Any], batch: int, seed: int = 0) -> torch.Tensor:
    """A fixed batch of images as the deployed model takes them: uniform in [0, 1], float32 NCHW."""
    inputs = card["input"]
    shape = (batch, inputs["channels"], inputs["size"], inputs["size"])
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def parse_format(name: str) -> str:
    """The format's canonical name (any case), or a UserError listing the formats."""
    if name.lower() not in FORMATS:
        raise UserError(f"--format {name!r} is not a format kdarena exports; choose one of: {', '.join(FORMATS)}")
    return name.lower()


def require_runtime(fmt: str) -> None:
    """ONNX needs the optional `deploy` extra: say so before any work, not after a half-done export."""
    if fmt != "onnx":
        return
    missing = []
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}, which kdarena installs only with its deploy "
                        f"extra: {DEPLOY_EXTRA}")


def check_output(output: Path) -> None:
    """The destination is a file path in an existing folder, or a UserError saying what to give instead."""
    if output.is_dir():
        raise UserError(f"-o {output} is a folder; give the file to write, e.g. -o {output / 'student.onnx'}")
    if not output.parent.is_dir():
        raise UserError(f"-o {output}: its folder {output.parent} does not exist; create it first")


@dataclass
class Exported:
    fmt: str
    path: Path
    max_abs_diff: float
    batches: tuple[int, ...]


def export(model: Normalised, card: dict[str, Any], fmt: str, output: Path) -> Exported:
    """Write `model` as `fmt` to `output` once its runtime's outputs match PyTorch's; CheckFailed if they do not."""
    fmt = parse_format(fmt)
    require_runtime(fmt)
    check_output(output)
    partial = output.with_name(f".{output.name}.partial")
    batches = (1, CHECK_BATCH)
    try:
        try:
            _WRITERS[fmt](model, raw_pixels(card, 2), partial)
            run = _RUNNERS[fmt](partial)
        except Exception as exc:  # the exporters raise their own kinds (dynamo, ONNX, TorchScript): one line each
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise CheckFailed(f"PyTorch could not write or reload the student as {fmt} ({type(exc).__name__}: {first}); "
                              f"{output} was not written; another --format may work") from exc
        diffs = []
        for batch in batches:
            x = raw_pixels(card, batch, seed=batch)
            with torch.no_grad():
                expected = model(x)
            got = torch.as_tensor(run(x))
            if got.shape != expected.shape:
                raise CheckFailed(f"the exported {fmt} model gives logits of shape {tuple(got.shape)} for a batch of "
                                  f"{batch}; PyTorch gives {tuple(expected.shape)}")
            diffs.append(float((got.float() - expected).abs().max()))
        worst = max(diffs) if all(map(math.isfinite, diffs)) else math.nan  # max() would pass a NaN over
        if not worst <= TOLERANCE:
            raise CheckFailed(f"the exported {fmt} model's logits differ from PyTorch's by up to {worst:.3g} "
                              f"(limit {TOLERANCE:g}); {output} was not written")
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return Exported(fmt, output, worst, batches)


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """PyTorch warns on every TorchScript call that TorchScript is deprecated: the user chose the format (the
    README points to exported-program), so the warning is not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def _write_torchscript(model: Normalised, example: torch.Tensor, path: Path) -> None:
    """TorchScript by tracing: the zoo's networks have no data-dependent control flow."""
    with _quiet_jit(), torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example), str(path))


def _batch_dim() -> dict[str, dict[int, Any]]:
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=1 << 16)}}


def _write_exported_program(model: Normalised, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(path))


def _write_onnx(model: Normalised, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamo=True, dynamic_shapes=_batch_dim(), external_data=False, verbose=False)


def _run_torchscript(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)
    return run


def _run_exported_program(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)
    return run


def _run_onnx(path: Path) -> Callable[[torch.Tensor], Any]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported-program": _write_exported_program}
_RUNNERS = {"onnx": _run_onnx, "torchscript": _run_torchscript, "exported-program": _run_exported_program}
