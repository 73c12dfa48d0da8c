"""`kp report`: one self-contained HTML file with everything a run left behind (`work/COMP/report.html`).

First what is submitted (`submit.source`): its confusion heat map and per-class precision and recall
on its own validation rows, its curves, the settings it ran with and what changed since its run
before. Then the stage graph and each stage's state, its headline, run time and scores, its plots (training
curves, confusion matrix, top losses, ensemble members, augmentation preview), the most confused
class pairs, the ensemble member, cv fold and blend source tables, each sweep's trials and figure, the ladder of validation scores across the
predicting stages, the learning-rate range tests and `kp show` grids when they exist, and the
ledger with its plot. Rendered with Jinja2 (`pipeline/experiments/templates/report.html.j2`, autoescaped);
images are embedded as data URIs, so the file opens anywhere with no network. Nothing here
imports TensorFlow.
"""
from __future__ import annotations

import base64
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.artifacts import (CONFUSION_PLOT, LEDGER_PLOT, LOSS_PLOT, LR_FIND_DIR, LR_FIND_PLOT, MEMBERS_PLOT,
                                     PREVIEW_PLOT, HTML_REPORT_FILE, SHOW_DIR, TOP_LOSSES_PLOT)
from pipeline.core.errors import PipelineError
from pipeline.engine.status import UP_TO_DATE, stage_statuses

if TYPE_CHECKING:
    from pipeline.engine.config import ResolvedConfig

PLOTS = (LOSS_PLOT, CONFUSION_PLOT, TOP_LOSSES_PLOT, MEMBERS_PLOT, PREVIEW_PLOT)  # a stage's own plots, in order
CAPTIONS = {  # what each plot shows, under it in the report
    LOSS_PLOT: "Learning curves: training and validation loss (left) and accuracy (right) per epoch.",
    CONFUSION_PLOT: "Confusion matrix on the validation rows: true class down, predicted class across.",
    TOP_LOSSES_PLOT: "The validation rows with the highest loss: each image with its true class, the predicted "
                     "class and that class's probability.",
    MEMBERS_PLOT: "Each ensemble member's validation log loss beside the ensemble's.",
    PREVIEW_PLOT: "Training images (left) beside their versions in the first augmented passes.",
}
SCORES = ("val_log_loss", "val_accuracy", "val_log_loss_clipped", "val_accuracy_clipped")


def code_spans(text: str):
    """`text` escaped for HTML, with each `span` between backticks (as kp's messages quote keys and
    commands) set as <code>: no literal backtick reaches the page."""
    import re

    from markupsafe import Markup, escape

    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def png_uri(data: bytes) -> str:
    """A PNG's bytes as a data URI (the report embeds every image)."""
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


def embedded(path: Path) -> str | None:
    """A PNG file as a data URI, or None when it does not exist."""
    return png_uri(path.read_bytes()) if path.is_file() else None


def _stage_section(config: ResolvedConfig, status) -> dict:
    from pipeline.engine.registry import all_stages

    stage, m = all_stages()[status.name], status.manifest
    metrics = m.metrics if m else {}
    folder = config.work_dir / status.name
    return {
        "name": status.name,
        "state": status.state + (" (restored from the run cache)" if status.restored else ""),
        "current": status.state == UP_TO_DATE,
        "reasons": status.reasons,
        "finished": m.finished if m else None,
        "duration_s": m.duration_s if m else None,
        "headline": m.headline if m else "",
        "needs": list(status.inputs.get("upstream", {})),
        "scores": {key: metrics[key] for key in SCORES if isinstance(metrics.get(key), (int, float))},
        "validation": metrics.get("validation", "holdout") if "val_log_loss" in metrics else None,
        "plots": [(name, uri, CAPTIONS[name]) for name in PLOTS if (uri := embedded(folder / name))],
        "most_confused": metrics.get("most_confused", []),
        "members": metrics.get("members", []),
        "predicts": stage.predicts is not None,
        "blend_sources": [{"name": name, "weight": metrics.get("weights", {}).get(name, 0.0), **scores}
                          for name, scores in metrics.get("sources", {}).items()] if stage.variants else [],
        "folds": metrics.get("fold_runs") or [row for row in metrics.get("students", []) if row.get("fold")],
        "warnings": m.warnings if m else [],
    }


