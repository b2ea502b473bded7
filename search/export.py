"""`kdarena export`: a sweep's best trials as complete `kdarena train` configs.

Only full-budget trials rank (ASHA-stopped ones saw fewer epochs), by the
leaderboard's "best" (`leaderboards.stats.best_first`: mean val_acc, then
MACs, then seeds) over the runs that stand for them, as the leaderboard does:
a trial re-run on final seeds stands on those finals, and a trial whose
method and student have finals of another config ranks after every trial
that stands. With one objective, the top K; with an accuracy-vs-cost
objective, the Pareto set. Each config pins the trial's seed, thread count
and teacher sha256, so `kdarena train` re-runs the trial exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdarena.leaderboards.stats import best_first, pareto_front
from kdarena.methods import get_method
from kdarena.zoo.errors import UserError

from kdarena.training.config import config_yaml, export_config
from kdarena.training.record import Metric, Status, Tag

from .points import SEED
from .records import RECORDS_FILE, SWEEP_FILE, SweepRecords, full_budget, sweep_paths
from .sweep_config import SweepConfig, load_sweep

# what an exported entry says of its trial
SCORES = (Metric.VAL_ACC, Metric.TEST_ACC, Metric.MACS, Metric.PARAMS)


def find_sweep_dir(target: str) -> Path:
    """A sweep directory, a sweep file (its storage/name), or a name under ./kdarena-sweeps."""
    path = Path(target).expanduser()
    if path.is_dir() and (path / RECORDS_FILE).exists():
        return path
    if path.is_file():
        sweep, _ = load_sweep(path)
        root = sweep_paths(sweep, None).root
        if (root / RECORDS_FILE).exists():
            return root
        raise UserError(f"sweep '{sweep.name}' has no results in {root} yet; run `kdarena sweep {target}` first")
    named = Path("kdarena-sweeps") / target
    if (named / RECORDS_FILE).exists():
        return named.resolve()
    raise UserError(f"no sweep results at {target}: pass a sweep directory (with {RECORDS_FILE}), a sweep file, "
                    "or the name of a sweep under ./kdarena-sweeps")


def ranked_trials(sweep_dir: Path, top: int | None) -> tuple[SweepConfig, list[dict[str, Any]]]:
    """The best full-budget trials, best first; `top=None`: the best one, or the whole Pareto set."""
    try:
        return _ranked_trials(sweep_dir, top)
    except (ValidationError, yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        # a sweep directory may come from elsewhere: a damaged or hand-edited one is refused, never half-exported
        raise UserError(f"sweep results in {sweep_dir} are damaged ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); run the sweep again with "
                        "--resume, or restore its records.json and sweep.yaml") from None


def _ranked_trials(sweep_dir: Path, top: int | None) -> tuple[SweepConfig, list[dict[str, Any]]]:
    sweep = SweepConfig.model_validate(yaml.safe_load((sweep_dir / SWEEP_FILE).read_text()))
    records = SweepRecords(sweep_dir / RECORDS_FILE)
    full = full_budget(records, sweep.budget.epochs)
    if not full:
        raise UserError(f"sweep '{sweep.name}' has no full-budget trial yet (all stopped early, diverged or still "
                        "running); resume it or give it a larger budget")
    ranked = list(zip(full, _standing(records, full)))
    if len(sweep.objectives) > 1:
        cost = sweep.objectives[1][0]
        front = pareto_front([(standing[0], r["metrics"][cost]) for r, standing in ranked])
        ranked = [ranked[i] for i in front]
    elif top is None:
        top = 1
    ranked.sort(key=lambda pair: _rank(*pair))
    teacher_sha = records.data.get("teacher", {}).get("sha256")
    entries = []
    for rank, (record, (val_acc_mean, seeds, _)) in enumerate(ranked[:top] if top else ranked, start=1):
        config = export_config(record["config"], teacher_sha)
        entries.append({"rank": rank, "trial": record["trial_name"], "mlflow_run_id": record["run_id"],
                        "method": record["method"], **{k: record["metrics"].get(k) for k in SCORES},
                        "val_acc_mean": val_acc_mean, "n_seeds": seeds, "config": config})
    return sweep, entries


def _point(record: dict[str, Any]) -> str | None:
    """A run's Optuna point without its seed (a final run's equals the trial it re-runs); None if not recorded."""
    point = record.get("trial_config")
    return None if point is None else json.dumps({k: v for k, v in point.items() if k != SEED}, sort_keys=True)


def _standing(records: SweepRecords, full: list[dict[str, Any]]) -> list[tuple[float, int, bool]]:
    """Per trial of `full`: (mean val_acc, seeds, superseded), over the runs that stand for it on the leaderboard.

    A trial re-run on final seeds stands on its completed finals; any other
    stands alone, superseded when its method and student have finals of
    another config (the leaderboard's row for them is those finals).
    """
    finals: dict[str, list[float]] = {}
    for r in records.trials.values():
        if r["phase"] == "final" and r["status"] == Status.COMPLETED and _point(r) is not None:
            finals.setdefault(_point(r), []).append(r["metrics"][Metric.VAL_ACC])

    def group(r: dict[str, Any]) -> tuple[str, str]:
        return r["method"], r.get("tags", {}).get(Tag.STUDENT_LABEL, json.dumps(r.get("student"), sort_keys=True))

    with_finals = {group(r) for r in full if _point(r) in finals}
    out = []
    for r in full:
        vals = finals.get(_point(r))
        out.append((sum(vals) / len(vals), len(vals), False) if vals else
                   (r["metrics"][Metric.VAL_ACC], 1, group(r) in with_finals))
    return out


def _rank(record: dict[str, Any], standing: tuple[float, int, bool]) -> tuple:
    """Standing trials first, then by `best_first`, then the earlier trial (as the leaderboard breaks ties)."""
    val_acc_mean, seeds, superseded = standing
    return superseded, best_first(val_acc_mean, record["metrics"].get(Metric.MACS), seeds), record.get("started", 0.0)


def render(entries: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(entries, indent=2)
    docs = []
    for i, e in enumerate(entries):
        seeds = f" (mean {e['val_acc_mean']:.4f} over {e['n_seeds']} seeds)" if e["n_seeds"] > 1 else ""
        # `kdarena train` trains a file's first document: the others are re-run from a file of their own
        rerun = ("kdarena train THIS_FILE" + (" (it trains this first config)" if len(entries) > 1 else "") if i == 0
                 else "this config alone in a file, then kdarena train FILE (export -o DIR/ writes one file each)")
        head = (f"# rank {e['rank']}: {e['method']}, trial {e['trial']}, val_acc {e[Metric.VAL_ACC]:.4f}{seeds}, "
                f"test_acc {e[Metric.TEST_ACC]:.4f}, MLflow run {e['mlflow_run_id']}\n"
                f"# re-run: {rerun}\n")
        docs.append(head + config_yaml(e["config"]))
    return "---\n".join(docs)


def write(entries: list[dict[str, Any]], fmt: str, output: Path | None, as_dir: bool = False) -> list[Path]:
    """To stdout (None), one file per config (a directory, or `as_dir`: DIR/ given), or one file (a single config, or a JSON list)."""
    if output is None:
        return []
    if output.is_dir() or as_dir or str(output).endswith("/"):
        output.mkdir(parents=True, exist_ok=True)
        paths = []
        for e in entries:
            # named by the validated config's method (a registry name), never by free text from records.json
            path = output / f"rank{int(e['rank'])}-{get_method(e['config']['method']['name']).name}.{fmt}"
            path.write_text(render([e], fmt) if fmt == "yaml" else json.dumps(e["config"], indent=2))
            paths.append(path)
        return paths
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(entries, fmt))
    return [output]
