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


def wait_http(url: str, proc, log, what: str, timeout: float = 120) -> None:
    """Until `url` answers 200; fails the test with the process's log if it exits or never answers."""
    import time
    import urllib.request
    from pathlib import Path

    import pytest

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{Path(log).read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer {url} in {timeout:.0f} s:\n{Path(log).read_text()[-4000:]}")
        time.sleep(0.25)


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
        from pathlib import Path

        exe = Path(sys.executable).parent / "mlflow"
        self.log = open(Path(self.root) / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{Path(self.root) / 'mlflow.db'}",
             "--artifacts-destination", str(Path(self.root) / "artifacts"), *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            # its background job workers are of no use to kdarena and cost seconds at every start
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | (self.env or os.environ.copy()))
        try:
            wait_http(f"{self.uri}/health", self.proc, Path(self.root) / "mlflow-server.log", "mlflow server", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
