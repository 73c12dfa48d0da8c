"""What `finetune.deterministic` (TensorFlow's op determinism) costs, and whether it delivers.

Trains the competition's finetune recipe on its cached features (run `kp all` first) with the
setting on and off, interleaved, `--repeats` times each; reports the median seconds per epoch,
their ratio, and whether the repeats of each mode gave bit-identical validation probabilities.
Writes bench/results/determinism_COMP.json.
    .venv/bin/python bench/determinism.py --comp statefarm --config configs/offline/statefarm.yaml
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.features import load_split_features  # noqa: E402
from pipeline.evaluation.predictions import load_predictions  # noqa: E402
from pipeline.registry import all_stages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comp", default="statefarm")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pipeline.training.recipe import train_model

    configs = {mode: load_config(args.comp, extra_files=args.config, sets=[f"finetune.deterministic={mode}"])
               for mode in ("true", "false")}
    work = configs["true"].work_dir
    data = load_split_features(work / "precompute", work / "split", configs["true"].competition.classes)
    seconds: dict[str, list[float]] = {mode: [] for mode in configs}
    digests: dict[str, set[str]] = {mode: set() for mode in configs}
    for repeat in range(args.repeats):
        for mode, config in configs.items():
            with tempfile.TemporaryDirectory() as folder:
                view = all_stages()["finetune"].view(config)
                metrics = train_model(view, data, 0, Path(folder), log=lambda _: None, warn=lambda _: None, verbose=0)
                probs = load_predictions(Path(folder)).valid_probs
            seconds[mode].append(metrics["seconds_per_epoch"])
            digests[mode].add(hashlib.sha256(probs.tobytes()).hexdigest())
            print(f"repeat {repeat + 1} deterministic={mode}: {metrics['seconds_per_epoch']:.3f} s/epoch, "
                  f"val log loss {metrics['val_log_loss']:.5f}", flush=True)
    result = {mode: {"median_s_per_epoch": statistics.median(s), "runs": s, "identical_predictions": len(digests[mode]) == 1}
              for mode, s in seconds.items()}
    result["ratio_on_off"] = round(result["true"]["median_s_per_epoch"] / result["false"]["median_s_per_epoch"], 3)
    print(f"\n{'deterministic':14} {'s/epoch (median)':>17} {'identical over repeats':>23}")
    for mode in configs:
        print(f"{mode:14} {result[mode]['median_s_per_epoch']:17.3f} {str(result[mode]['identical_predictions']):>23}")
    print(f"on / off: {result['ratio_on_off']:.2f}x")
    out = REPO / "bench" / "results" / f"determinism_{args.comp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
