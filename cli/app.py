"""The `kdarena` command line: a thin layer over the train job and the registries."""

from __future__ import annotations

import json
import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kdarena.training.record import Status, Tag
from kdarena.training.tracking import quiet_mlflow
from kdarena.zoo.errors import UserError

app = typer.Typer(help="kdarena: search knowledge-distillation methods and rank the students they make.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
out = Console()
err = Console(stderr=True)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"kdarena {version('kdarena')}")
        raise typer.Exit()


@app.callback()
def _command_starts(
    _version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_print_version,
                                           help="print the version and exit")] = False,
) -> None:
    """Before any command: what MLflow reads when it is imported (the commands import it later)."""
    quiet_mlflow()


def choices(name: str, *values: str) -> type[Enum]:
    """An enumerated option's values, as a type typer lists in --help and matches (with `case_sensitive=False`)
    whatever their case; a bad value exits 2 naming the choices."""
    return Enum(name, {v: v for v in values}, type=str)


def value_of(option: Enum | None) -> str | None:
    return None if option is None else option.value


def json_format(fmt: Enum | None, as_json: bool) -> str | None:
    """`--json` is `--format json`; given with another format it is a contradiction, refused."""
    if as_json and value_of(fmt) not in ("json", None):
        raise UserError(f"--json and --format {fmt.value} contradict each other; give one of them")
    return "json" if as_json else value_of(fmt)


def one_line(text: str) -> str:
    """`text` with its line breaks and other control characters escaped (`\\n`, `\\x1b`): it may quote user input."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _fail(exc: UserError) -> None:
    """The message on one line of stderr, exit code 2; plain text (a `[/x]` in the user's input is no markup)."""
    from rich.text import Text

    err.print(Text.assemble(("error:", "bold red"), " ", one_line(str(exc))), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config; omit for the zero-download default (digits, kd, CNN→CNN)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a field: --set method.params.alpha=0.5 (repeatable)")] = [],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object with the results, nothing else on stdout")] = False,
) -> None:
    """Distil one student from one teacher and record the run in MLflow."""
    from kdarena.training.config import read_train_config
    from kdarena.training.tracking import resolve_tracking_uri

    try:
        cfg, raw = read_train_config(config, set_, notice=lambda text: err.print(text, highlight=False))
        uri = resolve_tracking_uri(tracking_uri)
        from .progress import ProgressLines, TrainProgress
        from kdarena.training.train_job import run_train

        if err.is_terminal:
            with TrainProgress(enabled=not as_json, console=err) as progress:
                summary = run_train(cfg, uri, progress.callbacks(), source_config=raw)
        else:  # a log or a pipe: lines on stderr (stdout stays the table or the JSON)
            summary = run_train(cfg, uri, ProgressLines(err).callbacks(), source_config=raw)
    except UserError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(_jsonable(summary), sort_keys=True))
    else:
        _print_summary(summary, uri)
    if summary["status"] != Status.COMPLETED:  # diverged: the JSON or the table says why, the exit code says it failed
        raise typer.Exit(1)


def _jsonable(value: Any) -> Any:
    """JSON has no NaN: unmeasured figures print as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _print_summary(s: dict[str, Any], uri: str) -> None:
    table = Table(title=f"{s['method']}: {s['teacher'] or '—'} → {s['student']} on {s['dataset']}", show_header=False)
    rows = [("status", s["status"] + (f" ({s['reason']})" if s["reason"] else "")),
            ("val_acc (final epoch)", _pct(s["val_acc"])), ("test_acc", _pct(s["test_acc"])),
            ("teacher test_acc", _pct(s["teacher_test_acc"])),
            ("params", f"{s['params']:,}"), ("MACs", f"{s['macs']:,}"), ("latency (CPU, batch 1)", f"{s['latency_ms']:.3f} ms"),
            ("training-only params", f"{s['extra_params']:,}"),
            ("teacher sha256", (s["teacher_sha256"] or "—")[:16]), ("MLflow run", s["run_id"])]
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)
    out.print(f"Recorded in {uri}; browse with `mlflow ui --backend-store-uri {uri}`.", highlight=False)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


@app.command()
def sweep(
    file: Annotated[Path | None, typer.Argument(help="sweep YAML file")] = None,
    preset: Annotated[str | None, typer.Option(help="a shipped sweep instead of a file: quickstart")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default $RAY_ADDRESS, else a local Ray")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted sweep of the same name")] = False,
    storage: Annotated[str | None, typer.Option(help="results folder; default ./kdarena-sweeps (shared storage on a cluster)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="trials at once; default cluster CPUs / resources.cpu")] = None,
    final_seeds: Annotated[int | None, typer.Option(min=0, help="re-run each method's best config on N seeds (overrides final.seeds)")] = None,
    rebuild_records: Annotated[bool, typer.Option("--rebuild-records", help="with --resume: rebuild a damaged records.json from MLflow and Ray's saved state")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object with each method's best trial and final "
                                                          "runs, nothing else on stdout")] = False,
) -> None:
    """Search every method's space with Optuna under Ray Tune (ASHA early stopping), recorded in MLflow.

    Exit codes: 0 done; 1 done, but some method's final mean stands on fewer seeds than planned; 2 bad input
    (nothing run); 130 stopped by Ctrl-C, 143 by SIGTERM (state saved: --resume continues).
    """
    from kdarena.search.sweep_config import load_sweep

    try:
        if (file is None) == (preset is None):
            raise UserError("give a sweep file or --preset NAME (e.g. `kdarena sweep --preset quickstart`)")
        if preset is not None:
            from kdarena.sweeps import preset_path
            file = preset_path(preset)
        cfg, raw = load_sweep(file)
        from kdarena.search.sweep import SweepOptions, run_sweep
        from .sweep_view import SweepView

        seeds = final_seeds if final_seeds is not None else cfg.final.seeds
        total = cfg.trials_for() * len(cfg.methods) + seeds * len(cfg.methods)
        with SweepView(err, total, enabled=err.is_terminal) as view:
            options = SweepOptions(address=address, resume=resume, storage=storage, tracking_uri=tracking_uri,
                                   max_concurrent=max_concurrent, final_seeds=final_seeds,
                                   rebuild_records=rebuild_records)
            # the teacher's training (minutes): bars in the live view on a terminal, lines with an ETA elsewhere
            from .progress import ProgressLines

            outcome = run_sweep(cfg, raw, options, view=view,
                                callbacks=view.callbacks() if err.is_terminal else ProgressLines(err).callbacks())
    except UserError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        from kdarena.search.signals import stopped_by_sigterm

        again = f"kdarena sweep {'--preset ' + preset if preset else file} --resume"
        how = "stopped by SIGTERM" if stopped_by_sigterm() else "interrupted"
        err.print(f"{how}: finished trials are kept; `{again}` continues the sweep", highlight=False)
        raise typer.Exit(143 if stopped_by_sigterm() else 130) from None
    if as_json:
        print(json.dumps(_jsonable(_sweep_summary(cfg, outcome)), sort_keys=True, default=str))
    else:
        _print_sweep_summary(cfg, outcome)
    missing = outcome.missing_finals()
    if missing:
        err.print("fewer final seeds than planned: " + ", ".join(f"{m} {n} of {outcome.final_seeds}"
                                                                 for m, n in missing.items())
                  + " (the others diverged or failed; the Sweeps page of `kdarena dashboard` shows why)", highlight=False)
        raise typer.Exit(1)


def _sweep_summary(cfg, outcome) -> dict[str, Any]:
    """What the summary table shows, as data: each method's best full-budget trial and its final runs."""
    return {"sweep": cfg.name, "results": str(outcome.paths.root), "parent_run_id": outcome.parent_run_id,
            "tracking_uri": outcome.tracking_uri, "final_seeds": outcome.final_seeds,
            "methods": {method: {"student": record["tags"].get(Tag.STUDENT_LABEL), "run_id": record.get("run_id"),
                                 "trial_config": record.get("trial_config"), "metrics": record["metrics"],
                                 "final": outcome.finals.get(method)}
                        for method, record in outcome.best.items()},
            "no_full_budget_trial": [m for m in cfg.methods if m not in outcome.best],
            "warm_started": outcome.warm_started or {}}


def _print_sweep_summary(cfg, outcome) -> None:
    from .sweep_view import key_params
    from kdarena.training.tracking import default_tracking_uri

    table = Table("method", "student", "val_acc", "test_acc", "final test_acc", "MACs", "best config",
                  title=f"sweep {cfg.name}: best full-budget trial per method")
    from kdarena.leaderboards.stats import best_first

    # what "best" means everywhere: val_acc, then MACs (a method's best trial is one seed)
    ranked = sorted(outcome.best.items(), key=lambda kv: best_first(kv[1]["metrics"].get("val_acc"),
                                                                   kv[1]["metrics"].get("macs"), 1))
    for method, record in ranked:
        m = record["metrics"]
        final = outcome.finals.get(method)
        of = f" of {outcome.final_seeds}" if final and final["n"] < outcome.final_seeds else ""
        spread = f" ± {100 * final['std']:.2f}" if final and final["n"] > 1 else ""  # one seed has no spread
        final_text = f"{100 * final['mean']:.2f}{spread} ({final['n']}{of} seeds)" if final else "—"
        table.add_row(method, record["tags"].get(Tag.STUDENT_LABEL, ""), _pct(m.get("val_acc")),
                      _pct(m.get("test_acc")), final_text, f"{int(m.get('macs', 0)):,}", key_params(record, limit=6))
    out.print(table)
    for method, sources in (outcome.warm_started or {}).items():
        best = outcome.best.get(method)
        won = best is not None and best["tags"].get(Tag.WARM_START)
        out.print(f"{method}: {len(sources)} trial(s) warm-started from {', '.join(sources)}"
                  + (f"; its best trial is one of them ({won})" if won else "; a sampled trial beat them" if best else ""),
                  highlight=False)
    missing = [m for m in cfg.methods if m not in outcome.best]
    if missing:
        out.print(f"no full-budget trial for: {', '.join(missing)} (all stopped early, diverged or failed)")
    uri_opt = "" if outcome.tracking_uri == default_tracking_uri() else f" --tracking-uri {outcome.tracking_uri}"
    out.print(f"Results: {outcome.paths.root}; MLflow parent run {outcome.parent_run_id} in {outcome.tracking_uri}.\n"
              f"Next: `kdarena leaderboard{uri_opt}` to rank the students, `kdarena dashboard{uri_opt}` to browse them, "
              f"`kdarena export {outcome.paths.root} --top 3` for re-runnable configs.", highlight=False)


