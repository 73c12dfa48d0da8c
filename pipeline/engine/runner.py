"""Runs stages in order: skips the up-to-date ones, restores stored runs, runs the rest atomically.

`kp STAGE` runs STAGE and whatever it needs that is not up to date; `kp all` runs every stage the
competition lists. For each stage: up to date -> skipped; a stored run with the expected
fingerprint in the run cache -> restored (the stage's link points at it again, no recomputation);
otherwise it runs into a temporary folder that becomes a stored run only once complete and its
declared outputs are there. Any exception from a stage ends as one message, `stage X failed:
<reason>` (exit status 2), with the traceback in `work/COMP/STAGE.error.log` (`KP_DEBUG=1` lets
it through); a `RunStopped` (a sweep stopping a trial early) passes through as it is. Only one run
per competition at a time (a lock file in its work folder).
"""
from __future__ import annotations

import os
import time
import traceback
from datetime import datetime, timezone

from pipeline.core.artifacts import CACHE_FOLDER, ERROR_LOG
from pipeline.core.cache import Manifest, competition_lock, output_digests, output_problems, output_sizes, \
    sweep_partial, upstream_digests, write_text_atomic
from pipeline.core.console import say, speaking_for
from pipeline.core.errors import PipelineError, RunStopped, describe_os_error
from pipeline.core.runs import link_variant, point, stage_store
from pipeline.core.stage import Stage, StageContext
from pipeline.engine.config import ResolvedConfig
from pipeline.engine.registry import all_stages, with_needs
from pipeline.engine.status import UP_TO_DATE, StageStatus, check_settings, damaged_outputs, stage_statuses
from pipeline.engine.variants import variant_configs


def plan(config: ResolvedConfig, targets: list[str] | None) -> list[str]:
    """The targets plus every stage they need, in the competition's stage order."""
    stages = all_stages()
    listed = config.stage_names
    if targets is None:
        return listed
    wanted = with_needs(targets, lambda name: stages[name].needs_for(config) if name in listed else ())
    for name in wanted:
        if name not in listed:
            raise PipelineError(
                f"stage {name!r} is not in {config.provenance.get('stages', 'the config')}'s stage list "
                f"for {config.comp!r}: {listed}"
            )
    return [name for name in listed if name in wanted]


def stage_inputs(config: ResolvedConfig, name: str):
    """Bring the stages `name` reads up to date (not `name` itself), for a tool that imitates it
    (`kp lr-find`).

    Returns:
        (the stage's config view, its upstream output folders by stage name).
    """
    plan(config, [name])  # one clear error when the competition does not list it
    stage = all_stages()[name]
    needs = list(stage.needs_for(config))
    run(config, needs)
    return stage.view(config), {upstream: (config.work_dir / upstream).resolve() for upstream in needs}


def run(config: ResolvedConfig, targets: list[str] | None = None, force: bool = False,
        actions: dict[str, str] | None = None) -> list[StageStatus]:
    """Bring the targets (default: every listed stage) up to date; `force` reruns the targets themselves.

    Args:
        actions: filled with what happened to each stage of the plan: `skipped`, `restored` or `ran`.

    Returns:
        The status of every listed stage afterwards.
    """
    actions = {} if actions is None else actions
    order = plan(config, targets)
    forced = {name: "forced" for name in (order if targets is None else targets)} if force else {}
    stages = all_stages()
    if config.variant:  # its own folder, whose _runs and _cache are the competition's
        link_variant(config.work_dir)
    with competition_lock(config.work_dir, wait=config.get("cache.wait")):
        for leftover in sweep_partial(config.work_dir):
            _say(config, f"removed {leftover.relative_to(config.work_dir)} left by an interrupted run")
        before = stage_statuses(config, remember_stamps=True)
        check_settings(config, before, order)
        if force:  # a forced run first reads what it builds on: damaged outputs are rewritten, not trained on
            builds_on = [s for s in before if s.name in order and s.name not in forced]
            for name, reasons in damaged_outputs(config, builds_on).items():
                forced[name] = "; ".join(reasons)
        for name in order:  # each stage's status asked as it comes: what it reads has just been brought up to date
            stage, status = stages[name], _current(config, name)
            action = _reused(config, stage, status, name in forced)
            variants = variant_configs(config, stage) if action is None else []
            if variants:  # the variants it reads first; then their outputs are known, and it may be up to date
                for variant, variant_config in variants:
                    run(variant_config, [variant.target])
                status = _current(config, name)
                action = _reused(config, stage, status, name in forced)
            if action is not None:
                actions[name] = action
                continue
            _say(config, f"{name}: running ({forced.get(name) or '; '.join(status.reasons)})")
            with speaking_for(config.label):  # a unit's lines carry the competition too
                manifest = _guarded(config, stage, status)
            actions[name] = "ran"
            _say(config, f"{name}: done in {manifest.duration_s:.1f}s  {manifest.headline}"
                 + ("  (the same outputs as its last run: what reads them stays up to date)"
                    if _wrote_the_same(status, manifest) else ""))
    return stage_statuses(config)