def _ladder(stages: list[dict]) -> list[dict]:
    """The predicting stages' validation log loss in pipeline order, each with its change on the one before."""
    rows, previous = [], None
    for stage in stages:
        loss = stage["scores"].get("val_log_loss")
        if loss is None or not stage["predicts"]:
            continue
        rows.append({"stage": stage["name"], "validation": stage["validation"], "val_log_loss": loss,
                     "val_accuracy": stage["scores"].get("val_accuracy"),
                     "change": None if previous is None else loss - previous, "current": stage["current"]})
        previous = loss
    return rows


def _submitted_section(config: ResolvedConfig, stages: list[dict]) -> dict | None:
    """What is submitted (`submit.source`), in full: its confusion heat map and per-class precision and
    recall on its own validation rows (drawn here from its predictions, whatever the stage: an ensemble,
    a cv, a blend), its learning curves where it trained one model, and the settings it ran with."""
    import io

    import numpy as np

    from pipeline.core.cache import Manifest, flatten
    from pipeline.evaluation.plots import plot_confusion
    from pipeline.evaluation.predictions import load_predictions

    name = config.get("submit.source")
    stage = next((s for s in stages if s["name"] == name and s["predicts"]), None)
    folder = config.work_dir / str(name)
    manifest = Manifest.read(folder) if stage else None
    if manifest is None:
        return None
    try:
        predictions = load_predictions(folder)
    except (PipelineError, OSError):  # a damaged result: the stage's own section says what it has
        return None
    classes = config.competition.classes
    labels, predicted = np.asarray(predictions.valid_labels), np.asarray(predictions.valid_probs).argmax(axis=1)
    buffer = io.BytesIO()
    plot_confusion(labels, predicted, classes, buffer, f"{config.comp} {name}: {len(labels):,} validation rows")
    per_class = []
    for k, label in enumerate(classes):
        hits = int(((labels == k) & (predicted == k)).sum())
        said, actual = int((predicted == k).sum()), int((labels == k).sum())
        per_class.append({"class": label, "support": actual, "precision": hits / said if said else None,
                          "recall": hits / actual if actual else None})
    settings = flatten(manifest.inputs.get("config", {}))
    return {"name": name, "confusion": png_uri(buffer.getvalue()),
            "per_class": per_class, "curves": embedded(folder / LOSS_PLOT) or _models_curves(config, name, manifest),
            "validation": stage["validation"],
            "settings": sorted(settings.items()), "fingerprint": manifest.fingerprint,
            "since": _since_the_run_before(config, name)}


def _models_curves(config: ResolvedConfig, name: str, manifest) -> str | None:
    """The learning curves of the models a stage averages (`Predicts.models`: an ensemble's members, a
    cv's folds), drawn from each stored model's `history.csv`, as a data URI; None when it has none."""
    import io

    from pipeline.core.artifacts import HISTORY_FILE
    from pipeline.core.readers import read_table
    from pipeline.core.runs import unit_store
    from pipeline.evaluation.plots import plot_model_curves

    models = config.predicts(name).models
    if models is None:
        return None
    store = unit_store(config.work_dir, name, models[0])
    histories = []
    for row in manifest.metrics.get(models[1], []):
        path = store.path(str(row.get("key", ""))) / HISTORY_FILE
        if row.get("key") and path.is_file():
            histories.append({column: values.tolist() for column, values in read_table(path).items()})
    if not histories:
        return None
    buffer = io.BytesIO()
    plot_model_curves(histories, buffer, f"{config.comp} {name}: the learning curves of its {len(histories)} models")
    return png_uri(buffer.getvalue())


