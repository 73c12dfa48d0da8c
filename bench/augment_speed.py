"""Is augmentation the bottleneck? The two measurements behind the course's cached augmented features.

(1) Throughput: the same `--images` training images through precompute's parallel decoder and
    compiled forward pass, plain and with the competition's `augment.transforms`, interleaved
    `--repeats` times; medians and their ratio (target: augmented >= 0.8x plain).
(2) Training cost: one epoch of the dense head on the clean + K cached passes (K = `augment.passes`)
    vs K + 1 epochs of end-to-end training through the frozen backbone with on-the-fly augmentation
    (the course: 9 s vs 273 s). The end-to-end epoch is timed on `--images` images (its second
    epoch, after tracing) and scaled to the training rows; the head epoch is the median of 3.
Needs `kp split` and `kp augment` to have run for the competition (cached features and passes).
Writes bench/results/augment_speed_COMP.json.
    .venv/bin/python bench/augment_speed.py --comp dogscats --config configs/offline/dogscats.yaml
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.augmentation import RowAugmenter  # noqa: E402
from pipeline.data.features import label_indices  # noqa: E402
from pipeline.data.index import read_index  # noqa: E402
from pipeline.engine.config import load_config  # noqa: E402
from pipeline.engine.registry import all_stages  # noqa: E402
from pipeline.experiments.bench_results import write_result  # noqa: E402


def throughput(config, paths, repeats: int) -> dict:
    from pipeline.models.extractor import build_extractor

    extractor = build_extractor(config.section("precompute"), config.root, tuple(config.competition.image_size))
    augmenter = RowAugmenter(config.get("augment.transforms"), (0, 0, 1))
    rates = {"plain": [], "augmented": []}
    with tempfile.TemporaryDirectory() as folder:
        extractor.write(paths[:64], Path(folder) / "warmup.npy", augment=augmenter)  # trace once
        for repeat in range(repeats):
            for mode, augment in (("plain", None), ("augmented", augmenter)):
                rate = extractor.write(paths, Path(folder) / f"{mode}.npy", augment=augment)["images_per_s"]
                rates[mode].append(rate)
                print(f"repeat {repeat + 1} {mode:9}: {rate:6.1f} img/s", flush=True)
    medians = {mode: statistics.median(r) for mode, r in rates.items()}
    return {"images": len(paths), "runs": rates, "median_images_per_s": medians,
            "ratio_augmented_plain": round(medians["augmented"] / medians["plain"], 3)}


def training_cost(config, paths, labels, n_train: int, passes: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.data.images import image_batches
    from pipeline.models.backbones import build_feature_model, resolve_weights
    from pipeline.models.build import build_model
    from pipeline.training.recipes.head import load_training_data

    work = config.work_dir
    view = all_stages()["finetune"].view(config)
    inputs = {name: work / name for name in ("precompute", "split", "augment")}
    data = load_training_data(view, inputs, augmented=True, tta=False)
    batch_size = config.get("finetune.batch_size")

    def compiled(model):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        return model

    head, _ = build_model(view, data.x_train.shape[1:], len(data.classes), warn=lambda _: None)
    epochs = []
    timer = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epochs.append(time.perf_counter()),
                                           on_epoch_end=lambda e, logs: epochs.append(time.perf_counter()))
    compiled(head).fit(data.x_train, data.y_train, batch_size=batch_size, epochs=3, verbose=0, callbacks=[timer])
    head_epoch = statistics.median(epochs[i + 1] - epochs[i] for i in range(0, len(epochs), 2))

    s = config.section("precompute")
    height, width = config.competition.image_size
    features = build_feature_model(s.backbone, resolve_weights(s.weights, config.root), (height, width, 3), s.cut,
                                   s.alpha)
    features.model.trainable = False
    image = keras.Input((height, width, 3))
    head, _ = build_model(view, tuple(features.model.output.shape[1:]), len(data.classes), warn=lambda _: None)
    end_to_end = compiled(keras.Model(image, head(features.model(image, training=False))))
    augmenter = RowAugmenter(config.get("augment.transforms"), (0, 0, 1))
    images = image_batches(paths, (height, width), batch_size, features.preprocess, augment=augmenter)
    dataset = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(np.asarray(labels)).batch(batch_size)))
    epochs.clear()
    end_to_end.fit(dataset, epochs=2, verbose=0, callbacks=[timer], shuffle=False)  # the dataset comes shuffled
    per_image = (epochs[3] - epochs[2]) / len(paths)
    end_to_end_s = per_image * n_train * (passes + 1)
    return {"train_rows": n_train, "passes": passes, "head_epoch_on_clean_and_passes_s": round(head_epoch, 2),
            "end_to_end_epoch_images": len(paths), "end_to_end_s_per_image": round(per_image, 5),
            f"end_to_end_{passes + 1}_epochs_s": round(end_to_end_s, 1),
            "ratio": round(end_to_end_s / head_epoch, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comp", required=True)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.comp, extra_files=args.config, sets=args.sets)
    work = config.work_dir
    index = read_index(work / "download" / "index.csv")
    train = index[index.subset == "train"].sample(frac=1.0, random_state=0)  # a mix of classes
    paths = [work / "download" / "raw" / p for p in train.path[:args.images]]
    labels = label_indices(train.label[:args.images], config.competition.classes)
    result = {"competition": args.comp, "config": args.config, "throughput": throughput(config, paths, args.repeats)}
    n_train = json.loads((work / "split" / "report.json").read_text())["n_train"]
    result["training"] = training_cost(config, paths, labels, n_train, config.get("augment.passes"))
    t, c = result["throughput"], result["training"]
    print(f"\n{'':34} {'value':>10}")
    print(f"{'plain img/s (median)':34} {t['median_images_per_s']['plain']:10.1f}")
    print(f"{'augmented img/s (median)':34} {t['median_images_per_s']['augmented']:10.1f}")
    print(f"{'augmented / plain':34} {t['ratio_augmented_plain']:10.2f}")
    print(f"{'head epoch, clean + passes (s)':34} {c['head_epoch_on_clean_and_passes_s']:10.2f}")
    epochs = c["passes"] + 1
    print(f"{f'end-to-end, {epochs} epochs (s, scaled)':34} {c[f'end_to_end_{epochs}_epochs_s']:10.1f}")
    print(f"{'end-to-end / head':34} {c['ratio']:10.1f}x")
    write_result(f"augment_speed_{args.comp}.json", result)


if __name__ == "__main__":
    main()
