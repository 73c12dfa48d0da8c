"""What a finetune mode costs, and whether it changes a prediction: two variants, interleaved.

`--vary deterministic` (default): `training.deterministic` (TensorFlow's op determinism) on vs off.
`--vary steps`: a head's train function running 1 vs `pipeline.training.fit.STEPS_PER_EXECUTION`
steps per call (Keras' `steps_per_execution`).

Trains the competition's finetune recipe on its cached features (run `kp all` first) under each
variant, interleaved, `--repeats` times; reports the median seconds per epoch, their ratio, whether
the repeats of each variant gave bit-identical validation probabilities, and whether the two
variants did. Writes bench/results/finetune_VARY_COMP.json.
    .venv/bin/python bench/finetune_modes.py --comp statefarm --config configs/offline/statefarm.yaml \
        [--vary steps] [--set KEY=VALUE]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.features import load_split_features  # noqa: E402
from pipeline.engine.config import load_config  # noqa: E402
from pipeline.engine.registry import all_stages  # noqa: E402
from pipeline.evaluation.predictions import load_predictions  # noqa: E402
from pipeline.experiments.bench_results import write_result  # noqa: E402
from pipeline.training import fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comp", default="statefarm")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--vary", choices=("deterministic", "steps"), default="deterministic")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pipeline.training.recipes import TrainingRun, recipe

    if args.vary == "deterministic":
        variants = {mode: (load_config(args.comp, extra_files=args.config,
                                       sets=[*args.sets, f"training.deterministic={mode}"]), fit.STEPS_PER_EXECUTION)
                    for mode in ("true", "false")}
    else:
        config = load_config(args.comp, extra_files=args.config, sets=args.sets)
        variants = {str(steps): (config, steps) for steps in (fit.STEPS_PER_EXECUTION, 1)}
    first = next(iter(variants.values()))[0]
    work = first.work_dir
    data = load_split_features(work / "precompute", work / "split", first.competition.classes)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    digests: dict[str, set[str]] = {name: set() for name in variants}
    for repeat in range(args.repeats):
        for name, (config, steps) in variants.items():
            fit.STEPS_PER_EXECUTION = steps
            with tempfile.TemporaryDirectory() as folder:
                view = all_stages()["finetune"].view(config)
                quiet = TrainingRun(0, log=lambda _: None, warn=lambda _: None)
                metrics = recipe("finetune").resolved(view).fit(view, data, None, Path(folder), quiet)
                probs = load_predictions(Path(folder)).valid_probs
            seconds[name].append(metrics["seconds_per_epoch"])
            digests[name].add(hashlib.sha256(probs.tobytes()).hexdigest())
            print(f"repeat {repeat + 1} {args.vary}={name}: {metrics['seconds_per_epoch']:.3f} s/epoch, "
                  f"val log loss {metrics['val_log_loss']:.5f}", flush=True)
    names = list(variants)
    result = {name: {"median_s_per_epoch": statistics.median(s), "runs": s,
                     "identical_over_repeats": len(digests[name]) == 1} for name, s in seconds.items()}
    result["ratio"] = round(result[names[0]]["median_s_per_epoch"] / result[names[1]]["median_s_per_epoch"], 3)
    result["variants_identical"] = len(digests[names[0]] | digests[names[1]]) == 1
    print(f"\n{args.vary:14} {'s/epoch (median)':>17} {'identical over repeats':>23}")
    for name in names:
        same = str(result[name]["identical_over_repeats"])
        print(f"{name:14} {result[name]['median_s_per_epoch']:17.3f} {same:>23}")
    print(f"{names[0]} / {names[1]}: {result['ratio']:.2f}x; "
          f"the two give identical predictions: {result['variants_identical']}")
    write_result(f"finetune_{args.vary}_{args.comp}.json", result)


if __name__ == "__main__":
    main()
