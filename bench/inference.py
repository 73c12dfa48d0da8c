"""Which way of running a packaged network is fastest on this CPU, at the same probabilities?

For each network a kernel runs (a backbone file of ../shared/data/weights at its size), one batch of
`--batch` random images, timed `--repeats` times after a warm-up, medians:
- `keras predict`: `model.predict_on_batch`;
- `kp forward`: kp's own compiled forward pass (`pipeline.models.inference.Forward`, what the kernel runs);
- `saved model`: `model.export()` (a TensorFlow SavedModel), loaded back and called;
- `litert`: the SavedModel converted by `tf.lite.TFLiteConverter` (float32, XNNPACK), run by TensorFlow's interpreter.
Each one's outputs are compared with Keras' (the largest absolute difference). Writes bench/results/inference.json.
    .venv/bin/python bench/inference.py [--batch 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.experiments.bench_results import write_result  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "data" / "weights"
NETWORKS = {  # name: (backbone, weights file, alpha, (height, width))
    "EfficientNet-Lite2 260": ("file", "efficientnet_lite2_imagenet_notop.keras", 1.0, (260, 260)),
    "EfficientNet-Lite0 224": ("file", "efficientnet_lite0_imagenet_notop.keras", 1.0, (224, 224)),
    "MobileNetV2 0.5 224": ("mobilenetv2", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5", 0.5,
                            (224, 224)),
}


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up: tracing, allocation
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(name: str, spec, batch: int, repeats: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from pipeline.models.backbones import build_feature_model
    from pipeline.models.device import plan_device
    from pipeline.models.inference import Forward

    backbone, weights, alpha, size = spec
    network = build_feature_model(backbone, str(WEIGHTS / weights), (*size, 3), "pool", alpha,
                                  "none" if backbone == "file" else "backbone")
    model = network.model
    images = np.random.default_rng(0).uniform(0, 255, (batch, *size, 3)).astype(np.float32)
    ready = network.preprocess(images.copy()) if network.preprocess else images
    reference = np.asarray(model.predict_on_batch(ready))
    forward = Forward(model, plan_device(None, batch), None)
    ways = {"keras predict": lambda: np.asarray(model.predict_on_batch(ready)),
            "kp forward": lambda: forward(tf.constant(ready)).numpy()}
    with tempfile.TemporaryDirectory() as folder:
        exported = Path(folder) / "saved"
        model.export(str(exported), verbose=False)
        loaded = tf.saved_model.load(str(exported))  # kept: its variables live as long as it does
        ways["saved model"] = lambda: loaded.serve(tf.constant(ready)).numpy()
        converter = tf.lite.TFLiteConverter.from_saved_model(str(exported))
        interpreter = tf.lite.Interpreter(model_content=converter.convert(), num_threads=None)
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], ready.shape)
        interpreter.allocate_tensors()

        def litert():
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], ready)
            interpreter.invoke()
            return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

        ways["litert"] = litert
        rows = {}
        for way, call in ways.items():
            difference = float(np.abs(call() - reference).max())
            seconds = median_seconds(call, repeats)
            rows[way] = {"images_per_s": round(batch / seconds, 1), "max_abs_difference": difference}
    base = rows["kp forward"]["images_per_s"]
    for row in rows.values():
        row["vs_kp_forward"] = round(row["images_per_s"] / base, 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = {"batch": args.batch, "repeats": args.repeats, "networks": {}}
    print(f"{'network':24} {'way':14} {'img/s':>8} {'x kp':>6} {'max |diff|':>11}")
    for name, spec in NETWORKS.items():
        rows = measure(name, spec, args.batch, args.repeats)
        result["networks"][name] = rows
        for way, row in rows.items():
            print(f"{name:24} {way:14} {row['images_per_s']:8.1f} {row['vs_kp_forward']:6.2f} "
                  f"{row['max_abs_difference']:11.2e}")
    write_result("inference.json", result)


if __name__ == "__main__":
    main()
