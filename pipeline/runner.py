"""Runs stages in order, skipping the up-to-date ones, each into an output folder that appears whole.

`kp STAGE` runs STAGE and whatever it needs that is not up to date; `kp all` runs every stage the
competition lists. Only one run per competition at a time (a lock file in its work folder).
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

from pipeline.cache import Manifest, atomic_output_dir, competition_lock, output_sizes, sweep_partial
from pipeline.config import ResolvedConfig
from pipeline.errors import PipelineError
from pipeline.registry import all_stages
from pipeline.stage import StageContext
from pipeline.status import UP_TO_DATE, StageStatus, stage_statuses

CACHE_FOLDER = "_cache"


def plan(config: ResolvedConfig, targets: list[str] | None) -> list[str]:
    """The targets plus every stage they need, in the competition's stage order."""
    stages = all_stages()
    listed = config.stage_names
    if targets is None:
        return listed
    wanted: set[str] = set()

    def need(name: str) -> None:
        if name not in listed:
            raise PipelineError(
                f"stage {name!r} is not in {config.provenance.get('stages', 'the config')}'s stage list "
                f"for {config.comp!r}: {listed}"
            )
        if name not in wanted:
            wanted.add(name)
            for upstream in stages[name].needs_for(config):
                need(upstream)

    for target in targets:
        need(target)
    return [name for name in listed if name in wanted]


def run(config: ResolvedConfig, targets: list[str] | None = None, force: bool = False) -> list[StageStatus]:
    """Bring the targets (default: every listed stage) up to date; `force` reruns the targets themselves."""
    order = plan(config, targets)
    forced = set(order if targets is None else targets) if force else set()
    stages = all_stages()
    with competition_lock(config.work_dir):
        for leftover in sweep_partial(config.work_dir):
            _say(config, f"removed {leftover.name} left by an interrupted run")
        for name in order:
            status = {s.name: s for s in stage_statuses(config)}[name]
            if status.state == UP_TO_DATE and name not in forced:
                _say(config, f"{name}: up to date, skipped ({status.manifest.headline})")
                continue
            why = "forced" if name in forced else "; ".join(status.reasons)
            _say(config, f"{name}: running ({why})")
            manifest = _run_one(config, stages[name], status)
            _say(config, f"{name}: done in {manifest.duration_s:.1f}s  {manifest.headline}")
    return stage_statuses(config)


def _run_one(config: ResolvedConfig, stage, status: StageStatus) -> Manifest:
    final = config.work_dir / stage.name
    inputs = {upstream: config.work_dir / upstream for upstream in stage.needs_for(config)}
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    with atomic_output_dir(final) as tmp:
        ctx = StageContext(
            comp=config.comp,
            config=config,
            settings=config.section(stage.section),
            out=tmp,
            inputs=inputs,
            cache_dir=config.work_dir / CACHE_FOLDER,
            config_fingerprint=status.fingerprint,
            fingerprint_inputs=status.inputs,
        )
        metrics = stage.run(ctx) or {}
        manifest = Manifest(
            stage=stage.name,
            fingerprint=status.fingerprint,
            inputs=status.inputs,
            started=started.isoformat(timespec="seconds"),
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            duration_s=round(time.perf_counter() - clock, 3),
            outputs=output_sizes(tmp),
            metrics=metrics,
            headline=stage.headline(metrics),
            warnings=ctx.warnings,
        )
        manifest.write(tmp)
    return manifest


def _say(config: ResolvedConfig, message: str) -> None:
    print(f"[{config.comp}] {message}", file=sys.stderr, flush=True)
