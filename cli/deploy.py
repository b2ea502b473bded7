"""`kdarena deploy`: a finished student exported (ONNX, TorchScript, exported program) and checked, or registered in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kdarena.zoo.errors import UserError

from .app import _fail, app, err, out

EXIT_CHECK_FAILED = 1


@app.command()
def deploy(
    source: Annotated[str, typer.Argument(help="a student run's id; a config file (.yaml: the run its `kdarena "
                                               "export` header names, else a completed run of that config); or a "
                                               "folder holding its student.pt and student.json")],
    fmt: Annotated[str | None, typer.Option("--format", help="onnx, torchscript or exported-program (onnx needs "
                                                             "`pip install 'kdarena[deploy]'`)")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="the file to write")] = None,
    register: Annotated[str | None, typer.Option(help="log the student as an MLflow model in its run and register "
                                                      "it under this name")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default $MLFLOW_TRACKING_URI or "
                                                          "sqlite:///mlflow.db")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object with the results, nothing else "
                                                         "on stdout")] = False,
) -> None:
    """Export a student with its input normalisation folded in front (it takes raw [0, 1] pixels), check the
    exported model against PyTorch (largest difference at most 1e-4), and/or register it in MLflow."""
    from kdarena.training.deploy import CheckFailed, check_output, export, parse_format, require_runtime
    from kdarena.training.student_runs import load_student, register as register_student
    from kdarena.training.tracking import pick_tracking_uri

    summary: dict[str, Any] = {}
    try:
        if (fmt is None) != (output is None):
            raise UserError("give --format and -o FILE together: the format to write and where")
        if fmt is None and register is None:
            raise UserError("nothing to do: give --format FORMAT -o FILE to export, and/or --register NAME")
        if fmt is not None and output is not None:  # all before any work
            fmt = parse_format(fmt)
            require_runtime(fmt)
            check_output(output)
        uri = pick_tracking_uri(tracking_uri)
        student = load_student(source, uri)
        summary |= {"source": student.where, "run_id": student.run_id, "student": student.card["student"]["label"]}
        if fmt is not None and output is not None:
            done = export(student.model, student.card, fmt, output)
            summary |= {"format": done.fmt, "output": str(done.path), "max_abs_diff": done.max_abs_diff}
            if not as_json:
                out.print(f"wrote {done.path} ({done.fmt}): {summary['student']} from {student.where}, normalisation "
                          f"included (input: raw [0, 1] pixels); largest difference from PyTorch "
                          f"{done.max_abs_diff:.2g} on batches of {' and '.join(map(str, done.batches))}",
                          highlight=False, soft_wrap=True)
        if register is not None:
            registered = register_student(student, register, uri)
            summary["registered"] = {"name": registered.name, "version": registered.version,
                                     "model_uri": registered.model_uri}
            if not as_json:
                out.print(f"registered {registered.name} version {registered.version}: "
                          f"mlflow.pytorch.load_model({registered.model_uri!r}), or "
                          f"`mlflow models serve -m {registered.model_uri}`", highlight=False, soft_wrap=True)
    except UserError as exc:
        _fail(exc)
    except CheckFailed as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_CHECK_FAILED)
    if as_json:
        print(json.dumps(summary, sort_keys=True))
