"""The MNIST lesson's ladder on the digit-recognizer mini-competition, then the ensemble, scored.

Each step trains through the pipeline (`kp finetune` with `--set model.arch=...`), in the course's
order: linear -> hidden -> cnn -> cnn_bn -> cnn_bn_do -> cnn_bn_do + augmentation (the configured
default) -> the N-member ensemble -> test accuracy from solution.csv (this benchmark is allowed to
read it; no stage is). Prints a table; writes bench/results/mnist_ladder.json. About 30 minutes on
2 CPU cores. The course's recipe is an overlay (`configs/offline/mnist-course.yaml`: one held-out split,
the ensemble); configs/mnist.yaml itself cross-validates a stronger network instead.
    .venv/bin/python bench/mnist_ladder.py [--config configs/offline/mnist.yaml --config configs/offline/mnist-course.yaml]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.cache import Manifest  # noqa: E402
from pipeline.engine import runner  # noqa: E402
from pipeline.engine.config import load_config  # noqa: E402
from pipeline.evaluation.scoring import score_file_on_test_set  # noqa: E402
from pipeline.experiments.bench_results import write_result  # noqa: E402

LADDER = [
    ("linear", ["model.arch=linear", "finetune.augment=null"]),
    ("hidden (512)", ["model.arch=hidden", "finetune.augment=null"]),
    ("cnn", ["model.arch=cnn", "finetune.augment=null"]),
    ("cnn_bn", ["model.arch=cnn_bn", "finetune.augment=null"]),
    ("cnn_bn_do", ["model.arch=cnn_bn_do", "finetune.augment=null"]),
    ("cnn_bn_do + augmentation", []),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comp", default="mnist")
    parser.add_argument("--config", action="append", default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="applied to every step")
    parser.add_argument("--rungs", type=int, default=None, help="train only the first N steps before the ensemble")
    args = parser.parse_args()
    extra = args.config if args.config is not None else [str(REPO / "configs" / "offline" / name)
                                                         for name in ("mnist.yaml", "mnist-course.yaml")]
    rows = []
    for name, sets in LADDER[:args.rungs]:
        config = load_config(args.comp, extra_files=extra, sets=sets + args.sets)
        runner.run(config, ["finetune"])
        m = Manifest.read(config.work_dir / "finetune").metrics
        rows.append({"step": name, "val_accuracy": m["val_accuracy"], "val_log_loss": m["val_log_loss"],
                     "epochs": m["epochs"], "seconds": m["train_seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    config = load_config(args.comp, extra_files=extra, sets=args.sets)
    runner.run(config)
    ensemble = Manifest.read(config.work_dir / "ensemble").metrics
    submit = Manifest.read(config.work_dir / "submit").metrics
    test_accuracy, _ = score_file_on_test_set(config, submit["file"])
    rows.append({"step": f"ensemble of {ensemble['n']}", "val_accuracy": ensemble["val_accuracy"],
                 "val_log_loss": ensemble["val_log_loss"], "test_accuracy": round(test_accuracy, 5),
                 "mean_member_val_accuracy": ensemble["mean_member_val_accuracy"]})
    print(f"\n{'step':28} {'val acc':>8} {'val loss':>9} {'test acc':>9}")
    for r in rows:
        test = f"{r['test_accuracy']:9.4f}" if "test_accuracy" in r else f"{'':9}"
        print(f"{r['step']:28} {r['val_accuracy']:8.4f} {r['val_log_loss']:9.4f} {test}")
    write_result(f"{args.comp}_ladder.json", {"rows": rows, "ensemble": ensemble})


if __name__ == "__main__":
    main()
