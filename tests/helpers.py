"""Small builders and checks the tests share: digits-shaped (1×8×8, 10 classes) models and their pair info, fixed
inputs, the 2-epoch fit-and-resume check and the checks many methods make alike, `kdarena train` in process, and a
real MLflow server."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kdarena.methods import Distiller, PairInfo
from kdarena.zoo.models import StagedModel, StageOutput, build_model, stage_shapes

CPU = torch.device("cpu")

# fixed logits (3 samples, 4 classes) and labels: the logit methods' reference values were computed on these
ZS = [[1.0, 2.0, 0.5, -1.0], [0.0, -0.5, 1.5, 3.0], [2.0, 1.0, 0.0, -2.0]]
ZT = [[0.5, 3.0, -1.0, 0.0], [1.0, 0.0, 0.5, 4.0], [3.0, -1.0, 1.0, 0.0]]
Y = [1, 3, 0]

# (student, teacher) architectures of the methods that serve MLPs on their last hidden layer
MLP_PAIRS = [("mlp", "cnn"), ("mlp", "mlp"), ("cnn", "mlp")]


def digits_model(arch: str, seed: int, **options) -> StagedModel:
    torch.manual_seed(seed)
    return build_model(arch, num_classes=10, in_channels=1, input_size=8, **options)


def digits_cnn(seed: int, channels: int = 8) -> StagedModel:
    return digits_model("cnn", seed, channels=channels)


def digits_pair(student: StagedModel, teacher: StagedModel) -> PairInfo:
    return PairInfo(stage_shapes(student, 1, 8), stage_shapes(teacher, 1, 8), 10, 1, 8)


def digits_teacher_student(**teacher_options) -> tuple[StagedModel, StagedModel]:
    """(teacher, student): a cnn teacher (seed 0, 8 channels unless `teacher_options` say otherwise), a 4-channel cnn
    student (seed 1)."""
    return digits_model("cnn", 0, **({"channels": 8} | teacher_options)), digits_model("cnn", 1, channels=4)


def digits_mlp_or_cnn(student_arch: str, teacher_arch: str) -> tuple[StagedModel, StagedModel]:
    """(student, teacher) of the given architectures, seeds 0 and 1: an MLP (hidden 16, 12) or a 4-channel cnn."""
    options = {"mlp": {"hidden": [16, 12]}, "cnn": {"channels": 4}}
    return (digits_model(student_arch, 0, **options[student_arch]),
            digits_model(teacher_arch, 1, **options[teacher_arch]))


def digits_distiller(cls: type[Distiller], student: StagedModel, teacher: StagedModel, **params) -> Distiller:
    """`cls` over the pair with `cls.Params(**params)`, the teacher frozen (eval, no gradients) as the engine has it."""
    teacher.eval().requires_grad_(False)
    return cls(student, teacher, cls.Params(**params), digits_pair(student, teacher))


def digits_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of `n` digits-shaped images and labels, drawn after `torch.manual_seed(1)`."""
    torch.manual_seed(1)
    return torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))


def with_small_train(data, n: int = 256):
    """`data` with its training split cut to its first `n` images."""
    import dataclasses

    from kdarena.zoo.data import Split

    return dataclasses.replace(data, train=Split(data.train.images[:n], data.train.labels[:n]))


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`img` moved down by dy and right by dx, zero fill."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[..., max(-dy, 0):h - max(dy, 0),
                                                                          max(-dx, 0):w - max(dx, 0)]
    return out


def sin_pattern(shape: tuple[int, ...], phase: float, freq: float = 0.7, scale: float = 1.0) -> torch.Tensor:
    """A fixed float64 tensor: scale · sin(freq · k + phase) over its elements k = 0, 1, … in row-major order."""
    return scale * torch.sin(torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) * freq + phase)


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def as_float(t: torch.Tensor) -> float:
    return float(t.detach())


class LogitHalves(StagedModel):
    """A stand-in network whose input is `[z_student | z_teacher]`: it outputs one half as its logits."""

    def __init__(self, half: int):
        super().__init__()
        self.half = half

    def forward_stages(self, x: torch.Tensor) -> StageOutput:
        c = x.shape[1] // 2
        return StageOutput(x[:, self.half * c:(self.half + 1) * c], [], [])


def on_logit_halves(cls: type[Distiller], num_classes: int = 4, **params) -> Distiller:
    """`cls` between two `LogitHalves`: its forward_train on `[z_s | z_t]` sees exactly the logits z_s and z_t."""
    return cls(LogitHalves(0), LogitHalves(1), cls.Params(**params), PairInfo([], [], num_classes, 1, 8))


