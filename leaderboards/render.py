"""The leaderboard rendered: Markdown, CSV, JSON and the terminal table, and the files `--export` writes."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path


import pandas as pd

from .board import cost_column
from .references import REPORTED
from .text import LEGEND, _num, accuracy_text, human, rank_labels, versus_alone_text

FORMATS = ("table", "markdown", "csv", "json")
# the columns `--format csv|json` write, ours and the reported rows alike
FIELDS = ["rank", "dataset", "teacher", "student", "method", "test_acc_mean", "test_acc_std", "n_seeds",
          "test_acc_ci_low", "test_acc_ci_high", "val_acc_mean", "vs_student_diff", "vs_student_n", "vs_student_p",
          "distinguishable", "seeds", "test_accs", "params", "macs", "flops", "latency_ms", "latency_noise_ms", "key_hparams", "pareto", "source", "reported", "run_id",
          "sweep", "variant", "test_errors", "test_size", "note", "dataset_label", "dataset_fingerprint"]


QUICKSTART_COMMAND = "kdarena sweep --preset quickstart"


def display_rows(rows: pd.DataFrame) -> list[dict[str, str]]:
    """Each row as the strings the terminal table and the Markdown export show."""
    out = []
    records = rows.to_dict("records")
    ours = [r for r in records if not r.get("reported")]
    # ranks count within a dataset: a rank two rows of one dataset share reads =N
    shown = dict(zip(((r["dataset"], int(r["rank"])) for r in ours),
                     rank_labels([int(r["rank"]) for r in ours], [r["dataset"] for r in ours])))
    for row in records:
        reported = bool(row.get("reported"))
        method = row["method"] + (f" ({row['variant']})" if reported and row.get("variant") else "")
        latency = row["latency_ms"]
        val = row.get("val_acc_mean")
        out.append({"rank": "ref" if reported else shown[(row["dataset"], int(row["rank"]))],
                    "teacher": row["teacher"] or "—",
                    "student": row["student"], "method": method, "test_acc": accuracy_text(row),
                    "vs_alone": versus_alone_text(row),
                    "val_acc": f"{100 * val:.2f} %" if _num(val) and not reported else "—",
                    "params": human(row["params"]),
                    "macs": human(row["macs"]) if _num(row["macs"]) or not _num(row.get("flops"))
                    else f"{human(row['flops'])} FLOPs",
                    "latency": f"{latency:.3f} ms" if _num(latency) else "—", "hparams": row["key_hparams"] or "",
                    "pareto": "★" if row["pareto"] else "", "source": row["source"]})
    return out


DISPLAY_HEADERS = {"rank": "rank", "teacher": "teacher", "student": "student", "method": "method",
                   "test_acc": "test_acc", "vs_alone": "vs alone", "val_acc": "val_acc", "params": "params", "macs": "MACs", "latency": "latency",
                   "hparams": "key hyper-parameters", "pareto": "Pareto", "source": "source"}


def markdown_table(rows: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of leaderboard (and reference) rows."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(DISPLAY_HEADERS.values()) + " |", "|" + "---|" * len(DISPLAY_HEADERS)]
    for r in display_rows(rows):
        lines.append("| " + " | ".join(cell(r[k]) for k in DISPLAY_HEADERS) + " |")
    return "\n".join(lines)


def markdown_report(rows: pd.DataFrame, *, by: str = "macs", title: str | None = None) -> str:
    """Markdown for one or more datasets: a section per dataset, ours ranked, then the reported rows."""
    cost = {"macs": "MACs", "params": "parameters", "latency_ms": "latency"}[cost_column(by)]
    parts = [f"# {title}\n"] if title else []
    for ds in dict.fromkeys(rows["dataset"].tolist()):
        part = rows[rows["dataset"] == ds]
        parts.append(f"## {ds}\n\n{markdown_table(part)}\n")
    parts.append(f"★ = on the Pareto front of test accuracy vs {cost} (per dataset and teacher). {LEGEND} Rows "
                 f"marked `ref` are {REPORTED.rstrip(': ')}: published figures, never ranked among ours.\n")
    return "\n".join(parts)


def frame_for_export(rows: pd.DataFrame) -> pd.DataFrame:
    """The CSV / JSON columns: counts as integers (or empty), flags as booleans."""
    frame = rows.reindex(columns=FIELDS).copy()
    for col in ("rank", "n_seeds", "vs_student_n", "test_errors", "test_size"):
        frame[col] = frame[col].astype("Float64").round().astype("Int64")
    frame["pareto"] = frame["pareto"].astype(bool)
    frame["reported"] = frame["reported"].astype(bool)
    return frame


def empty_document(fmt: str) -> str:
    """What a machine format prints for no rows: still parseable."""
    return "[]\n" if fmt == "json" else ",".join(FIELDS) + "\n"


def render(rows: pd.DataFrame, fmt: str, by: str, *, color: bool = False, width: int = 220) -> str:
    """Leaderboard (and reference) rows as `fmt`: table (a terminal's, `width` wide), markdown, csv or json."""
    if fmt == "markdown":
        return markdown_report(rows, by=by, title="kdarena leaderboard")
    if fmt == "csv":
        return frame_for_export(rows).to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(frame_for_export(rows).to_json(orient="records", double_precision=15)), indent=2) + "\n"
    from rich.console import Console

    buffer = io.StringIO()

    def console_of(columns: int) -> Console:
        return Console(file=buffer, width=columns, force_terminal=color, no_color=not color, highlight=False)

    console = console_of(width)
    cost = {"macs": "MACs", "params": "params", "latency": "latency"}[by]
    hidden: dict[str, None] = {}
    for ds in dict.fromkeys(rows["dataset"]):
        part = rows[rows["dataset"] == ds]
        table, table_width, dropped = fitting_table(
            console, f"{ds}: ranked by val_acc, then MACs, then seeds; ★ = Pareto front vs {cost}",
            display_rows(part), part["reported"].tolist(), by)
        hidden.update(dict.fromkeys(dropped))
        (console if table_width <= width else console_of(table_width)).print(table)
    narrow = (f" Not shown at {width} columns: {', '.join(DISPLAY_HEADERS[k] for k in hidden)} (a wider terminal, "
              "COLUMNS=N when piped, or --format markdown shows them)." if hidden else "")
    console.print(LEGEND + (" ref = reported (not reproduced): a published figure, shown for context, never ranked "
                            "among ours." if rows["reported"].any() else "") + narrow,
                  soft_wrap=True)
    return buffer.getvalue()


