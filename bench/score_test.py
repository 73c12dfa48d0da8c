"""Score the latest submission of a competition on its hidden test labels (solution.csv).

A benchmark, not a stage: it is the only place besides a scoring server that reads solution.csv.
Prints validation next to test, so a validation set that flatters the model shows; with a blend
among the submission's stages, each blend source's test score too (as submitted: clipped alike).
    .venv/bin/python bench/score_test.py --comp dogscats --config configs/offline/dogscats.yaml
Writes bench/results/score_COMP.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.cache import Manifest  # noqa: E402
from pipeline.engine.config import load_config  # noqa: E402
from pipeline.evaluation.scoring import score_file_on_test_set  # noqa: E402
from pipeline.experiments.bench_results import write_result  # noqa: E402


def blend_sources_on_test(config) -> dict:
    """{source: its validation and test scores} for each source of the competition's current blend, or {}."""
    from pipeline.core.readers import read_table
    from pipeline.evaluation.predictions import load_predictions
    from pipeline.evaluation.scoring import score_accuracy_of_probabilities, score_submission, solution_file
    from pipeline.evaluation.submission import submission_frame

    blend = Manifest.read(config.work_dir / "blend") if (config.work_dir / "blend").exists() else None
    if blend is None:
        return {}
    solution = read_table(solution_file(config), dtype=str)
    scores = {}
    for name, source in blend.metrics["sources"].items():
        p = load_predictions(Path(source["folder"]))
        frame = submission_frame(p.test_ids, p.test_probs, config.competition, config.get("submit.renormalize"))
        test_accuracy = score_accuracy_of_probabilities(frame, solution, config.competition)  # None: it is the metric
        scores[name] = {"val_log_loss": source["val_log_loss"], "val_accuracy": source["val_accuracy"],
                        "weight": blend.metrics["weights"][name],
                        "test_score": round(score_submission(frame, solution, config.competition), 5),
                        **({} if test_accuracy is None else {"test_accuracy": round(test_accuracy, 5)})}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comp", required=True)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.comp, extra_files=args.config, sets=args.sets)
    submit = Manifest.read(config.work_dir / "submit")
    if submit is None:
        sys.exit(f"no submission yet for {args.comp}: run kp all --comp {args.comp} first")
    source = Manifest.read(config.work_dir / submit.metrics["source"])  # finetune or ensemble
    test_score, test_accuracy = score_file_on_test_set(config, Path(submit.metrics["file"]))
    competition = config.competition
    result = {
        "competition": args.comp,
        "file": submit.metrics["file"],
        "split": config.get("split.strategy"),
        "metric": competition.metric,
        "val_score_clipped": submit.metrics[submit.metrics["score_name"]],
        "source": submit.metrics["source"],
        "val_log_loss": source.metrics.get("val_log_loss"),
        "val_accuracy": source.metrics.get("val_accuracy"),
        "test_score": round(test_score, 5),
        "test_accuracy": test_accuracy,
    }
    if result["test_accuracy"] is not None:
        result["test_accuracy"] = round(result["test_accuracy"], 5)
    print(f"{'':22} {'validation':>11} {'test':>8}")
    clipped = " (clipped)" if competition.metric == "log_loss" else ""
    print(f"{competition.metric + clipped:22} {result['val_score_clipped']:11.4f} {result['test_score']:8.4f}")
    if result["test_accuracy"] is not None:
        print(f"{'accuracy':22} {result['val_accuracy']:11.4f} {result['test_accuracy']:8.4f}")
    result["blend_sources"] = blend_sources_on_test(config)
    for name, scores in result["blend_sources"].items():
        print(f"  blend source {name}: weight {scores['weight']:.2f}, validation log loss {scores['val_log_loss']:.4f} "
              f"(accuracy {scores['val_accuracy']:.4f}), test {competition.metric} {scores['test_score']:.4f}"
              + (f" (accuracy {scores['test_accuracy']:.4f})" if "test_accuracy" in scores else ""))
    write_result(f"score_{args.comp}_{config.get('split.strategy')}.json", result)


if __name__ == "__main__":
    main()
