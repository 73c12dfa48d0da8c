"""The leaderboard ledger: each upload's validation score beside the score Kaggle gave it.

`submissions/COMP/ledger.csv` gets one row per upload (`kp submit --upload`), written when the
upload is accepted (status `pending`) and completed when the score comes back (`complete`, or
`error` with Kaggle's reason). `kind` is `csv` (the file was uploaded) or `code` (a kernel version was submitted: `file` names it,
`USER/KERNEL vN`). `difference` is leaderboard minus validation: a split that flatters
validation shows as a large one. The file is rewritten whole through a temporary file, under a
lock, so a crash never leaves half a row; it is read with the csv module only, so `kp status`
stays fast.
"""
from __future__ import annotations

import csv
import fcntl
import io
from pathlib import Path

from pipeline.core.artifacts import LEDGER_FILE
from pipeline.core.cache import write_text_atomic
from pipeline.core.config_reader import ConfigReader
from pipeline.core.console import aligned
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_rows
from pipeline.kaggle.submissions import COMPLETE, ERROR, PENDING  # noqa: F401 (the ledger's statuses)
COLUMNS = ["time", "file", "fingerprint", "split_strategy", "validation", "metric", "val_score", "lb_score",
           "difference", "status", "ref", "error", "description", "kind"]
NUMERIC_COLUMNS = ("val_score", "lb_score", "difference", "ref")  # a number or empty
# Columns added after ledgers were first written, with the value an older ledger's rows had.
ADDED_COLUMNS = {"validation": "holdout", "kind": "csv"}


def ledger_path(config: ConfigReader) -> Path:
    return config.submissions_dir / LEDGER_FILE


def read_ledger(path: Path) -> list[dict[str, str]]:
    """Every row of the ledger ([] when there is none yet).

    Raises:
        PipelineError: the file lacks columns, has a short or long row or a non-number where a score
            belongs (naming the line); it is then never rewritten (`record` reads first).
    """
    if not path.is_file():
        return []
    try:
        rows = read_rows(path, [c for c in COLUMNS if c not in ADDED_COLUMNS], numeric=NUMERIC_COLUMNS)
    except PipelineError as exc:
        raise PipelineError(f"{exc}; the ledger was left as it is: repair it or move it away") from None
    return [{**row, **{c: v for c, v in ADDED_COLUMNS.items() if c not in row}} for row in rows]


def write_ledger(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def record(path: Path, row: dict) -> None:
    """Add `row`, or replace the row with the same submission ref (one writer at a time: two uploads
    finishing together each keep their row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in read_ledger(path) if str(r["ref"]) != str(row["ref"])]
        write_ledger(path, [*rows, row])


def with_score(row: dict, status: str, lb_score: float | None, error: str | None) -> dict:
    """`row` completed by what Kaggle answered."""
    done = {**row, "status": status, "error": error or ""}
    if lb_score is not None:
        done["lb_score"] = f"{lb_score:.5f}"
        done["difference"] = f"{lb_score - float(row['val_score']):+.5f}"
    return done


def _design(row: dict[str, str]) -> str:
    """The validation design of a row: the split, and `cvF-oof` when its score is out-of-fold."""
    validation = row.get("validation") or "holdout"
    return row["split_strategy"] + ("" if validation == "holdout" else f" {validation}")


def format_ledger(rows: list[dict[str, str]]) -> str:
    """The rows as an aligned table (time, what was submitted, split, validation, leaderboard, difference, status)."""
    table = [("time", "kind", "submitted", "split", "metric", "valid", "leaderboard", "lb - valid", "status")]
    for r in rows:
        status = r["status"] + (f" ({r['error']})" if r.get("error") else "")
        submitted = r["file"] if r["kind"] == "code" else Path(r["file"]).name
        table.append((r["time"][:16].replace("T", " "), r["kind"], submitted, _design(r), r["metric"],
                      r["val_score"], r["lb_score"] or "-", r["difference"] or "-", status))
    return aligned(table)


def plot_ledger(rows: list[dict[str, str]], path: Path, title: str) -> None:
    """ledger.png: leaderboard vs validation score, one point per scored submission, with y = x."""
    from pipeline.evaluation.plots import pyplot

    plt = pyplot()
    scored = [r for r in rows if r["lb_score"]]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for design in sorted({_design(r) for r in scored}):
        points = [(float(r["val_score"]), float(r["lb_score"])) for r in scored if _design(r) == design]
        ax.plot(*zip(*points), "o", label=f"split: {design}", alpha=0.8)
    values = [float(r[key]) for r in scored for key in ("val_score", "lb_score")]
    if values:
        lo, hi = min(values), max(values)
        pad = 0.05 * (hi - lo or 1)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x (validation predicts LB)")
        ax.legend()
    metric = scored[0]["metric"] if scored else ""
    ax.set_xlabel(f"validation {metric}")
    ax.set_ylabel(f"leaderboard {metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