# figures are never cut: at a narrow width whole columns give way instead, the least needed first (never the cost
# axis the front is drawn against), and the text columns fold, down to TEXT_MIN characters
GIVE_WAY = ("hparams", "source", "latency", "val_acc", "params", "vs_alone", "teacher", "macs")
FIGURES = ("rank", "test_acc", "vs_alone", "val_acc", "params", "macs", "latency", "pareto")
TEXT_MIN = 8


def fitting_table(console, title: str, shown: list[dict[str, str]], dim: list[bool], by: str):
    """The widest table of `shown` that fits `console` without cutting a figure, its width, and the columns left
    out; when even the fewest columns are wider than the console, the table is wider (the terminal wraps it)."""
    from rich.cells import cell_len
    from rich.table import Table

    natural = {k: max(cell_len(text) for text in [DISPLAY_HEADERS[k], *(r[k] for r in shown)]) for k in DISPLAY_HEADERS}

    def least(k: str) -> int:
        return natural[k] if k in FIGURES else min(natural[k], TEXT_MIN)

    def frame(columns: list[str]) -> int:  # a space either side of each column and a rule between and around
        return 3 * len(columns) + 1

    columns = list(DISPLAY_HEADERS)
    give_way = [k for k in GIVE_WAY if k != by]  # `by` names its display column
    while give_way and sum(map(least, columns)) + frame(columns) > console.width:
        columns.remove(give_way.pop(0))
    # every column's width set here: rich's own shrinking would cut figures
    widths = {k: least(k) for k in columns}
    spare = console.width - sum(widths.values()) - frame(columns)
    for k in sorted((k for k in columns if k not in FIGURES), key=lambda k: natural[k]):
        extra = max(0, min(natural[k] - widths[k], spare))
        widths[k] += extra
        spare -= extra
    table = Table(title=title)
    for k in columns:
        table.add_column(DISPLAY_HEADERS[k], width=widths[k], no_wrap=k in FIGURES, overflow="fold")
    for r, reported in zip(shown, dim):
        table.add_row(*(r[k] for k in columns), style="dim" if reported else None)
    return table, sum(widths.values()) + frame(columns), [k for k in DISPLAY_HEADERS if k not in columns]


def write_markdown_files(rows: pd.DataFrame, by: str, folder: Path) -> list[Path]:
    """`--export DIR`: one Markdown file per dataset, named by a slug of its name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in dict.fromkeys(rows["dataset"]):
        path = folder / f"{slug(ds)}.md"
        write_atomic(path, markdown_report(rows[rows["dataset"] == ds], by=by, title=f"kdarena leaderboard: {ds}"))
        paths.append(path)
    return paths


def slug(name: str) -> str:
    """A file name from any dataset name in the (possibly shared) store: never a path, never hidden."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "dataset"


def write_atomic(path: Path, text: str) -> None:
    """All or nothing: a half-written leaderboard never replaces a good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)
