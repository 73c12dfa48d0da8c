"""What a code competition's kernel runs: a `kp package` bundle's models on the competition's test images.

`python -m pipeline.shipping.kernel BUNDLE --input COMPETITION_FOLDER --out FOLDER` (the bundle's `kernel.py`
calls it with Kaggle's `/kaggle/input/...` and `/kaggle/working`): read the test ids from the
competition's sample submission (a hidden test set has its own), compute their features with
precompute's network built from the bundle (and the augmented test passes, each row seeded as the
augment stage seeds it, when the models use test-time augmentation), average each model's
probabilities over those versions and the models' over each other, as the source stage did (for
a smoothed source, then each test row blended with its nearest test rows' as smooth did; for a
blend, each source so, then combined with what the blend chose; a fine-tuned network takes the
images themselves), following the bundle's prediction plan, and write `submission.csv` in the
sample's format (and `test_probs.npy`). No training, no network.
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


class KernelRun:
    """One kernel run over the test images: each network built once, each version of the features
    (clean, then each augmented test pass) computed once whichever sources read it, and the seconds spent:
    `fixed` (building networks, loading models) apart from the work that grows with the images."""

    def __init__(self, bundle: Path, images: list[Path], scratch: Path, say=print):
        self.bundle, self.images, self.scratch, self.say = bundle, images, scratch, say
        self.extractors, self.versions = {}, {}
        self.fixed_s = 0.0
        self.seconds: dict[str, float] = {}  # what grows with the images: per network's features, per stage's models

    def _spent(self, what: str, began: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - began

    def features(self, network: dict, tta: dict | None) -> list:
        """The test images' rows of `network`'s features: the clean rows, then each of `tta`'s passes."""
        from pipeline.data.arrays import load_array
        from pipeline.data.augmentation import RowAugmenter, pass_seed
        from pipeline.models.extractor import build_extractor

        key = json.dumps(network, sort_keys=True)
        if key not in self.extractors:
            began = time.perf_counter()
            self.extractors[key] = build_extractor(SimpleNamespace(**network["precompute"]), self.bundle,
                                                   tuple(network["image_size"]))
            self.fixed_s += time.perf_counter() - began
        extractor, result = self.extractors[key], []
        for number in range(0, (tta["passes"] if tta else 0) + 1):
            version = (key, number, json.dumps(tta, sort_keys=True) if number else None)
            if version not in self.versions:
                augment = RowAugmenter(tta["transforms"], pass_seed(tta["seed"], "test", number)) if number else None
                out = self.scratch / f"features_{len(self.versions)}.npy"
                began = time.perf_counter()
                timing = extractor.write(self.images, out, augment=augment)
                self._spent(f"features {extractor.name}", began)
                self.say(f"{extractor.name} features of {len(self.images)} test images"
                         f"{f' (test pass {number})' if number else ''}: {timing['seconds']:.1f}s")
                self.versions[version] = load_array(out)
            result.append(self.versions[version])
        return result

    def model_probs(self, folder: str, network: dict, tta: dict | None, stage: str, reads: str):
        """One model's test probabilities, averaged over the clean images and the test passes: on the
        network's features, or (a fine-tuned network, which takes images) on the images themselves."""
        import numpy as np

        from pipeline.models.inference import predict_averaged
        from pipeline.models.saved import load_saved_model

        began = time.perf_counter()
        model = load_saved_model(self.bundle / folder / MODEL_FILE)
        self.fixed_s += time.perf_counter() - began
        began = time.perf_counter()
        if reads == "images":
            probs = self._on_images(model, network, tta)
            self._spent(f"images through {stage}'s networks", began)
            return probs
        versions = self.features(network, tta)
        began = time.perf_counter()
        probs = predict_averaged(model, versions)[0]
        self._spent(f"{stage}'s models", began)
        return np.asarray(probs)

    def _on_images(self, model, network: dict, tta: dict | None):
        """A whole network's probabilities on the images (tune's way: `predict_images` per version, then their mean)."""
        import numpy as np

        from pipeline.data.augmentation import RowAugmenter, pass_seed
        from pipeline.data.image_rows import ImageRows
        from pipeline.models.backbones import preprocessing_of
        from pipeline.models.device import plan_device
        from pipeline.models.inference import Forward
        from pipeline.training.recipes.tuned import predict_images

        settings = network["precompute"]
        forward = Forward(model, plan_device(None, settings["batch_size"]),
                          preprocessing_of(settings["backbone"], settings["preprocess"]))
        rows = ImageRows(self.images, np.full(len(self.images), -1), [p.stem for p in self.images],
                         np.arange(len(self.images)))
        size = tuple(int(d) for d in model.inputs[0].shape[1:3])
        augmenters = [None] + [RowAugmenter(tta["transforms"], pass_seed(tta["seed"], "test", k))
                               for k in range(1, (tta["passes"] if tta else 0) + 1)]
        each = [predict_images(forward, rows, size, augmenter) for augmenter in augmenters]
        return np.mean(each, axis=0, dtype=np.float64).astype(np.float32)

    def probs(self, plan: dict):
        """The test probabilities `plan` (`pipeline.shipping.packaging.prediction_plan`) describes, each step
        stored as float32 as its stage stores its `test_probs.npy`."""
        import numpy as np

        from pipeline.evaluation.blending import Blender
        from pipeline.evaluation.smoothing import neighbours, smooth

        if "weighting" in plan:  # each source's probabilities, then what the blend chose on all rows
            stacked = np.stack([self.probs(source) for source in plan["of"]]).astype(np.float64)
            return Blender.from_record(plan["weighting"]).apply(stacked).astype(np.float32)
        if "neighbours" in plan:  # the test rows among themselves, on their clean features, as the smooth stage did
            probs, s = self.probs(plan["of"]), plan["neighbours"]
            clean = self.features(s["network"], None)[0]
            began = time.perf_counter()
            near = neighbours(clean, s["k"], s["metric"])
            smoothed = smooth(probs, near, s["k"], s["weight"], s["distance_weighted"])
            self._spent(f"{plan['stage']}'s neighbours", began)
            return np.asarray(smoothed, dtype=np.float32)
        each = [self.model_probs(folder, plan["network"], plan["tta"], plan["stage"], plan["reads"])
                for folder in plan["models"]]
        return np.mean(each, axis=0).astype(np.float32) if len(each) > 1 else each[0]


