"""Transfer-learning speed on State Farm's 640x480 images: is precompute as fast as the hardware allows?

For each backbone (VGG16 with weights=None — speed does not depend on the weights — the real
MobileNet alpha 0.25 file and the real MobileNetV2 alpha 0.5 file), run as the `compute` section's
`auto` device plan says on this machine (`pipeline.models.device`: on a GPU mixed precision, XLA,
uint8 pixels, device prefetch, a batch from its memory; on a CPU float32 batches of --batch), in one run:
  1. precompute: JPEG files on disk -> features on disk (the stage's own code path)
  2. the compiled forward pass alone on tensors preloaded onto the device   target: (1) / (2) >= 0.90
     (and model.predict on the same tensors, float32 path: what the stage would be without its own)
     and the FLOP/s (2) achieves against the device's peak: a GPU's published dense peak for the
     plan's precision, or on a CPU the FLOP/s of a large float32 matmul measured here
  3. keras.utils.image_dataset_from_directory + model.predict     target: (1) / (3) >= 1.5
  4. one dense-head epoch on cached features vs one epoch of the same head trained end to end
     through the frozen base (second epoch of each, after tracing)  target: >= 30x (the course: 9 s vs 273 s)
  (1)-(3) run --repeats times, interleaved; the table shows medians (these machines are noisy).
  5. peak RSS of precompute over 800 and 3,200 images (the list repeated), each in a fresh process
     target: flat
Prints a table and writes bench/results/transfer.json. Needs ../shared/data; takes a few minutes on
2 CPUs (on a GPU pass more images: --vgg-images 2048 --mobilenet-images 8192).
    .venv/bin/python bench/transfer.py [--vgg-images 64] [--mobilenet-images 800]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.experiments.bench_results import write_result  # noqa: E402

DATA = REPO.parent / "shared" / "data"
HIRES = DATA / "competitions" / "state-farm-distracted-driver-detection-hires" / \
    "state-farm-distracted-driver-detection-hires.zip"
MOBILENET = DATA / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
MOBILENETV2 = DATA / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
SIZE = (224, 224)
BATCH = 32
# Published dense peaks (TFLOP/s) by the device name TensorFlow reports, per precision; the plan's
# precision picks the column (float32 on a GPU: the FP32 units, no TF32).
GPU_PEAK_TFLOPS = {
    "H200": {"mixed_bfloat16": 989.0, "mixed_float16": 989.0, "float32": 67.0},
    "H100": {"mixed_bfloat16": 989.0, "mixed_float16": 989.0, "float32": 67.0},
    "A100": {"mixed_bfloat16": 312.0, "mixed_float16": 312.0, "float32": 19.5},
    "L4": {"mixed_bfloat16": 121.0, "mixed_float16": 121.0, "float32": 30.3},
    "T4": {"mixed_float16": 65.0, "float32": 8.1},
}


def extract_train_images(folder: Path) -> Path:
    from pipeline.data.archive import extract_nested, extract_zip

    extract_zip(HIRES, folder)
    extract_nested(folder)
    return folder / "train"


def backbone(name: str, precision: str = "float32"):
    from pipeline.models.backbones import build_feature_model
    from pipeline.models.device import precision_scope

    with precision_scope(precision):
        if name == "vgg16":
            return build_feature_model("vgg16", None, (*SIZE, 3), "pool")
        if name == "mobilenetv2":
            return build_feature_model("mobilenetv2", str(MOBILENETV2), (*SIZE, 3), "pool", alpha=0.5)
        return build_feature_model("mobilenet", str(MOBILENET), (*SIZE, 3), "pool", alpha=0.25)


def flops_per_image(model) -> float:
    """Floating-point operations of one image's forward pass (a multiply-add counts 2), by TensorFlow's profiler."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2_as_graph

    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, *SIZE, 3), tf.float32))
    _, graph_def = convert_variables_to_constants_v2_as_graph(concrete)
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        options = tf.compat.v1.profiler.ProfileOptionBuilder(
            tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
        return float(tf.compat.v1.profiler.profile(graph=graph, cmd="op", options=options).total_float_ops)


def peak_flops(plan) -> tuple[float | None, str]:
    """The device's peak FLOP/s for the plan's precision and where the figure comes from."""
    import tensorflow as tf

    if plan.on_gpu:
        for name, peaks in GPU_PEAK_TFLOPS.items():
            if name in plan.description and plan.precision in peaks:
                return peaks[plan.precision] * 1e12, f"published {name} dense {plan.precision}"
        return None, f"no published peak here for {plan.description}"
    n = 2048
    a = tf.random.normal((n, n))
    matmul = tf.function(lambda x: tf.matmul(x, x))
    matmul(a).numpy()
    seconds = statistics.median(timed(lambda: matmul(a).numpy()) for _ in range(5))
    return 2 * n**3 / seconds, "measured: 2048x2048 float32 matmul"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, train_dir: Path, n_images: int, scratch: Path, repeats: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.data.features import write_features
    from pipeline.data.images import image_batches
    from pipeline.models.device import plan_device
    from pipeline.models.heads import build_head
    from pipeline.models.inference import Forward

    plan = plan_device(None, BATCH)
    fm = backbone(name, plan.precision)
    paths = sorted(train_dir.glob("c*/*.jpg"))[:n_images]
    forward = Forward(fm.model, plan, fm.preprocess)
    shape = tuple(int(d) for d in fm.model.output.shape[1:])
    batch = forward.batch_size
    batches = [b for b in forward.batches(paths, SIZE)]  # on the device already, as the stage feeds them
    forward(batches[0]).numpy()  # trace (and compile) once, outside every timing

    features = scratch / f"{name}.npy"
    float_fm = fm if plan.precision == "float32" else backbone(name)
    images = np.concatenate([b.numpy() for b in image_batches(paths, SIZE, batch, float_fm.preprocess)])
    subset = scratch / f"{name}_subset"
    for p in paths:
        (subset / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, subset / p.parent.name / p.name)

    def keras_baseline():
        ds = keras.utils.image_dataset_from_directory(subset, image_size=SIZE, batch_size=BATCH, shuffle=False,
                                                      label_mode=None, verbose=False)
        float_fm.model.predict(ds.map(float_fm.preprocess), verbose=0)

    variants = {
        # 1. the precompute path, files to .npy
        "precompute": lambda: write_features(forward, paths, features, shape, "float16", SIZE),
        # 2. forward pass alone on tensors already on the device; 2b. float32 model.predict on them in memory
        "forward": lambda: [forward(b).numpy() for b in batches],
        "predict": lambda: float_fm.model.predict(images, batch_size=batch, verbose=0),
        # 3. the plain Keras way: image_dataset_from_directory + predict
        "keras_baseline": keras_baseline,
    }
    seconds = {key: [] for key in variants}
    for _ in range(repeats):  # interleaved, so that a noisy minute hits every variant alike
        for key, fn in variants.items():
            seconds[key].append(timed(fn))
    t1, t2, t2b, t3 = (statistics.median(seconds[k]) for k in variants)
    flops = flops_per_image(float_fm.model)
    peak, peak_source = peak_flops(plan)

    # 4. a dense-head epoch on cached features vs end to end through the frozen base
    x = np.load(features).astype(np.float32)
    y = np.random.default_rng(0).integers(0, 10, size=len(x))
    hidden = [4096, 4096] if name == "vgg16" else [128]
    head = build_head(x.shape[1:], 10, "fc" if name == "vgg16" else "pool", hidden, [0.5] * len(hidden))
    head.compile("adam", "sparse_categorical_crossentropy")
    cached_epoch = epoch_seconds(head, x, y)
    fm.model.trainable = False
    inputs = keras.Input((*SIZE, 3))
    end_to_end = keras.Model(inputs, build_head(x.shape[1:], 10, "fc" if name == "vgg16" else "pool", hidden,
                                                [0.5] * len(hidden))(fm.model(inputs, training=False)))
    end_to_end.compile("adam", "sparse_categorical_crossentropy")
    labels = tf.data.Dataset.from_tensor_slices(y).batch(BATCH)
    e2e_data = tf.data.Dataset.zip((image_batches(paths, SIZE, BATCH, float_fm.preprocess), labels))
    e2e_epoch = epoch_seconds(end_to_end, e2e_data, None)
    n = len(paths)
    return {
        "backbone": name, "images": n, "batch": batch, "repeats": repeats, "device": plan.record(),
        "gflops_per_image": round(flops / 1e9, 2), "peak_tflops": None if peak is None else round(peak / 1e12, 3),
        "peak_source": peak_source,
        "forward_fraction_of_peak": None if peak is None else round(n / t2 * flops / peak, 3),
        "seconds": {k: [round(t, 2) for t in v] for k, v in seconds.items()},
        "precompute_img_s": round(n / t1, 1),
        "forward_only_img_s": round(n / t2, 1),
        "predict_only_img_s": round(n / t2b, 1),
        "keras_baseline_img_s": round(n / t3, 1),
        "ratio_precompute_vs_forward": round(t2 / t1, 3),
        "speedup_vs_keras_baseline": round(t3 / t1, 2),
        "cached_head_epoch_s": round(cached_epoch, 3),
        "end_to_end_epoch_s": round(e2e_epoch, 2),
        "head_speedup": round(e2e_epoch / cached_epoch, 1),
    }


def epoch_seconds(model, x, y) -> float:
    """Seconds of the second of two epochs (the first pays for tracing)."""
    import keras

    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    if y is None:
        model.fit(x, epochs=2, verbose=0, callbacks=[Clock()])
    else:
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[Clock()])
    return times[-1]


