"""`kdarena recommend`: the best student + method + config within a budget, with its evidence; `-o` writes the config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from kdarena.training.record import Metric
from kdarena.zoo.errors import UserError

from .app import _fail, app, choices, err, json_format, out

FORMATS = ("table", "json")
Format = choices("Format", *FORMATS)
EXIT_NO_EVIDENCE = 1


def _budget(max_macs: float | None, max_params: float | None, max_latency_ms: float | None):
    from kdarena.leaderboards.recommend import Budget

    given = {k: v for k, v in (("max_macs", max_macs), ("max_params", max_params),
                               ("max_latency_ms", max_latency_ms)) if v is not None}
    if len(given) > 1:
        raise UserError(f"give one budget, not {len(given)} ({', '.join('--' + k.replace('_', '-') for k in given)}): "
                        "the recommendation is the best student within one cost limit")
    for kind, limit in given.items():
        if not limit > 0:
            raise UserError(f"--{kind.replace('_', '-')} {limit:g}: a budget is a positive number")
        return Budget(kind, limit)
    return Budget()


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _evidence(e: dict[str, Any]) -> str:
    ci = f" (95 % CI {_pct(e['ci95'][0])}–{_pct(e['ci95'][1])})" if e.get("ci95") else ""
    where = f"sweep {e['sweep']}" if isinstance(e.get("sweep"), str) else "kdarena train"
    return (f"test acc {_pct(e['test_acc_mean'])} %{ci}, val acc {_pct(e['val_acc_mean'])} %, {e['n_seeds']} seed(s), "
            f"{e['source']} runs of {where}")


def _vs_alone(e: dict[str, Any]) -> str:
    alone = e.get("vs_student_alone")
    if e["method"] == "baseline":
        return "is the student alone"
    if alone is None:
        return "no run of the student alone to compare"
    text = f"{100 * alone['difference']:+.2f} points vs the student alone ({_pct(alone['student_alone_test_acc'])} %)"
    if alone["p_value"] is None:
        return text + f" ({alone['paired_seeds']} paired seed(s): too few to test)"
    verdict = "distinguishable" if alone["distinguishable"] else "not distinguishable"
    return text + f" ({verdict}: paired t-test p = {alone['p_value']:.3g} over {alone['paired_seeds']} seeds)"


def _gather_text(dataset: str, teacher: str | None, budget) -> str:
    from kdarena.leaderboards.recommend import gather_sweep
    from kdarena.zoo.data import DATASETS

    entry = {"name": dataset} if dataset in DATASETS else {"name": "imagefolder", "root": f"PATH/TO/{dataset}"}
    doc = gather_sweep(entry, teacher, budget)
    return (f"gather it with a sweep: save this as {doc['name']}.yaml (set the teacher and the students you "
            f"have) and run `kdarena sweep {doc['name']}.yaml`\n---\n" + yaml.safe_dump(doc, sort_keys=False))


@app.command()
def recommend(
    dataset: Annotated[str, typer.Option(help="the dataset: its name as the leaderboard shows it, its label or the "
                                              "start of its fingerprint")],
    teacher: Annotated[str | None, typer.Option(help="only students of this teacher (its label)")] = None,
    max_macs: Annotated[float | None, typer.Option(help="the student's MACs at most (one image)")] = None,
    max_params: Annotated[float | None, typer.Option(help="the student's parameters at most")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="the student's measured CPU latency at most, ms")] = None,
    fmt: Annotated[Format | None, typer.Option("--format", case_sensitive=False, help="default table")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the same as --format json")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write the recommended config here: "
                                                                      "`kdarena train FILE` re-runs it")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")] = None,
) -> None:
    """The best student + method + config within a cost budget, from the evidence in the store.

    Exit codes: 0 a recommendation; 1 no evidence for the dataset or the budget (the sweep that would
    gather it is printed); 2 bad input.
    """
    from kdarena.leaderboards.recommend import recommend as answer_from
    from kdarena.leaderboards.runs import read_runs, run_detail
    from kdarena.training.tracking import resolve_tracking_uri

    try:
        fmt = json_format(fmt, as_json) or "table"
        if output is not None and output.is_dir():
            raise UserError(f"-o {output}: a folder; pass a file name such as best.yaml")
        budget = _budget(max_macs, max_params, max_latency_ms)
        uri = resolve_tracking_uri(tracking_uri)
        answer = answer_from(read_runs(uri), dataset, teacher, budget)
        best = answer["recommendation"]
        config_text = None
        if best is not None and output is not None:
            config_text = run_detail(uri, best["run_id"]).get("config_yaml")
            if not config_text:
                raise UserError(f"run {best['run_id']} has no config.yaml artifact to write; "
                                "`kdarena export` its sweep instead")
    except UserError as exc:
        _fail(exc)
    if best is None:
        if fmt == "json":
            print(json.dumps(answer | {"gather": _gather_text(dataset, teacher, budget)}, indent=2))
        else:
            err.print(f"no recommendation: {answer['reason']}", highlight=False)
            err.print(_gather_text(dataset, teacher, budget), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_NO_EVIDENCE)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(config_text)
        tmp.replace(output)  # whole or not at all
        err.print(f"wrote {output}: `kdarena train {output}` re-runs it", highlight=False)
    if fmt == "json":
        print(json.dumps(answer, indent=2, default=str))
        return
    out.print(f"{dataset}: the best within {answer['budget']}", highlight=False)
    ranks = [e["rank"] for e in (best, *answer["runner_ups"])]
    for e in (best, *answer["runner_ups"]):
        tied = ranks.count(e["rank"]) > 1
        label = ("best" if e is best else f"#{e['rank']}") + (" (tied)" if tied else "")
        if answer["runner_ups"] and e is answer["runner_ups"][0]:
            out.print("runner-ups:")
        cost = " · ".join(f"{name} {e[key]:,.0f}" if key != Metric.LATENCY_MS else f"{name} {e[key]:.2f} ms"
                          for name, key in (("MACs", Metric.MACS), ("params", Metric.PARAMS),
                                            ("latency", Metric.LATENCY_MS))
                          if e[key] is not None)
        out.print(f"  {label}: {e['student']} + {e['method']} (teacher {e['teacher'] or '—'}): {_evidence(e)}\n"
                  f"      {cost}; {_vs_alone(e)}\n      config: {e['key_hparams'] or '—'}", highlight=False)
    out.print(f"MLflow run {best['run_id']}" + ("" if output else "; -o FILE writes its config for `kdarena train`"),
              highlight=False)