def kd_by_hand(zs, zt, T) -> float:
    """Hinton's T²·KL(p_t ‖ p_s) at temperature T, averaged over the samples, with loops."""
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        es = [math.exp(v / T) for v in s_row]
        et = [math.exp(v / T) for v in t_row]
        ps, pt = [v / sum(es) for v in es], [v / sum(et) for v in et]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return T * T * total / len(zs)


def uninterrupted_and_resumed(make_distiller, data, recipe, tmp_path, stop_after: int = 1, execution=None):
    """(FitResult of an uninterrupted run, FitResult of a run interrupted after `stop_after` epochs and resumed).

    `make_distiller()` builds a fresh distiller (fresh weights) each time, as a new process would; `execution`
    (`methods.execution.Execution`) runs both on other settings than the CPU's default.
    """
    import pytest

    from kdarena.methods.engine import fit

    def run(ckpt, stop=None):
        def on_epoch(e):
            if stop is not None and e.epoch + 1 == stop:
                raise KeyboardInterrupt
        return fit(make_distiller(), data, recipe, device=CPU, checkpoint_path=ckpt, on_epoch=on_epoch,
                   execution=execution)

    full = run(tmp_path / "uninterrupted.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed.pt", stop=stop_after)
    torch.manual_seed(1234)  # a new process: its own random state; the checkpoint carries the rest
    return full, run(tmp_path / "resumed.pt")


def two_epochs_and_resumed(distiller_for, data, tmp_path, batch_size: int = 64, seeds: tuple[int, int] = (0, 3)):
    """(uninterrupted FitResult, resumed FitResult, the distillers built) of the method tests' 2-epoch digits fit.

    `distiller_for(student, teacher)` is called for each run on a fresh 4-channel cnn student (seed `seeds[1]`) and
    one 8-channel cnn teacher (seed `seeds[0]`); the resumed run was interrupted after its first epoch. The
    distillers come in the order built: the uninterrupted run's, the interrupted one's, the resumed one's.
    """
    from kdarena.methods.recipe import Recipe

    teacher = digits_model("cnn", seeds[0], channels=8)
    built = []

    def make():
        built.append(distiller_for(digits_model("cnn", seeds[1], channels=4), teacher))
        return built[-1]

    full, resumed = uninterrupted_and_resumed(make, data, Recipe(epochs=2, batch_size=batch_size), tmp_path)
    return full, resumed, built


def assert_resumed_exactly(full, resumed, fields=("val_acc", "losses", "diagnostics")) -> None:
    """The resumed run's epochs equal the uninterrupted run's in each of `fields`."""
    for field in fields:
        assert [getattr(e, field) for e in resumed.history] == [getattr(e, field) for e in full.history], field


def assert_two_epochs_resume_exactly(distiller_for, data, tmp_path, loss: str) -> None:
    """`two_epochs_and_resumed` completes both epochs with CE and a finite, positive `loss`, and resumes exactly."""
    full, resumed, _ = two_epochs_and_resumed(distiller_for, data, tmp_path)
    assert full.status == "completed" and len(full.history) == 2
    assert all({"loss_ce", loss} == set(e.losses) for e in full.history)
    assert all(math.isfinite(e.losses[loss]) and e.losses[loss] > 0 for e in full.history)
    assert_resumed_exactly(full, resumed)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Equal state dicts, entry by entry: parameters and buffers (BN statistics, banks, …)."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def fit_alone_and_distilled(distill, data, batch_size: int):
    """(alone, distilled): FitResults of one epoch of the same fresh student (cnn, seed 5, 4 channels) trained by
    the baseline and through `distill(student)`, after asserting both students end with equal weights and BN
    statistics (a method whose distillation term is off must leave the student as it would have been)."""
    from kdarena.methods.baseline import Baseline
    from kdarena.methods.engine import fit
    from kdarena.methods.recipe import Recipe

    a, b = digits_model("cnn", 5, channels=4), digits_model("cnn", 5, channels=4)
    recipe = Recipe(epochs=1, batch_size=batch_size)
    alone = fit(Baseline(a, None, Baseline.Params(), digits_pair(a, a)), data, recipe, device=CPU, evaluate_test=False)
    distilled = fit(distill(b), data, recipe, device=CPU, evaluate_test=False)
    assert_same_state(a, b)
    return alone, distilled


def assert_gradcheck_and_precision(loss, s: torch.Tensor, t: torch.Tensor) -> None:
    """`loss(s, t)` has correct float64 gradients in `s`, stays float64 on float64 inputs and is lifted to float32
    (never left in bfloat16) on bfloat16 ones."""
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,))
    assert loss(s, t).dtype == torch.float64
    assert loss(s.detach().bfloat16(), t.bfloat16()).dtype == torch.float32


