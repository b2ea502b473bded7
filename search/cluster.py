"""The Ray a sweep runs on: a cluster it attaches to, or a local Ray it starts, watches and quiets."""

from __future__ import annotations

import os
import socket

import ray

from kdarena.zoo.errors import UserError

from . import ray_reaper
from .sweep_config import SweepConfig


def quiet_tune() -> None:
    """What Ray Tune and Optuna read when a sweep runs: set where a sweep starts, never at import.

    Ray's own console reporter would interleave with kdarena's live view (the
    old reporter at verbosity 0 prints nothing); small sweeps checkpoint often
    by design, so Ray's "syncing took long" advice is noise; Tune's CSV and
    TensorBoard loggers repeat what MLflow records, on the path every report
    waits on (~8 ms an epoch) — the JSON log (result.json, what Tune's own
    analysis reads) is kept by `phases.run_config`.
    """
    import optuna

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Attach to a cluster (`--address`, `RAY_ADDRESS`) or start Ray locally; an unreachable address is a UserError."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if address and address != "auto":
        host_port = address.removeprefix("ray://").split("/")[0]
        host, _, port = host_port.rpartition(":")
        try:
            socket.create_connection((host or host_port, int(port or 6379)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise UserError(f"Ray cluster at {address} is unreachable ({exc}); start one with `ray start --head` "
                            "or fix --address / RAY_ADDRESS") from None
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # Ray starts workers at nice 15, so every burst of the driver or Ray's own daemons preempts a trial:
            # its epochs ran 5-10 % slower than the same loop at nice 0. Here the trials are the work.
            context = ray.init(num_cpus=num_cpus, _system_config={"worker_niceness": 0}, **kwargs)
            ray_reaper.start(context.address_info["session_dir"])  # no Ray process outlives a killed driver
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = ("; a cluster with token authentication needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
                "(or ~/.ray/auth_token)")
        raise UserError(f"cannot connect to Ray at {address}: {str(exc).splitlines()[0]}{hint}") from None


def check_resources(sweep: SweepConfig) -> tuple[float, float]:
    """The cluster's CPUs and GPUs; a UserError if one trial (all its workers) asks for more than it has."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    r = sweep.resources
    trial_cpus, trial_gpus = r.per_trial
    each = f" ({r.workers} workers × {r.cpu:g})" if r.workers > 1 else ""
    if trial_cpus > cpus:
        fix = "lower resources.cpu or resources.workers" if r.workers > 1 else "lower it"
        raise UserError(f"resources.cpu is {trial_cpus:g} per trial{each} but the Ray cluster has {cpus:g} CPUs; {fix}")
    if trial_gpus > gpus:
        each = f" ({r.workers} workers × {r.gpu:g})" if r.workers > 1 else ""
        raise UserError(f"resources.gpu is {trial_gpus:g} per trial{each} but the Ray cluster has {gpus:g} GPUs; "
                        "set resources.gpu: 0 or add GPU nodes")
    return cpus, gpus