def predict(bundle: Path, images: list[Path], say=print) -> np.ndarray:
    """The bundle's test probabilities for `images`, in order.

    Args:
        bundle: a `kp package` folder.
        images: the test image files.
        say: prints a line.

    Returns:
        (len(images), classes) float32 probabilities, as the source stage computed its own.
    """
    return run_bundle(bundle, images, say)[0]


def run_bundle(bundle: Path, images: list[Path], say=print) -> tuple[np.ndarray, KernelRun]:
    """`predict`, and the `KernelRun` that computed it (its seconds, for `kp package`'s timing)."""
    record = json.loads((bundle / BUNDLE_FILE).read_text())
    with tempfile.TemporaryDirectory(prefix="kp-kernel-") as scratch:
        kernel = KernelRun(bundle, images, Path(scratch), say)
        probs = kernel.probs(record["predict"])
    return probs, kernel


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


def test_images(record: dict, competition_dir: Path) -> tuple[list[str], list[Path], object]:
    """The test ids the competition's sample submission lists, their image files, and the sample itself.

    Args:
        record: the bundle's `bundle.json`.
        competition_dir: the competition's files (`/kaggle/input/SLUG`, or download's `raw/`).

    Raises:
        PipelineError: a listed id has no image.
    """
    from pipeline.core.competition import Competition
    from pipeline.core.readers import read_table

    competition = Competition.model_validate(record["competition"])
    files = record["download"]
    sample_path = competition_dir / files["sample_submission"]
    sample = read_table(sample_path, dtype={competition.id_column: str}, keep_default_na=False)
    ids = sample[competition.id_column].tolist()
    images = [competition_dir / files["test_dir"] / files["test_file"].format(id=i) for i in ids]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise PipelineError(f"{sample_path}: {len(missing)} of {len(ids)} test ids have no image; first: {missing[:3]}")
    return ids, images, sample


def write_submission(bundle: Path, competition_dir: Path, out: Path, say=print) -> Path:
    """`out/submission.csv` (and `out/test_probs.npy`) for the test images the sample submission lists.

    Returns:
        The submission's path.
    """
    import numpy as np

    from pipeline.core.competition import Competition
    from pipeline.evaluation.submission import submission_frame, validate_submission

    clock = time.perf_counter()
    record = json.loads((bundle / BUNDLE_FILE).read_text())
    competition = Competition.model_validate(record["competition"])
    ids, images, sample = test_images(record, competition_dir)
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
