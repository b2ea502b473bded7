"""`kdarena models` and `kdarena methods`: what the zoo and the method registry hold."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from .app import app, out


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the model zoo with params and MACs at each model's default input."""
    from kdarena.zoo.catalog import model_catalog

    rows = model_catalog()
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("model", "params", "MACs", "input (C×H×W), classes", "")
    for r in rows:
        c, h, w = r["input"]
        table.add_row(r["name"], f"{r['params']:,}", f"{r['macs']:,}", f"{c}×{h}×{w}, {r['num_classes']}", r["summary"])
    out.print(table)


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the distillation methods with their defaults and search spaces."""
    from kdarena.methods import METHODS
    from kdarena.methods.space import COMMON_SPACE

    rows = [{"name": name, "needs_teacher": m.needs_teacher, "defaults": m.Params().model_dump(mode="json"),
             "space": {k: d.to_json() for k, d in (m.space | COMMON_SPACE).items()},
             "doc": (sys.modules[m.__module__].__doc__ or "").strip().splitlines()[0], "reference": m.reference}
            for name, m in METHODS.items()]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("method", "defaults", "search space", "what, and the reference it follows")
    for r in rows:
        space = ", ".join(f"{k} {_dim(d)}" for k, d in r["space"].items())
        defaults = ", ".join(f"{k}={v}" for k, v in r["defaults"].items()) or "—"
        table.add_row(r["name"], defaults, space, f"{r['doc']}\n{r['reference']}")
    out.print(table)


def _dim(d: dict[str, Any]) -> str:
    if d["type"] == "categorical":
        return "{" + ", ".join(map(str, d["choices"])) + "}"
    return f"[{d['low']:g}, {d['high']:g}]" + (" log" if d["log"] else "")
