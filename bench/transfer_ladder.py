"""The transfer-learning ladder on real data: what each step of the course's recipe adds, validation and test.

Each rung runs the pipeline (in-process, as `kp submit` with `--set`s) with one more step than the
rung before. `--ladder transfer`: the head on clean features -> + augment's K passes in training ->
+ bnretrain (on the augmented rows) -> + test-time augmentation -> an ensemble of N such models.
`--ladder cv` (with the competition's cv overlay, configs/offline/*-cv.yaml): the best single model
(that last recipe, one model, the split's fold 1 held out) -> one such model per fold, scored out of
fold -> + test-neighbour smoothing -> + a pseudo-labelled student per fold -> + smoothing again.
`--ladder tune` (with configs/offline/*-tune.yaml): the head on clean features -> + the tune stage
(backbone's top blocks fine-tuned on images, with its TTA; `val_no_tta` is its score without). Each row: the
submitted stage's validation log loss and accuracy, the submission's clipped validation score, and
its test score on solution.csv (a benchmark may read it; no stage does). Settings are the
competition's config; nothing here is tuned on the test score.
Writes bench/results/ladder_COMP.json.
    .venv/bin/python bench/transfer_ladder.py --comp statefarm --config configs/offline/statefarm.yaml
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

PLAIN = ["finetune.augmented=false", "finetune.tta=false", "bnretrain.augmented=false", "bnretrain.tta=false"]
AUGMENTED = ["finetune.augmented=true", "finetune.tta=false", "bnretrain.augmented=true", "bnretrain.tta=false"]
WITH_TTA = ["finetune.augmented=true", "finetune.tta=true", "bnretrain.augmented=true", "bnretrain.tta=true"]
RUNGS = [
    ("finetune", PLAIN + ["submit.source=finetune"]),
    ("+ augmented passes", AUGMENTED + ["submit.source=finetune"]),
    ("+ bnretrain", AUGMENTED + ["submit.source=bnretrain"]),
    ("+ TTA", WITH_TTA + ["submit.source=bnretrain"]),
    ("ensemble", WITH_TTA + ["ensemble.source=bnretrain", "submit.source=ensemble"]),
]
CV_STAGES = "download, split, precompute, augment"
CV_RUNGS = [
    ("best single model", WITH_TTA + [f"stages=[{CV_STAGES}, finetune, bnretrain, submit]", "submit.source=bnretrain"]),
    ("cv folds", WITH_TTA + [f"stages=[{CV_STAGES}, cv, submit]", "submit.source=cv"]),
    ("+ smooth", WITH_TTA + [f"stages=[{CV_STAGES}, cv, smooth, submit]", "smooth.source=cv", "submit.source=smooth"]),
    ("+ pseudo", WITH_TTA + [f"stages=[{CV_STAGES}, cv, smooth, pseudo, submit]", "smooth.source=cv",
                             "pseudo.source=smooth", "pseudo.smooth=false", "submit.source=pseudo"]),
    ("+ smooth again", WITH_TTA + [f"stages=[{CV_STAGES}, cv, smooth, pseudo, submit]", "smooth.source=cv",
                                   "pseudo.source=smooth", "pseudo.smooth=true", "submit.source=pseudo"]),
]
TUNE_STAGES = "download, split, precompute, finetune"
TUNE_RUNGS = [
    ("finetune", PLAIN + [f"stages=[{TUNE_STAGES}, submit]", "submit.source=finetune"]),
    ("+ tune", PLAIN + [f"stages=[{TUNE_STAGES}, tune, submit]", "submit.source=tune"]),  # TTA as the overlay says
]
LADDERS = {"transfer": RUNGS, "cv": CV_RUNGS, "tune": TUNE_RUNGS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comp", required=True)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="applied to every rung")
    parser.add_argument("--ladder", choices=sorted(LADDERS), default="transfer")
    parser.add_argument("--rungs", type=int, default=None, help="run only the first N rungs")
    args = parser.parse_args()
    rows = []
    for name, sets in LADDERS[args.ladder][:args.rungs]:
        config = load_config(args.comp, extra_files=args.config, sets=sets + args.sets)
        runner.run(config, ["submit"])
        submit = Manifest.read(config.work_dir / "submit").metrics
        source = Manifest.read(config.work_dir / submit["source"]).metrics
        test_score, test_accuracy = score_file_on_test_set(config, Path(submit["file"]))
        rows.append({"step": name if name != "ensemble" else f"ensemble of {source['n']}",
                     "source": submit["source"], "val_log_loss": source["val_log_loss"],
                     "val_accuracy": source["val_accuracy"], "val_clipped": submit[submit["score_name"]],
                     "validation": source.get("validation", "holdout"),
                     "test_score": round(test_score, 5),
                     "test_accuracy": None if test_accuracy is None else round(test_accuracy, 5),
                     "tta_log_loss_gain": source.get("tta_log_loss_gain"), "train_passes": source.get("train_passes"),
                     "val_no_tta": source.get("val_log_loss_no_tta"), "seconds_per_epoch": source.get("seconds_per_epoch"),
                     "file": submit["file"]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'step':22} {'validation':>10} {'val loss':>9} {'val acc':>8} {'val clipped':>12} {'test':>8} {'test acc':>9}")
    for r in rows:
        test_accuracy = f"{r['test_accuracy']:9.4f}" if r["test_accuracy"] is not None else f"{'':9}"
        print(f"{r['step']:22} {r['validation']:>10} {r['val_log_loss']:9.4f} {r['val_accuracy']:8.4f} {r['val_clipped']:12.4f} "
              f"{r['test_score']:8.4f} {test_accuracy}")
    write_result(f"{'' if args.ladder == 'transfer' else args.ladder + '_'}ladder_{args.comp}.json",
                 {"competition": args.comp, "ladder": args.ladder, "config": args.config, "sets": args.sets,
                  "rows": rows})


if __name__ == "__main__":
    main()