def _current(config: ResolvedConfig, name: str) -> StageStatus:
    return {s.name: s for s in stage_statuses(config)}[name]


def _reused(config: ResolvedConfig, stage: Stage, status: StageStatus, forced: bool) -> str | None:
    """`skipped` (up to date) or `restored` (from the run cache), said; None: the stage has to run."""
    if forced:
        return None
    if status.state == UP_TO_DATE:
        _say(config, f"{stage.name}: up to date, skipped ({status.manifest.headline})")
        return "skipped"
    if status.restorable:
        manifest = _restore(config, stage, status)
        changed = "; ".join(reason for reason in status.reasons if reason != "never run")
        _say(config, f"{stage.name}: restored from the run cache, where an earlier run with these settings is "
                     f"stored{f' ({changed})' if changed else ''}  {manifest.headline}")
        return "restored"
    return None


def _context(config: ResolvedConfig, stage: Stage, status: StageStatus, out) -> StageContext:
    inputs = {upstream: (config.work_dir / upstream).resolve() for upstream in stage.needs_for(config)}
    for variant, variant_config in variant_configs(config, stage):
        inputs[variant.name] = (variant_config.work_dir / variant.target).resolve()
    return StageContext(
        comp=config.comp,
        stage=stage,
        config=stage.view(config),
        settings=config.section(stage.section),
        out=out,
        inputs=inputs,
        cache_dir=config.work_dir / CACHE_FOLDER,
        work_dir=config.work_dir,
        config_fingerprint=status.fingerprint,
        fingerprint_inputs=status.inputs,
    )


def _restore(config: ResolvedConfig, stage: Stage, status: StageStatus) -> Manifest:
    folder = stage_store(config.work_dir, stage.name).path(status.fingerprint)
    if stage.restore:
        stage.restore(_context(config, stage, status, folder))
    point(config.work_dir, stage.name, status.fingerprint, "restored")
    return Manifest.read(folder)


def _guarded(config: ResolvedConfig, stage: Stage, status: StageStatus) -> Manifest:
    """Run one stage; any failure becomes one PipelineError, its traceback kept in STAGE.error.log."""
    log = config.work_dir / ERROR_LOG.format(stage=stage.name)
    try:
        manifest = _run_one(config, stage, status)
    except RunStopped:
        raise
    except Exception as exc:
        if os.environ.get("KP_DEBUG") == "1":
            raise
        details = traceback.format_exc()
        try:
            write_text_atomic(log, details)
            where = f" (traceback: {log})"
        except OSError:  # the disk that is full, or read-only, cannot take the log either
            where = ""
        if isinstance(exc, PipelineError):
            reason = str(exc)
        elif isinstance(exc, OSError) and exc.errno is None:  # a library's OSError (h5py): its own words
            reason = f"{type(exc).__name__}: {exc}"
        elif isinstance(exc, OSError):
            if not exc.filename:  # a failed write() names no file: name the run's folder
                exc.filename = str(stage_store(config.work_dir, stage.name).root)
            reason = describe_os_error(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        raise PipelineError(f"stage {stage.name} failed: {reason}{where}") from None
    log.unlink(missing_ok=True)
    return manifest


def _run_one(config: ResolvedConfig, stage: Stage, status: StageStatus) -> Manifest:
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    with stage_store(config.work_dir, stage.name).write(status.fingerprint) as tmp:
        ctx = _context(config, stage, status, tmp)
        metrics = stage.run(ctx) or {}
        missing = output_problems(tmp, stage.outs, None)
        if missing:
            raise RuntimeError(f"the run did not write what STAGE.outs declares: {', '.join(missing)}")
        digest, contents = output_digests(tmp)
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
            units=ctx.units_used,
            digest=digest,
            contents=contents,
            upstream=upstream_digests(ctx.inputs),
            reads={name: folder.name for name, folder in ctx.inputs.items()},  # the stored runs it read
        )
        manifest.write(tmp)
    point(config.work_dir, stage.name, status.fingerprint, "ran", same_outputs=_wrote_the_same(status, manifest))
    return manifest


def _wrote_the_same(status: StageStatus, manifest: Manifest) -> bool:
    """Whether a run wrote the same outputs (digest) as the run that was current before it."""
    return status.manifest is not None and bool(manifest.digest) and manifest.digest == status.manifest.digest


def _say(config: ResolvedConfig, message: str) -> None:
    say(f"[{config.label}] {message}")