def assert_backward_reaches_the_student_alone(distiller: Distiller, losses: dict[str, torch.Tensor]) -> None:
    """Backward of the summed losses: no gradient in the teacher, one in the student's first conv, and the method
    adds no training-only parameters."""
    sum(losses.values()).backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert distiller.student.stages[0].convs[0].weight.grad.abs().sum() > 0
    assert distiller.extra_params() == 0


def assert_one_step_trains_the_student(distiller: Distiller, loss: str) -> None:
    """On `digits_batch()`, `loss` is finite and positive and the summed losses reach every student parameter."""
    x, y = digits_batch()
    _, losses = distiller.forward_train(x, y, None)
    assert math.isfinite(float(losses[loss].detach())) and float(losses[loss].detach()) > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.student.parameters())


def assert_serves_any_pair_with_logits(cls: type[Distiller]) -> None:
    """`cls` serves a cnn student with an MLP teacher and the other way round."""
    cnn, mlp = digits_model("cnn", 0, channels=4), digits_model("mlp", 0, hidden=[16])
    assert cls.check_pair(cls.Params(), digits_pair(mlp, cnn)) is None
    assert cls.check_pair(cls.Params(), digits_pair(cnn, mlp)) is None


def assert_refuses_mlps_for_want_of_spatial_maps(cls: type[Distiller], *also_named: str) -> None:
    """`cls` serves a pair of cnns and refuses an MLP student or teacher ("… has none", "spatial"); the student's
    refusal names `also_named` too."""
    cnn, mlp = digits_model("cnn", 0, channels=4), digits_model("mlp", 0, hidden=[16])
    assert cls.check_pair(cls.Params(), digits_pair(cnn, cnn)) is None
    why = cls.check_pair(cls.Params(), digits_pair(mlp, cnn))
    assert "student has none" in why and "spatial" in why and all(word in why for word in also_named), why
    assert "teacher has none" in cls.check_pair(cls.Params(), digits_pair(cnn, mlp))


def assert_logged_finite_each_epoch(client, run_id: str, names) -> None:
    """Each metric of `names` was logged once an epoch of a 2-epoch run (steps 1, 2), every value finite."""
    for name in names:
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == [1, 2], name
        assert all(math.isfinite(m.value) for m in history)


def cli_train(*settings: str, json_summary: bool = False, **invoke_options):
    """The CliRunner result of `kdarena train [--json] --set S …`, run in this process."""
    from typer.testing import CliRunner

    from kdarena.cli.app import app

    args = ["train", *(["--json"] if json_summary else [])]
    for setting in settings:
        args += ["--set", setting]
    return CliRunner().invoke(app, args, **invoke_options)


def cli_train_summary(*settings: str, **invoke_options) -> dict:
    """The JSON summary of `kdarena train --json --set S …`, after asserting it exited 0."""
    import json

    result = cli_train(*settings, json_summary=True, **invoke_options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_cli_refuses_an_mlp_student(method: str) -> None:
    """`kdarena train` exits 2 on `method` with an MLP student, naming both and the spatial maps it lacks."""
    refused = cli_train(f"method.name={method}", "student.arch=mlp")
    assert refused.exit_code == 2
    assert f"'{method}'" in refused.stderr and "'mlp'" in refused.stderr and "spatial" in refused.stderr


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


def shared_ray() -> None:
    """The test session's local Ray of 2 CPUs, started by the first test that needs it and shut down at the end of
    the session (`conftest.py`): each start costs seconds, and its workers' imports of torch more."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


@contextmanager
def sweep_workspace(work: Path) -> Iterator[str]:
    """`work` as a private place to run sweeps: its own teacher cache and MLflow store (the tracking URI yielded),
    the working directory, and the session's local Ray (`shared_ray`); all but Ray put back afterwards."""
    import os

    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {"KDARENA_CACHE": str(work / "cache"), "MLFLOW_TRACKING_URI": uri}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cwd = Path.cwd()
    os.chdir(work)
    shared_ray()
    try:
        yield uri
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unboxed(text: str) -> str:
    """A CLI's output with typer's error box and its line wrapping taken away: the message as one line."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def write_tree(root: Path, sizes: tuple[int, int], train_per_class: int = 12, test_per_class: int = 4) -> Path:
    """An image tree of three classes: JPEGs of smooth random content, each of a random height and width within
    `sizes`."""
    import random

    from torchvision.io import encode_jpeg

    gen, rnd = torch.Generator().manual_seed(0), random.Random(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = rnd.randint(*sizes), rnd.randint(*sizes)
                low = torch.rand((1, 3, h // 8 + 2, w // 8 + 2), generator=gen) * 255
                image = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0].to(torch.uint8)
                (root / split / c / f"{i:03d}.jpg").write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())
    return root
