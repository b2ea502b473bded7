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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a sqlite store in `root`; `stop()` and `start()` it at will."""

    def __init__(self, root, port: int | None = None, extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.root, self.port = root, port or free_port()
        self.extra_args, self.env = extra_args, env
        self.proc = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> MlflowServer:
        import os
        import subprocess
        import sys
        import time
        import urllib.request
        from pathlib import Path

        exe = Path(sys.executable).parent / "mlflow"
        self.log = open(Path(self.root) / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{Path(self.root) / 'mlflow.db'}",
             "--artifacts-destination", str(Path(self.root) / "artifacts"), *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env or os.environ.copy())
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(Path(self.root) / 'mlflow-server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
