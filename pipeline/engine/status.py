"""Which stages are up to date, stale (and why), restorable or missing: the fingerprints the config
expects, against the manifests and the run cache on disk. It only reads: no variant folder, link,
lock or stamp memo is written (a run keeps `cache.stamp: content`'s hashes in `_cache/stamps.json`).

Early cutoff, as DVC, Bazel and Shake do: a stage's fingerprint holds the content of what it reads
(its config keys, its code, its input files' stamps, and each upstream's outputs: their digest,
`StageStatus.identity`), not the upstream's fingerprint. So an upstream that reruns and writes the
same bytes leaves everything after it up to date. Statuses are computed in stage order: while an
upstream is stale its outputs are not known yet, and what reads it is stale ("upstream X changed")
until it has run; the runner asks again after each stage. A stale stage whose fingerprint is already
in the run cache is `restorable`: the runner points at the stored run instead of recomputing it.
Nothing here imports TensorFlow or pandas: `kp status` must answer in a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.core.artifacts import CACHE_FOLDER
from pipeline.core.cache import Manifest, changed_outputs, file_stamp, fingerprint, flatten, output_problems
from pipeline.core.console import aligned
from pipeline.core.code_version import code_hashes
from pipeline.core.runs import last_action, stage_store
from pipeline.core.stage import Stage
from pipeline.engine.config import ResolvedConfig
from pipeline.engine.registry import all_stages
from pipeline.engine.variants import variant_configs

UP_TO_DATE, STALE, MISSING = "up to date", "stale", "missing"
STAMP_MEMO = "stamps.json"
DIGEST, PENDING = "digest:", "pending:"  # an upstream's identity: its outputs' digest, or (stale) what will run


@dataclass
class StageStatus:
    name: str
    state: str
    reasons: list[str]
    fingerprint: str
    inputs: dict[str, Any]
    manifest: Manifest | None
    restorable: bool = False  # stale, but a stored run with the expected fingerprint is intact
    restored: bool = False  # up to date because the last action restored a stored run
    identity: str = ""  # what a stage reading it is keyed by: DIGEST + its outputs' digest, or PENDING + fp
    same_outputs: bool = False  # up to date, and its last run wrote the same outputs as the run before it

    def as_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "stage": self.name,
            "state": self.state,
            "reasons": self.reasons,
            "fingerprint": self.fingerprint,
            "restorable": self.restorable,
            "restored": self.restored,
            "same_outputs": self.same_outputs,
            "last_run": m.finished if m else None,
            "duration_s": m.duration_s if m else None,
            "headline": m.headline if m else "",
            "metrics": m.metrics if m else {},
            "warnings": m.warnings if m else [],
            "outputs": m.outputs if m else {},
        }


def fingerprint_inputs(stage: Stage, config: ResolvedConfig, upstream: dict[str, str],
                       remember_stamps: bool = False) -> dict[str, Any]:
    """Everything a stage's output depends on, as plain JSON values: its declared config keys, what each
    upstream stage holds for it (`upstream`: by name, `StageStatus.identity`), what the variants it reads
    hold, its code (file hashes) and its source stamp. `remember_stamps`: keep the content stamps' hashes
    in `_cache/stamps.json` (a run does; `kp status` reads only)."""
    memo = config.work_dir / CACHE_FOLDER / STAMP_MEMO
    mode = config.get("cache.stamp")

    def stamp(path):
        return file_stamp(path, mode, memo if mode == "content" else None, remember_stamps)

    return {
        "stage": stage.name,
        "code": code_hashes(*stage.code_modules(config)),
        "config": {key: config.get(key) for key in stage.keys_for(config)},
        "upstream": {name: upstream[name] for name in stage.needs_for(config)},
        "variants": {request.name: _statuses(variant)[request.target].identity
                     for request, variant in variant_configs(config, stage)},
        "stamp": stage.source_stamp(stage.view(config), stamp) if stage.source_stamp else {},
    }


def stage_statuses(config: ResolvedConfig, remember_stamps: bool = False) -> list[StageStatus]:
    """The status of every stage the competition lists, in order. Outputs are checked by size only,
    which takes no time; `damaged_outputs` reads their bytes."""
    return list(_statuses(config, remember_stamps).values())


def expected_fingerprints(config: ResolvedConfig) -> dict[str, str]:
    """{stage: the fingerprint its output must have under `config`, as things stand} for every listed
    stage, in order (a stage after a stale one: until that one has run)."""
    return {name: status.fingerprint for name, status in _statuses(config).items()}


def _statuses(config: ResolvedConfig, remember_stamps: bool = False) -> dict[str, StageStatus]:
    """Every listed stage's status in run order, each fingerprinted on its upstream statuses' identities."""
    stages, found = all_stages(), {}
    for name in config.stage_names:
        stage = stages[name]
        upstream = {needed: found[needed].identity for needed in stage.needs_for(config)}
        inputs = fingerprint_inputs(stage, config, upstream, remember_stamps)
        found[name] = _status(config, stage, fingerprint(inputs), inputs)
    return found


def _status(config: ResolvedConfig, stage: Stage, fp: str, inputs: dict) -> StageStatus:
    folder = config.work_dir / stage.name
    manifest = Manifest.read(folder)
    store = stage_store(config.work_dir, stage.name)
    stored = Manifest.read(store.path(fp)) if store.has(fp) else None
    restorable = stored is not None and stored.fingerprint == fp and not output_problems(
        store.path(fp), stage.outs, stored.outputs)
    pending = PENDING + fp
    if manifest is None:
        reasons = ["never run" if not folder.exists() else "no manifest"]
        identity = DIGEST + (stored.digest or fp) if restorable else pending
        return StageStatus(stage.name, MISSING, reasons, fp, inputs, None, restorable, identity=identity)
    if manifest.fingerprint == fp:
        problems = output_problems(folder, stage.outs, manifest.outputs)
        if problems:
            return StageStatus(stage.name, STALE, problems, fp, inputs, manifest, identity=pending)
        last = last_action(config.work_dir, stage.name)
        now = last.get("fingerprint") == fp
        return StageStatus(stage.name, UP_TO_DATE, [], fp, inputs, manifest,
                           restored=now and last.get("action") == "restored",
                           identity=DIGEST + (manifest.digest or fp), same_outputs=now and bool(last.get("same_outputs")))
    reasons = explain(manifest.inputs, inputs) or ["fingerprint changed"]
    identity = DIGEST + (stored.digest or fp) if restorable else pending
    return StageStatus(stage.name, STALE, reasons, fp, inputs, manifest, restorable, identity=identity)


def check_settings(config: ResolvedConfig, statuses: list[StageStatus], names: list[str]) -> None:
    """Each of `names`' `Stage.check`, given the metrics of its upstream stages that are up to date:
    settings the data cannot satisfy fail before anything runs, naming the key, not at run time in
    a library's words (split.folds against the download's counts)."""
    stages = all_stages()
    current = {s.name: s.manifest.metrics for s in statuses if s.state == UP_TO_DATE}
    for name in names:
        stage = stages[name]
        if stage.check is not None:
            known = {upstream: current[upstream] for upstream in stage.needs_for(config) if upstream in current}
            stage.check(config.section(stage.section), known)


def damaged_outputs(config: ResolvedConfig, statuses: list[StageStatus]) -> dict[str, list[str]]:
    """The up-to-date stages among `statuses` whose outputs no longer hold the bytes their run wrote
    (`changed_outputs`), with the reasons: what `kp status --verify` reports and a `--force` run
    rewrites before building on them."""
    damaged = {}
    for status in statuses:
        if status.state == UP_TO_DATE:
            reasons = changed_outputs(config.work_dir / status.name, status.manifest)
            if reasons:
                damaged[status.name] = reasons
    return damaged


def explain(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why the inputs recorded in a manifest differ from the current ones, one reason a line."""
    reasons: list[str] = []
    old_code, new_code = before.get("code", {}), now["code"]
    changed = sorted(f for f in set(old_code) | set(new_code) if old_code.get(f) != new_code.get(f))
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        reasons.append(f"code changed: {shown}")
    old_cfg, new_cfg = flatten(before.get("config", {})), flatten(now["config"])
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in old_cfg:
            reasons.append(f"config {key} added: {new_cfg[key]!r}")
        elif key not in new_cfg:
            reasons.append(f"config {key} removed (was {old_cfg[key]!r})")
        elif old_cfg[key] != new_cfg[key]:
            reasons.append(f"config {key}: {old_cfg[key]!r} -> {new_cfg[key]!r}")
    for kind, key in (("upstream", "upstream"), ("variant", "variants")):
        for name, identity in now[key].items():
            was = before.get(key, {}).get(name)
            if was != identity:  # rerun with other bytes, or not up to date yet (its outputs are not known)
                rewritten = str(was).startswith(DIGEST) and identity.startswith(DIGEST)
                reasons.append(f"{kind} {name} " + ("was rerun and its outputs changed" if rewritten else "changed"))
    if before.get("stamp") != now["stamp"]:
        reasons.append(f"source changed: {before.get('stamp')} -> {now['stamp']}")
    return reasons


def format_table(statuses: list[StageStatus], submitted: str | None = None) -> str:
    """The human table of `kp status`, in run order; `submitted`: the stage whose predictions are submitted
    (`submit.source`), marked `*` with a line saying so."""
    rows = [("stage", "state", "last run", "took", "result / why stale")]
    marked = submitted if any(s.name == submitted for s in statuses) else None
    for s in statuses:
        m = s.manifest
        when = _short_time(m.finished) if m else "-"
        took = f"{m.duration_s:.1f}s" if m else "-"
        state = s.state + (" (restored from the run cache)" if s.restored
                           else " (reran: same outputs)" if s.same_outputs else "")
        detail = m.headline if (m and s.state == UP_TO_DATE) else "; ".join(s.reasons)
        if s.restorable:
            detail += "  [restorable from the run cache]"
        if m and s.state != UP_TO_DATE and m.headline:
            detail += f"  (last: {m.headline})"
        rows.append((s.name + (" *" if s.name == marked else ""), state, when, took, detail))
    table = aligned(rows)
    if marked:
        table += f"\n* submitted: {marked}'s predictions are what kp submit writes (submit.source)"
    return table


def _short_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso
