"""The device path of a forward pass (`pipeline.models.device`): on the CPU `auto` keeps the float32
path bit for bit; the GPU's path (mixed precision, XLA compiled once with a padded last batch, uint8
pixels preprocessed on the device, device prefetch), forced here on the CPU, writes features close
to float32's, records its plan, and compiles once; heads run many steps per call with identical
weights; several replicas train as one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.data.arrays import load_array
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.models.device import batch_for_memory, plan_device
from tests.helpers import REPO, calibrated_mobilenetv2_weights, make_statefarm_like, statefarm_like_config

GPU_PATH = ["compute.precision=mixed_bfloat16", "compute.xla=true", "compute.pixels=uint8"]
NO_GPU = not tf.config.list_physical_devices("GPU")


@pytest.fixture
def mobilenet_features(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(project, archive)
    weights = calibrated_mobilenetv2_weights(tmp_path / "mobilenetv2.weights.h5")
    return ["competition.image_size=[32, 32]", "stages=[download, split, precompute]",
            "precompute.backbone=mobilenetv2", "precompute.alpha=0.35", f"precompute.weights={weights}",
            "precompute.dtype=float32", "precompute.batch_size=8"]


@pytest.mark.skipif(not NO_GPU, reason="checks what auto means on a machine without a GPU")
def test_auto_on_the_cpu_is_the_plain_float32_path():
    plan = plan_device(None, 24)
    assert (plan.device, plan.precision, plan.xla, plan.pixels, plan.batch_size, plan.prefetch) == (
        "/CPU:0", "float32", False, "float32", 24, False)
    with pytest.raises(PipelineError, match="compute.device is gpu, but TensorFlow sees no GPU"):
        plan_device(types.SimpleNamespace(device="gpu", precision="auto", xla="auto", pixels="auto",
                                          device_batch_size="auto"), 24)


def test_the_gpu_path_forced_on_the_cpu(project, mobilenet_features):
    """XLA + uint8 pixels preprocessed in the compiled function = the float32 path on the same pixels
    rounded to uint8 (rounding is the only change), with the plan in meta.json and no new fingerprint;
    with mixed precision too, XLA compiles once whatever the last batch, padded."""
    from pipeline.data.images import decode_resize
    from pipeline.data.index import read_index
    from pipeline.models.extractor import build_extractor

    plain = load_config("synth", sets=mobilenet_features)
    runner.run(plain)
    gpu_path = load_config("synth", sets=[*mobilenet_features, *GPU_PATH, "compute.precision=float32",
                                          f"paths.work={project / 'work-gpu-path'}"])
    runner.run(gpu_path)
    a, b = (Manifest.read(config.work_dir / "precompute") for config in (plain, gpu_path))
    assert a.fingerprint == b.fingerprint  # the device is in no fingerprint
    assert (a.metrics["device"]["xla"], a.metrics["device"]["pixels"]) == (False, "float32")
    assert {k: b.metrics["device"][k] for k in ("precision", "xla", "pixels", "batch_size")} == {
        "precision": "float32", "xla": True, "pixels": "uint8", "batch_size": 8}
    assert json.loads((gpu_path.work_dir / "precompute" / "meta.json").read_text())["device"] == b.metrics["device"]

    reference = build_extractor(plain.section("precompute"), plain.root, (32, 32), plain.compute)
    raw = plain.work_dir / "download" / "raw"
    index = read_index(plain.work_dir / "download" / "index.csv").set_index("id")["path"]
    for subset in ("train", "test"):  # 48 rows (6 batches of 8) and 6 (one padded batch)
        ids = (plain.work_dir / "precompute" / f"{subset}_rows.csv").read_text()
        assert ids == (gpu_path.work_dir / "precompute" / f"{subset}_rows.csv").read_text()
        pixels = np.stack([np.round(decode_resize(str(raw / index[i]), (32, 32)).numpy())
                           for i in [line.split(",")[0] for line in ids.splitlines()[1:]]])
        expected = np.asarray(reference.forward.on_pixels(pixels))
        computed = load_array(gpu_path.work_dir / "precompute" / f"{subset}.npy")
        assert expected.std() > 0.1
        assert not np.array_equal(computed, load_array(plain.work_dir / "precompute" / f"{subset}.npy"))
        np.testing.assert_allclose(computed, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    # With mixed_bfloat16 as on an H200: one compilation whatever the last batch
    config = load_config("synth", sets=[*mobilenet_features, *GPU_PATH])
    images = sorted((plain.work_dir / "download" / "raw" / "train").glob("c*/*.jpg"))
    extractor = build_extractor(config.section("precompute"), config.root, (32, 32), config.compute)
    assert extractor.forward.model.layers[-2].compute_dtype == "bfloat16"
    for count in (6, 13, 16):  # a padded single batch, one full + a padded one, two full
        extractor.write(images[:count], project / f"rows_{count}.npy")
        assert load_array(project / f"rows_{count}.npy").shape == (count, 1280)
    assert extractor.forward._run.experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(load_array(project / "rows_6.npy"), load_array(project / "rows_13.npy")[:6])
    reference.write(images[:16], project / "exact.npy")
    # bfloat16 keeps 8 bits of mantissa, and this random network amplifies rounding (real weights: 0.997)
    exact, mixed = load_array(project / "exact.npy"), load_array(project / "rows_16.npy")
    assert np.corrcoef(exact.ravel(), mixed.ravel())[0, 1] > 0.9


def test_batch_size_from_memory_is_the_largest_power_of_two_that_fits():
    gib, mib = 2.0**30, 2.0**20
    assert batch_for_memory(1 * gib, 50 * mib, 10 * gib) == 128  # 9 GiB / 50 MiB = 184 images
    assert batch_for_memory(1 * gib, 1 * mib, 64 * gib) == 1024  # capped
    assert batch_for_memory(1 * gib, 500 * mib, 2 * gib) == 16  # floor: better slow than nothing
    assert batch_for_memory(0, 10 * mib, 640 * mib) == 64  # exactly 64 fit


def test_many_steps_per_call_train_a_head_to_the_same_weights(monkeypatch, tmp_path):
    import keras

    from pipeline.training import fit as fitting

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 20)).astype("float32"), rng.integers(0, 3, 300)

    def trained(steps: int):
        monkeypatch.setattr(fitting, "STEPS_PER_EXECUTION", steps)
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dropout(0.5), keras.layers.Dense(3, activation="softmax")])
        history, best, _ = fitting.fit(model, (x, y), (x[:60], y[:60]), fitting.FitOptions(
            phases=[fitting.Phase(3, 0.01)], schedule="phases", optimizer="adam", momentum=0.9, batch_size=16,
            out_dir=tmp_path, verbose=0))
        assert model.steps_per_execution == steps
        return model.get_weights(), history["val_loss"], best

    (w1, loss1, best1), (w32, loss32, best32) = trained(1), trained(32)
    assert loss1 == loss32 and best1 == best32
    for a, b in zip(w1, w32):
        np.testing.assert_array_equal(a, b)


REPLICAS = """
import sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(sys.argv[1]))
import keras
from pathlib import Path
from pipeline.models.device import DevicePlan, replicas_scope
from pipeline.training.fit import FitOptions, Phase, fit
plan = DevicePlan("/CPU:0", "CPU", "float32", False, "float32", 16)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(256, 8)).astype("float32"), rng.integers(0, 2, 256)
with replicas_scope(plan, "CPU") as replicas:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    fit(model, (x, y), (x, y), FitOptions(phases=[Phase(2, 0.05)], schedule="phases", optimizer="sgd", momentum=0.9,
        batch_size=32, out_dir=Path(sys.argv[2]), verbose=0, rate_factors={model.layers[0].kernel.path: 0.5}))
print(replicas, float(model.evaluate(x, y, verbose=0)[0]))
"""


@pytest.mark.slow  # 12-17 s (2026-12-06): MirroredStrategy over two logical CPUs; the GPU path forced on the CPU stays fast
def test_two_replicas_train_like_one(tmp_path):
    """tune's several-GPU path (`replicas_scope`: MirroredStrategy) on two logical CPUs: the batch split
    between replicas and the gradients summed train the same model as one device."""
    runs = []
    for count in (1, 2):
        for attempt in range(2):  # TensorFlow's CPU collectives have segfaulted here once under load (SIGSEGV)
            done = subprocess.run([sys.executable, "-c", REPLICAS, str(count), str(tmp_path)], capture_output=True,
                                  text=True, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
            if done.returncode != -11:
                break
        assert done.returncode == 0, done.stderr[-2000:]
        replicas, loss = done.stdout.split()[-2:]
        runs.append((int(replicas), float(loss)))
    assert [r for r, _ in runs] == [1, 2]
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-4)