def rss_child(train_dir: str, n_images: int, scratch: str) -> None:
    """Run in a fresh process: precompute n_images (the list repeated) with MobileNet; print peak RSS."""
    from pipeline.data.features import write_features
    from pipeline.models.device import plan_device
    from pipeline.models.inference import Forward

    plan = plan_device(None, BATCH)
    fm = backbone("mobilenet", plan.precision)
    paths = sorted(Path(train_dir).glob("c*/*.jpg"))
    paths = (paths * (n_images // len(paths) + 1))[:n_images]
    shape = tuple(int(d) for d in fm.model.output.shape[1:])
    write_features(Forward(fm.model, plan, fm.preprocess), paths, Path(scratch) / f"rss_{n_images}.npy", shape,
                   "float16", SIZE)
    print(json.dumps({"images": n_images, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: on Linux that survives
    fork + exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg-images", type=int, default=64)
    parser.add_argument("--mobilenet-images", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of (1)-(3); medians shown")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), args.rss_child[2])
        return
    if not HIRES.is_file() or not MOBILENET.is_file() or not MOBILENETV2.is_file():
        sys.exit(f"needs {HIRES}, {MOBILENET} and {MOBILENETV2}")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        train_dir = extract_train_images(scratch / "hires")
        rows = [measure("vgg16", train_dir, args.vgg_images, scratch, args.repeats),
                measure("mobilenet", train_dir, args.mobilenet_images, scratch, args.repeats),
                measure("mobilenetv2", train_dir, args.mobilenet_images, scratch, args.repeats)]
        rss = []
        for n in (800, 3200):
            done = subprocess.run([sys.executable, __file__, "--rss-child", str(train_dir), str(n), tmp],
                                  capture_output=True, text=True, check=True)
            rss.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"\n{'':36}" + "".join(f"{r['backbone']:>12}" for r in rows))
    for key, label in [("images", "images"), ("precompute_img_s", "(1) precompute, files->features img/s"),
                       ("forward_only_img_s", "(2) forward pass alone img/s"),
                       ("predict_only_img_s", "    model.predict, same tensors img/s"),
                       ("ratio_precompute_vs_forward", "(1)/(2)  target >= 0.90"),
                       ("gflops_per_image", "    GFLOP per image"),
                       ("peak_tflops", "    device peak TFLOP/s"),
                       ("forward_fraction_of_peak", "    (2) as a fraction of peak"),
                       ("keras_baseline_img_s", "(3) dataset_from_directory+predict"),
                       ("speedup_vs_keras_baseline", "(1)/(3)  target >= 1.5"),
                       ("cached_head_epoch_s", "(4) head epoch on cached features s"),
                       ("end_to_end_epoch_s", "    head epoch end to end s"),
                       ("head_speedup", "    speed-up  target >= 30")]:
        print(f"{label[:36]:36}" + "".join(f"{r[key]!s:>12}" for r in rows))
    print(f"device: {rows[0]['device']}; peak: {rows[0]['peak_source']}")
    print("(5) precompute peak RSS, mobilenet: " + ", ".join(f"{r['images']} images {r['peak_rss_mb']} MB" for r in rss))
    write_result("transfer.json", {"rows": rows, "peak_rss": rss, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