ExportFormat = choices("ExportFormat", "yaml", "json")


@app.command()
def export(
    sweep_ref: Annotated[str, typer.Argument(metavar="SWEEP", help="sweep directory, sweep file, or sweep name")],
    top: Annotated[int | None, typer.Option(min=1, help="how many configs; default 1 (multi-objective: the whole Pareto set)")] = None,
    fmt: Annotated[ExportFormat | None, typer.Option("--format", case_sensitive=False,
                                            help="yaml (kdarena train configs) or json (configs with their scores); default yaml")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the same as --format json")] = False,
    # text, not a Path: a Path would drop the trailing "/" that asks for a new folder
    output: Annotated[str | None, typer.Option("-o", "--output", help="a file, or DIR/ for one file per config")] = None,
) -> None:
    """Write a sweep's best trials as configs that `kdarena train` re-runs exactly."""
    from kdarena.search.export import find_sweep_dir, ranked_trials, render, write

    try:
        fmt = json_format(fmt, as_json) or "yaml"
        sweep_dir = find_sweep_dir(sweep_ref)
        _, entries = ranked_trials(sweep_dir, top)
        paths = write(entries, fmt, Path(output) if output else None, as_dir=bool(output) and output.endswith(("/", os.sep)))
    except UserError as exc:
        _fail(exc)
    if output is None:
        print(render(entries, fmt))
    else:
        for path in paths:
            err.print(f"wrote {path}", highlight=False)


@app.command()
def sync(
    sweep_ref: Annotated[str, typer.Argument(metavar="SWEEP", help="sweep directory, sweep file, or sweep name")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default the one the sweep recorded to")] = None,
) -> None:
    """Send a sweep's results that never reached MLflow (tracking server down) from its records.json, exactly once."""
    from kdarena.search.export import find_sweep_dir
    from kdarena.search.mirror import sync_sweep

    try:
        sweep_dir = find_sweep_dir(sweep_ref)
        waiting = sync_sweep(sweep_dir, tracking_uri)
    except UserError as exc:
        _fail(exc)
    err.print(f"{sweep_dir.name}: {waiting} trial(s) sent; MLflow has every trial" if waiting
              else f"{sweep_dir.name}: nothing to send; MLflow has every trial", highlight=False)


@app.command()
def dashboard(
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to serve on")] = 8501,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")] = None,
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 opens the dashboard to the network")] = "127.0.0.1",
) -> None:
    """Serve the dashboard (leaderboard, sweeps, runs) in the browser; it only reads the MLflow store."""
    import errno
    import os
    import socket

    import kdarena.dashboard

    from kdarena.training.tracking import check_tracking_uri, pick_tracking_uri

    try:
        uri = pick_tracking_uri(tracking_uri)
        if not uri.startswith("sqlite:///"):  # a sqlite store is only read: it need not be writable, nor exist yet
            check_tracking_uri(uri)
        try:
            with socket.create_server((host, port)):
                pass
        except OSError as exc:
            what = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise UserError(f"cannot serve on {host}:{port}: {what}; pass another --port (or --host)") from None
    except UserError as exc:
        _fail(exc)
    app_file = Path(kdarena.dashboard.__file__).with_name("app.py")
    err.print(f"kdarena dashboard: http://{host}:{port} (reading {uri}); Ctrl-C stops it", highlight=False,
              soft_wrap=True)
    env = os.environ | {"KDARENA_TRACKING_URI": uri}
    args = [sys.executable, "-m", "streamlit", "run", str(app_file), "--server.headless", "true",
            "--server.address", host, "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer", "--", "--tracking-uri", uri]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)  # streamlit takes over this process: Ctrl-C and kill reach it directly


def main() -> None:
    app()


if __name__ == "__main__":
    main()
