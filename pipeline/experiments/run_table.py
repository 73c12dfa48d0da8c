"""`kp runs`: every stored result of the predicting stages side by side, the score it is compared on, and
the best one's settings as an overlay.

The rows come from the manifests in `work/COMP/_runs/STAGE/`, so hand-run variants, blend sources and
sweep trials all appear, each with the settings that differ from the config it is compared with (what
the run and the upstream runs it read used, walked through their manifests), its validation score and
fold spread, and its leaderboard score when a submission made from it was uploaded and scored (the
ledger names the submit run; that run's manifest names the result it submitted).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TYPE_CHECKING

import yaml

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.engine.config import ResolvedConfig


def score_key(config: ResolvedConfig) -> str:
    """The validation score runs are compared on (`pipeline.evaluation.metrics.Score.name`)."""
    from pipeline.evaluation.metrics import score_for

    return score_for(config.competition.metric).name


def ranked(config: ResolvedConfig, rows: list[dict]) -> list[dict]:
    """`rows` best first by the competition's metric (ties keep their order; rows without the score last)."""
    from pipeline.evaluation.metrics import score_named

    name = score_key(config)
    score = score_named(name)
    return sorted(rows, key=lambda row: (row.get(name) is None, score.loss(row.get(name) or 0)))


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """A nested config value as {dotted key: leaf}."""
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def differences(config: ResolvedConfig, used: dict[str, Any]) -> dict[str, Any]:
    """The settings a run used (a manifest's `inputs.config`) that differ from `config`'s, as dotted keys."""
    changed = {}
    for key, value in used.items():
        try:
            now = flatten(config.get(key), key)
        except KeyError:
            now = {}
        for dotted, leaf in flatten(value, key).items():
            if dotted not in now or now[dotted] != leaf:
                changed[dotted] = leaf
    return changed


def settings_used(work_dir: Path, manifest) -> dict[str, Any]:
    """The config values a stored run and the upstream runs it read used (its manifest's `inputs.config`, then
    those of the runs it read, `Manifest.reads`, found in the run cache): what made the result."""
    from pipeline.core.cache import Manifest
    from pipeline.core.runs import stage_store

    used, seen, waiting = {}, set(), [manifest]
    while waiting:
        current = waiting.pop()
        for key, value in current.inputs.get("config", {}).items():
            used.setdefault(key, value)
        for stage, key in (current.reads or current.inputs.get("upstream", {})).items():
            if (stage, key) not in seen:
                seen.add((stage, key))
                upstream = Manifest.read(stage_store(work_dir, stage).path(key))
                if upstream is not None:
                    waiting.append(upstream)
    return used


def leaderboard_scores(config: ResolvedConfig) -> dict[tuple[str, str], float]:
    """{(stage, fingerprint): leaderboard score} for each stored result a scored upload was made from (the
    newest scored upload of it), joined through the ledger's submit fingerprint and that submit run's manifest."""
    from pipeline.core.cache import Manifest
    from pipeline.core.runs import stage_store
    from pipeline.kaggle.ledger import COMPLETE, ledger_path, read_ledger

    scores = {}
    for row in sorted(read_ledger(ledger_path(config)), key=lambda row: row["time"]):
        if row["status"] != COMPLETE or row["lb_score"] is None:
            continue
        submitted = Manifest.read(stage_store(config.work_dir, "submit").path(row["fingerprint"]))
        if submitted is None:  # that submit run was cleaned away: nothing names its source's run any more
            continue
        source = submitted.metrics.get("source")
        key = (submitted.reads or submitted.inputs.get("upstream", {})).get(source)
        if key is not None:
            scores[(source, key)] = float(row["lb_score"])
    return scores


def stored_runs(config: ResolvedConfig, stages: tuple[str, ...] | None = None) -> list[dict]:
    """Every stored result of the predicting stages (`work/COMP/_runs/STAGE/`), newest first.

    Args:
        config: the config the runs are compared with (their `differs` column).
        stages: only these stages (None: every predicting stage).

    Returns:
        One row each: stage, fingerprint, finished, duration, score, validation kind, fold spread,
        leaderboard score (None where none came back), whether it is the stage's current result, and
        the settings that differ from `config`'s.
    """
    from pipeline.core.cache import Manifest
    from pipeline.core.runs import current_key, stage_store
    from pipeline.engine.registry import predicting_stages

    rows, leaderboard = [], leaderboard_scores(config)
    for stage in stages or predicting_stages():
        current = current_key(config.work_dir, stage)
        for entry in stage_store(config.work_dir, stage).entries():
            manifest = Manifest.read(entry.path)
            if manifest is None or "val_log_loss" not in manifest.metrics:
                continue
            m = manifest.metrics
            rows.append({"stage": stage, "fingerprint": entry.key, "finished": manifest.finished,
                         "duration_s": manifest.duration_s, "val_log_loss": m["val_log_loss"],
                         "val_accuracy": m.get("val_accuracy"), "validation": m.get("validation", "holdout"),
                         "fold_min": m.get("fold_val_log_loss_min"), "fold_max": m.get("fold_val_log_loss_max"),
                         "lb_score": leaderboard.get((stage, entry.key)), "current": entry.key == current,
                         "differs": differences(config, settings_used(config.work_dir, manifest))})
    return sorted(rows, key=lambda row: row["finished"], reverse=True)


def best_overlay(config: ResolvedConfig, rows: list[dict]) -> tuple[dict, str]:
    """The best row by the competition's metric, and its differing settings as overlay YAML (for `--config`)."""
    if not rows:
        raise PipelineError(f"no stored runs to choose from in {config.work_dir}")
    name = score_key(config)
    best = ranked(config, rows)[0]
    nested: dict = {}
    for dotted, value in best["differs"].items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    header = (f"# the best stored {best['stage']} run ({best['fingerprint']}, {best['validation']} {name} "
              f"{best[name]:.5f}, {best['finished']}): its settings that differ from this config\n")
    return best, header + (yaml.safe_dump(nested, sort_keys=False) if nested else "{}\n")


def format_runs(rows: list[dict], score_name: str) -> str:
    """`kp runs`' table: one header, the competition's own score (`score_name`) in its column, the folds'
    spread of a cv run, the leaderboard's score only when a run was uploaded, `*` on each stage's
    current result, and the settings that differ from the config.

    Args:
        rows: `stored_runs` rows, in the order to show them.
        score_name: `val_log_loss` or `val_accuracy` (`score_key`).
    """
    from pipeline.core.console import aligned

    uploaded = any(row["lb_score"] is not None for row in rows)
    header = ["", "stage", "run", score_name, "validation", "folds (log loss)", *(["leaderboard"] if uploaded else []),
              "finished", "took", "settings that differ"]
    table = [header]
    for row in rows:
        score = row.get(score_name)
        spread = f"{row['fold_min']:.3f}-{row['fold_max']:.3f}" if row["fold_min"] is not None else "-"
        board = [f"{row['lb_score']:.5f}" if row["lb_score"] is not None else "-"] if uploaded else []
        differs = " ".join(f"{key}={json.dumps(value)}" for key, value in row["differs"].items()) or "(as configured)"
        table.append(["*" if row["current"] else "", row["stage"], row["fingerprint"],
                      f"{score:.5f}" if score is not None else "-", row["validation"], spread, *board,
                      row["finished"][:16].replace("T", " "), f"{row['duration_s']:.0f}s", differs])
    return aligned(table)

