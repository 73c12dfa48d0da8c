"""The kernel's time, stated before it is pushed: `kp package` runs the bundle here on the public test
images, checks it reproduces the source's own test probabilities, and estimates its run on the hidden
test set against Kaggle's time limit.

The run is timed as the kernel runs: `fixed` (building each network, loading each model) apart from
what grows with the images (each network's features, TTA passes included; the models; the
neighbours), so the estimate is `startup + fixed + per image x kernel.hidden_rows` (default: the
public test's row count), where `startup` is the kernel's own start (installing the bundle's wheels
and importing TensorFlow: 28 s measured in the local sandbox, 2026-12-04; `STARTUP_S` allows more).
It is measured on this machine: with `kernel.enable_gpu` a GPU kernel runs the networks faster, so
the estimate is then an upper bound; a CPU kernel on Kaggle has 4 cores.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.artifacts import BUNDLE_FILE, RAW_DIR
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.engine.config import ResolvedConfig

STARTUP_S = 60.0  # the kernel's start before its first image: wheels installed offline and TensorFlow imported
AGREEMENT = 1e-5  # the most the kernel's probabilities may differ from the source's own test_probs.npy


def time_kernel(config: ResolvedConfig, bundle: Path, say=print) -> dict:
    """Run the bundle at `bundle` on the first `kernel.timing_rows` public test images here; when those are
    all of them, check its probabilities against the source's (to `AGREEMENT`).

    Returns:
        The timing record of `bundle.json`: rows timed, seconds (fixed, per image, by what), the estimate
        at `kernel.hidden_rows` against `kernel.time_limit_s`, the hardware, the largest difference.

    Raises:
        PipelineError: the kernel's probabilities differ from kp's.
    """
    import json

    import numpy as np

    from pipeline.evaluation.predictions import load_predictions
    from pipeline.shipping.kernel import run_bundle, test_images

    settings = config.section("kernel")
    record = json.loads((bundle / BUNDLE_FILE).read_text())
    ids, images, _ = test_images(record, config.work_dir / "download" / RAW_DIR)
    timed = min(len(ids), settings.timing_rows)
    began = time.perf_counter()
    probs, kernel = run_bundle(bundle, images[:timed], say=lambda line: None)
    seconds = time.perf_counter() - began
    per_image = max(seconds - kernel.fixed_s, 0.0) / max(timed, 1)
    difference = None
    if timed == len(ids):
        own = load_predictions(config.work_dir / record["source"])
        position = {row_id: i for i, row_id in enumerate(own.test_ids)}
        if sorted(position) != sorted(ids):
            raise PipelineError(f"kp package: the sample submission's {len(ids)} test ids are not "
                                f"{record['source']}'s {len(own.test_ids)} test rows")
        difference = float(np.abs(probs - own.test_probs[[position[i] for i in ids]]).max())
        if difference > AGREEMENT:
            raise PipelineError(f"kp package: the bundle's kernel gives probabilities up to {difference:.2g} away "
                                f"from {record['source']}'s own test_probs.npy (at most {AGREEMENT:g}); this is a bug "
                                "in kp's packaging: please report it with the bundle's bundle.json")
    timing = with_estimate({
        "rows_timed": timed, "public_rows": len(ids), "seconds": round(seconds, 2),
        "fixed_s": round(kernel.fixed_s, 2), "per_image_s": round(per_image, 6), "startup_s": STARTUP_S,
        "images_per_s": {what: round(timed / max(spent, 1e-9), 1) for what, spent in kernel.seconds.items()},
        "measured_on": f"this machine's CPU ({os.cpu_count()} cores)", "max_abs_difference": difference,
    }, settings)
    timing["summary"] = estimate_line(timing)  # as packaged: the report shows it
    say(timing["summary"])
    return timing


def with_estimate(timing: dict, settings) -> dict:
    """`timing` with the estimate at `settings.hidden_rows` (the `kernel` section; null: the public test's rows)
    against `settings.time_limit_s`, and `settings.enable_gpu`: recomputed whenever those settings change."""
    hidden = settings.hidden_rows or timing["public_rows"]
    estimate = timing["startup_s"] + timing["fixed_s"] + timing["per_image_s"] * hidden
    return {**timing, "hidden_rows": hidden, "estimate_s": round(estimate, 1), "time_limit_s": settings.time_limit_s,
            "within_limit": estimate <= settings.time_limit_s, "enable_gpu": settings.enable_gpu}


def estimate_line(timing: dict) -> str:
    """One line: what was timed and the estimate against the limit."""
    rates = ", ".join(f"{what} {rate:,.0f}/s" for what, rate in timing["images_per_s"].items())
    checked = ("" if timing["max_abs_difference"] is None
               else f"; its probabilities within {timing['max_abs_difference']:.1g} of kp's")
    hardware = timing["measured_on"] + (" (the kernel runs on a GPU: an upper bound)" if timing["enable_gpu"] else "")
    verdict = "within" if timing["within_limit"] else "OVER"
    return (f"kernel timed on {timing['rows_timed']:,} public test images on {hardware}: {rates}{checked}. "
            f"Estimate for {timing['hidden_rows']:,} hidden test images: {_duration(timing['estimate_s'])} "
            f"({timing['startup_s']:.0f}s start + {timing['fixed_s']:.0f}s loading + "
            f"{timing['per_image_s'] * 1000:.2f} ms per image), {verdict} the limit of "
            f"{_duration(timing['time_limit_s'])} (kernel.time_limit_s)")


def check_within_limit(record: dict, settings, force: bool) -> None:
    """Refuse to push a bundle whose estimated time is over the limit (under the `kernel` section `settings`
    now, whatever they were when it was packaged), with its figures, unless `force`."""
    timing = record.get("timing") and with_estimate(record["timing"], settings)
    if timing and not timing["within_limit"] and not force:
        raise PipelineError(f"the kernel would not finish within Kaggle's limit: {estimate_line(timing)}. Package a "
                            "faster source (a distilled student, fewer networks or test passes), raise "
                            "kernel.time_limit_s if the competition allows more, or pass --force to push anyway")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
