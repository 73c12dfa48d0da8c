"""What a code competition's kernel runs: a `kp package` bundle's models on the competition's test images.

`python -m pipeline.shipping.kernel BUNDLE --input COMPETITION_FOLDER --out FOLDER` (the bundle's `kernel.py`
calls it with Kaggle's `/kaggle/input/...` and `/kaggle/working`): read the test ids from the
competition's sample submission (a hidden test set has its own), compute their features with
precompute's network built from the bundle (and the augmented test passes, each row seeded as the
augment stage seeds it, when the models use test-time augmentation), average each model's
probabilities over those versions and the models' over each other, as the source stage did (for
a smoothed source, then each test row blended with its nearest test rows' as smooth did), and
write `submission.csv` in the sample's format (and `test_probs.npy`). No training, no network.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from pipeline.core.artifacts import BUNDLE_FILE, MODEL_FILE, SUBMISSION_FILE, probs_file
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    import numpy as np


def predict(bundle: Path, images: list[Path], say=print) -> np.ndarray:
    """The bundle's test probabilities for `images`, in order.

    Args:
        bundle: a `kp package` folder.
        images: the test image files.
        say: prints a line.

    Returns:
        (len(images), classes) float32 probabilities: the mean over the models of each model's mean over
        the clean features and the augmented test passes (smoothed over the test rows when the bundle says).
    """
    import numpy as np

    from pipeline.data.arrays import load_array
    from pipeline.data.augmentation import RowAugmenter, pass_seed
    from pipeline.evaluation.smoothing import neighbours, smooth
    from pipeline.models.extractor import build_extractor
    from pipeline.models.inference import predict_averaged
    from pipeline.models.saved import load_saved_model

    record = json.loads((bundle / BUNDLE_FILE).read_text())
    extractor = build_extractor(SimpleNamespace(**record["precompute"]), bundle, tuple(record["image_size"]))
    tta = record["tta"]
    with tempfile.TemporaryDirectory(prefix="kp-kernel-") as scratch:
        versions = []
        for number in range(0, (tta["passes"] if tta else 0) + 1):
            augment = RowAugmenter(tta["transforms"], pass_seed(tta["seed"], "test", number)) if number else None
            out = Path(scratch) / f"test_{number}.npy"
            timing = extractor.write(images, out, augment=augment)
            say(f"features of {len(images)} test images{f' (test pass {number})' if number else ''}: "
                f"{timing['seconds']:.1f}s")
            versions.append(load_array(out))
        each = [predict_averaged(load_saved_model(bundle / model["folder"] / MODEL_FILE), versions)[0]
                for model in record["models"]]
        probs = np.mean(each, axis=0).astype(np.float32) if len(each) > 1 else each[0]
        s = record.get("smooth")
        if s:  # the test rows among themselves, on their clean features, as the smooth stage did
            near = neighbours(versions[0], s["k"], s["metric"])
            probs = smooth(probs, near, s["k"], s["weight"], s["distance_weighted"])
    return probs


def main(argv: list[str] | None = None) -> int:
    """The kernel's command line; returns the exit status (a `PipelineError` is one line on stderr, status 2)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.shipping.kernel", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the kp package folder")
    parser.add_argument("--input", type=Path, required=True, help="the competition's files (sample submission, test/)")
    parser.add_argument("--out", type=Path, required=True, help="where submission.csv goes")
    args = parser.parse_args(argv)
    try:
        write_submission(args.bundle, args.input, args.out)
    except PipelineError as exc:
        print(f"kernel failed: {exc}", file=sys.stderr)
        return 2
    return 0


def write_submission(bundle: Path, competition_dir: Path, out: Path, say=print) -> Path:
    """`out/submission.csv` (and `out/test_probs.npy`) for the test images the sample submission lists.

    Returns:
        The submission's path.
    """
    import numpy as np

    from pipeline.core.competition import Competition
    from pipeline.core.readers import read_table
    from pipeline.evaluation.submission import submission_frame, validate_submission

    clock = time.perf_counter()
    record = json.loads((bundle / BUNDLE_FILE).read_text())
    competition = Competition.model_validate(record["competition"])
    files = record["download"]
    sample_path = competition_dir / files["sample_submission"]
    sample = read_table(sample_path, dtype={competition.id_column: str}, keep_default_na=False)
    ids = sample[competition.id_column].tolist()
    images = [competition_dir / files["test_dir"] / files["test_file"].format(id=i) for i in ids]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise PipelineError(f"{sample_path}: {len(missing)} of {len(ids)} test ids have no image; first: {missing[:3]}")
    probs = predict(bundle, images, say)
    frame = submission_frame(ids, probs, competition, record["renormalize"])
    validate_submission(frame, sample, competition, record["renormalize"])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / probs_file("test"), probs)
    frame.to_csv(out / SUBMISSION_FILE, index=False, float_format="%.6g")
    say(f"{out / SUBMISSION_FILE}: {len(ids)} rows from {len(record['models'])} models of {record['source']} "
        f"in {time.perf_counter() - clock:.1f}s")
    return out / SUBMISSION_FILE


if __name__ == "__main__":
    sys.exit(main())