def _since_the_run_before(config: ResolvedConfig, name: str) -> dict | None:
    """What changed since the stored run of stage `name` before its current one: each setting that differs
    (its value then and now) and the score then and now; None when there is no earlier run."""
    from pipeline.experiments.run_table import score_key, stored_runs

    rows = stored_runs(config, (name,))
    current = next((row for row in rows if row["current"]), None)
    earlier = [row for row in rows if current and not row["current"] and row["finished"] < current["finished"]]
    if current is None or not earlier:
        return None
    before, score = earlier[0], score_key(config)
    settings = []
    for key, then in sorted(before["differs"].items()):
        try:
            now = config.get(key)
        except KeyError:
            now = None
        settings.append({"key": key, "then": then, "now": now})
    return {"finished": before["finished"][:16].replace("T", " "), "fingerprint": before["fingerprint"],
            "score": score, "then": before[score], "now": current[score], "settings": settings}


def _kernel_section(config: ResolvedConfig) -> dict | None:
    """The bundle `kp package` wrote last (its source, size and the kernel's time against the limit), or None."""
    import json

    from pipeline.core.artifacts import BUNDLE_DIR, BUNDLE_FILE, PACKAGE_DIR

    path = config.work_dir / PACKAGE_DIR / BUNDLE_DIR / BUNDLE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    timing = record.get("timing")  # a bundle packaged before kp timed kernels has none, nor a list of networks
    return {**record, "timing": timing, "line": timing["summary"].rstrip(".") if timing else None,
            "networks": record.get("networks", [])}


def build_report(config: ResolvedConfig) -> Path:
    """Write `work/COMP/report.html` from what the work folder holds now; runs nothing.

    Args:
        config: the resolved config.

    Returns:
        The report's path.
    """
    import jinja2

    from pipeline.core.cache import claim_work_folder, write_text_atomic
    from pipeline.experiments.sweeps import draw_sweep, finished, score_name_of, sweeps
    from pipeline.kaggle.ledger import ledger_path, read_ledger

    statuses = stage_statuses(config)
    stages = [_stage_section(config, status) for status in statuses]
    extras = [(f"{LR_FIND_DIR}/{path.parent.name}", embedded(path))
              for path in sorted((config.work_dir / LR_FIND_DIR).glob(f"*/{LR_FIND_PLOT}"))]
    extras += [(f"{SHOW_DIR}/{path.name}", embedded(path)) for path in sorted((config.work_dir / SHOW_DIR).glob("*.png"))]
    damaged: list[str] = []  # a sweep whose file is damaged is left out, said in the report
    studies = [{"name": name, "trials": trials, "score": score_name_of(trials),
                "plot": embedded(draw_sweep(config.work_dir, name, trials)) if finished(trials) else None}
               for name, trials in sweeps(config.work_dir, damaged).items() if trials]
    environment = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.experiments", "templates"),
                                     autoescape=jinja2.select_autoescape(["html", "j2"]),
                                     undefined=jinja2.StrictUndefined)
    environment.filters["code"] = code_spans
    html = environment.get_template("report.html.j2").render(
        comp=config.comp,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        work_dir=str(config.work_dir),
        stages=stages,
        ladder=_ladder(stages),
        extras=extras,
        sweeps=studies,
        damaged_sweeps=damaged,
        submitted=_submitted_section(config, stages),
        kernel=_kernel_section(config),
        ledger=read_ledger(ledger_path(config)),
        ledger_plot=embedded(config.submissions_dir / LEDGER_PLOT),
    )
    path = config.work_dir / HTML_REPORT_FILE
    claim_work_folder(config.work_dir)  # a competition that never ran gets a work folder kp owns, not a stray one
    write_text_atomic(path, html)
    return path
