"""`kdarena leaderboard`: our students ranked, with their cost, the Pareto front and the published results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from kdarena.leaderboards.references import REFERENCE_MODES
from kdarena.leaderboards.render import FORMATS
from kdarena.zoo.errors import UserError

from .app import _fail, app, choices, err, json_format, out

By = choices("By", "macs", "params", "latency")
Format = choices("Format", *FORMATS)
References = choices("References", *REFERENCE_MODES)

# a pipe or a file without COLUMNS gets room for every column
PIPED_WIDTH = 220


def table_width() -> int:
    """The terminal's width; piped, $COLUMNS when set (as a terminal's would be), else room for every column."""
    if out.is_terminal:
        return out.width
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPED_WIDTH


@app.command()
def leaderboard(
    dataset: Annotated[str | None, typer.Option(help="only this dataset: its name as shown, its label (every dataset "
                                                      "with that label) or the start of its fingerprint")] = None,
    teacher: Annotated[str | None, typer.Option(help="only this teacher, by its label, e.g. 'cnn(channels=16)' or resnet56")] = None,
    by: Annotated[By, typer.Option(case_sensitive=False, help="cost axis of the Pareto front")] = "macs",
    pareto_only: Annotated[bool, typer.Option("--pareto-only", help="only our rows on the Pareto front")] = False,
    fmt: Annotated[Format | None, typer.Option("--format", case_sensitive=False, help="default table")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the same as --format json")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write to FILE instead of stdout")] = None,
    export_dir: Annotated[Path | None, typer.Option("--export", metavar="DIR", help="write DIR/<dataset>.md, one Markdown file per dataset")] = None,
    references: Annotated[References, typer.Option(case_sensitive=False, help="published results beside ours: auto = for the datasets we have "
                                                 "runs of (or the --dataset asked for), all, or none")] = "auto",
    no_references: Annotated[bool, typer.Option("--no-references", help="the same as --references none")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")] = None,
) -> None:
    """Rank the students (by val_acc, then MACs, then seeds) with test accuracy ± 95 % CI, the difference from the
    student alone, their cost, the Pareto front and the published results."""
    from kdarena.leaderboards import board as lb
    from kdarena.leaderboards import references as refs_of
    from kdarena.leaderboards import render
    from kdarena.leaderboards.runs import read_runs
    from kdarena.training.tracking import resolve_tracking_uri

    by, references = by.value, references.value
    try:
        fmt = json_format(fmt, as_json) or "table"
        if no_references:
            if references not in ("auto", "none"):
                raise UserError(f"--no-references and --references {references} contradict each other; give one of them")
            references = "none"
        if export_dir is not None and export_dir.exists() and not export_dir.is_dir():
            raise UserError(f"--export {export_dir}: not a directory; pass a folder such as leaderboards/")
        uri = resolve_tracking_uri(tracking_uri)
        runs = read_runs(uri)
        if runs.empty:
            _empty_store(f"No kdarena runs in {uri} yet.", fmt, output)
            return
        board = lb.leaderboard(runs, dataset=dataset, teacher=teacher, by=by)
        if pareto_only:
            board = board[board["pareto"]]
        # the published results stand after ours: the same dataset's first, then the other datasets'
        refs = refs_of.published(board, references, dataset, teacher)
        if board.empty:
            if dataset is None and teacher is None:
                _empty_store(f"No finished full-budget run in {uri} yet ({len(runs)} runs recorded: stopped early, "
                             "diverged, failed or still running).", fmt, output)
                return
            if refs.empty:
                lb.check_filters(runs, dataset, teacher)
            err.print("none of our runs match; showing the published results only", highlight=False)
        rows = refs_of.with_references(board, refs)
        if export_dir is not None:
            for path in render.write_markdown_files(rows, by, export_dir):
                err.print(f"wrote {path}", highlight=False)
            if output is None:
                return
        color = output is None and out.is_terminal
        text = render.render(rows, fmt, by, color=color, width=table_width() if output is None else PIPED_WIDTH)
        if output is not None:
            render.write_atomic(output, text)
            err.print(f"wrote {output}", highlight=False)
        else:
            print(text, end="" if text.endswith("\n") else "\n")
    except UserError as exc:
        _fail(exc)


def _empty_store(message: str, fmt: str, output: Path | None) -> None:
    from kdarena.leaderboards.render import QUICKSTART_COMMAND, empty_document, write_atomic

    hint = f"{message} Start with `{QUICKSTART_COMMAND}` (a few minutes on a laptop), then run `kdarena leaderboard` again."
    if fmt in ("csv", "json"):  # machine formats stay parseable: an empty document on stdout, the hint on stderr
        if output is not None:
            write_atomic(output, empty_document(fmt))
        else:
            print(empty_document(fmt), end="")
        err.print(hint, highlight=False, soft_wrap=True)
    else:
        out.print(hint, highlight=False, soft_wrap=True)
