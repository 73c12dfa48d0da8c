"""Which stages are up to date, stale (and why) or missing, computed from the config alone.

Expected fingerprints are computed in stage order from the current config, each from its
upstream's *expected* fingerprint, so a change upstream makes everything after it stale even
before anything reruns. Nothing here imports TensorFlow: `kp status` must answer in a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.cache import Manifest, fingerprint, fingerprint_inputs, flatten
from pipeline.config import ResolvedConfig
from pipeline.registry import all_stages

UP_TO_DATE, STALE, MISSING = "up to date", "stale", "missing"


@dataclass
class StageStatus:
    name: str
    state: str
    reasons: list[str]
    fingerprint: str
    inputs: dict[str, Any]
    manifest: Manifest | None

    def as_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "stage": self.name,
            "state": self.state,
            "reasons": self.reasons,
            "fingerprint": self.fingerprint,
            "last_run": m.finished if m else None,
            "duration_s": m.duration_s if m else None,
            "headline": m.headline if m else "",
            "metrics": m.metrics if m else {},
            "warnings": m.warnings if m else [],
            "outputs": m.outputs if m else {},
        }


def stage_statuses(config: ResolvedConfig) -> list[StageStatus]:
    stages = all_stages()
    expected: dict[str, str] = {}
    result: list[StageStatus] = []
    for name in config.stage_names:
        stage = stages[name]
        inputs = fingerprint_inputs(stage, config, expected)
        fp = fingerprint(inputs)
        expected[name] = fp
        manifest = Manifest.read(config.work_dir / name)
        if manifest is None:
            state, reasons = MISSING, ["never run" if not (config.work_dir / name).exists() else "no manifest"]
        elif manifest.fingerprint == fp:
            state, reasons = UP_TO_DATE, []
        else:
            state, reasons = STALE, explain(manifest.inputs, inputs) or ["fingerprint changed"]
        result.append(StageStatus(name, state, reasons, fp, inputs, manifest))
    return result


def explain(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why the inputs recorded in a manifest differ from the current ones, one reason a line."""
    reasons: list[str] = []
    if before.get("version") != now["version"]:
        reasons.append(f"code version {before.get('version')} -> {now['version']}")
    old_cfg, new_cfg = flatten(before.get("config", {})), flatten(now["config"])
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in old_cfg:
            reasons.append(f"config {key} added: {new_cfg[key]!r}")
        elif key not in new_cfg:
            reasons.append(f"config {key} removed (was {old_cfg[key]!r})")
        elif old_cfg[key] != new_cfg[key]:
            reasons.append(f"config {key}: {old_cfg[key]!r} -> {new_cfg[key]!r}")
    for name, fp in now["upstream"].items():
        if before.get("upstream", {}).get(name) != fp:
            reasons.append(f"upstream {name} changed")
    if before.get("stamp") != now["stamp"]:
        reasons.append(f"source changed: {before.get('stamp')} -> {now['stamp']}")
    return reasons


def format_table(statuses: list[StageStatus]) -> str:
    """The human table of `kp status`."""
    rows = [("stage", "state", "last run", "took", "result / why stale")]
    for s in statuses:
        m = s.manifest
        when = _short_time(m.finished) if m else "-"
        took = f"{m.duration_s:.1f}s" if m else "-"
        detail = m.headline if (m and s.state == UP_TO_DATE) else "; ".join(s.reasons)
        if m and s.state != UP_TO_DATE and m.headline:
            detail += f"  (last: {m.headline})"
        rows.append((s.name, s.state, when, took, detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _short_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso
