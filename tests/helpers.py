"""Helpers shared by the test modules: paths, synthetic Kaggle archives, configs and served competitions.

Fixtures stay in conftest.py; everything a test module imports by name lives here.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COMPETITIONS = SHARED_DATA / "competitions"

needs_shared_data = pytest.mark.skipif(
    not COMPETITIONS.is_dir(), reason=f"real data folder {COMPETITIONS} is absent"
)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG in pixels: a plot's figure size times its dpi, so its layout (how many panels)."""
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is not a PNG"
        return image.size


def write_config(root: Path, name: str, text: str) -> Path:
    path = root / "configs" / f"{name}.yaml"
    path.write_text(text)
    return path


def image_bytes(seed: int, size=(16, 12), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def nested_zip(files: dict[str, bytes]) -> bytes:
    """A zip archive's bytes, members deflated as Kaggle's are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buffer.getvalue()


def make_statefarm_like(folder: Path, drivers=6, classes=3, per_driver_class=4, test=5,
                        broken: set[str] = frozenset(), replaced: dict[str, bytes] | None = None) -> Path:
    """A State-Farm-shaped SLUG.zip: imgs.zip (train/cK/img_N.jpg, test/img_N.jpg),
    driver_imgs_list.csv and sample_submission.csv. Names in `broken` get truncated JPEG bytes,
    names in `replaced` the bytes given (e.g. a TIFF named .jpg)."""
    replaced = replaced or {}
    images: dict[str, bytes] = {}
    rows = ["subject,classname,img"]
    n = 0
    for d in range(drivers):
        for c in range(classes):
            for _ in range(per_driver_class):
                name = f"img_{n}.jpg"
                data = image_bytes(n)
                images[f"train/c{c}/{name}"] = replaced.get(name, data[: len(data) // 3] if name in broken else data)
                rows.append(f"p{d:03d},c{c},{name}")
                n += 1
    test_names = [f"img_{n + i}.jpg" for i in range(test)]
    for i, name in enumerate(test_names):
        images[f"test/{name}"] = image_bytes(10_000 + i)
    header = "img," + ",".join(f"c{c}" for c in range(classes))
    sample = [header] + [name + "," + ",".join(["0.1"] * classes) for name in test_names]
    archive = folder / "statefarm-like.zip"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("imgs.zip", nested_zip(images))
        zf.writestr("driver_imgs_list.csv", "\n".join(rows) + "\n")
        zf.writestr("sample_submission.csv", "\n".join(sample) + "\n")
    return archive


def statefarm_like_config(root: Path, archive: Path, classes=3, extra: str = "") -> None:
    names = [f"c{c}" for c in range(classes)]
    write_config(root, "synth", f"""
competition:
  slug: synth-statefarm
  classes: {names}
  id_column: img
  submission_columns: [img, {", ".join(names)}]
  image_size: [12, 16]
stages: [download, split]
download:
  source: {archive}
  layout: class_folders
  expected: [imgs.zip, driver_imgs_list.csv, sample_submission.csv]
  test_file: "{{id}}"
  groups: {{csv: driver_imgs_list.csv, file_column: img, label_column: classname, group_column: subject}}
split:
  strategy: group
  fraction: 0.34
{extra}""")


def serve_competition(folder: Path, slug: str, files: dict[str, bytes], solution: str) -> Path:
    """A competition as the local Kaggle server reads it: folder/SLUG/SLUG.zip (+ solution.csv)."""
    (folder / slug).mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / slug / f"{slug}.zip", "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    (folder / slug / "solution.csv").write_text(solution)
    return folder


def serve_digits(folder: Path, drop_solution_rows: int = 0) -> Path:
    """The embedded digits competition served as `digit-recognizer` (the slug configs/digits.yaml names)."""
    from pipeline.data.digits import write_digits_competition

    raw = folder.parent / "digits-raw"
    write_digits_competition(raw, raw / "solution.csv")
    solution = (raw / "solution.csv").read_text().splitlines()
    kept = solution[: len(solution) - drop_solution_rows]
    files = {name: (raw / name).read_bytes() for name in ("train.csv", "test.csv", "sample_submission.csv")}
    return serve_competition(folder, "digit-recognizer", files, "\n".join(kept) + "\n")



def start_kp(project: Path, *args: str) -> subprocess.Popen:
    """`kp ARGS` in a subprocess on the throwaway project (for killing or interrupting it). SIGINT is
    reset to its default first: a test run started as a background job inherits it ignored, and
    Python then never raises KeyboardInterrupt."""
    env = {**os.environ, "KP_ROOT": str(project)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_partial(process: subprocess.Popen, store: Path, pattern: str | None, timeout: float = 120.0) -> Path:
    """Wait until a file matching `pattern` is being written into one of `store`'s temporary
    entries (`.tmp-*`; with `pattern` None, until such an entry exists); returns that entry.
    Fails the test if `process` finishes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in store.glob(".tmp-*"):
            if pattern is None or any(tmp.rglob(pattern)):
                return tmp
        if process.poll() is not None:
            pytest.fail(f"kp finished before the fault:\n{process.stdout.read().decode()}")
        time.sleep(0.002)
    process.kill()
    pytest.fail("timed out waiting for a partial output")


def calibrated_mobilenetv2_weights(path: Path, size: int = 32, alpha: float = 0.35) -> Path:
    """A MobileNetV2 weights file (`precompute.weights`) for tiny tests: random convolutions whose
    batchnorm moving statistics are set, layer by layer, to the statistics of the activations they
    normalise on random images (a data-dependent init). With Keras' defaults (mean 0, variance 1)
    random features vanish to ~1e-12 and are 0 in float16, so nothing downstream could learn."""
    import keras

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3),
                                          alpha=alpha, pooling="avg")
    images = np.random.default_rng(0).uniform(-1, 1, (32, size, size, 3)).astype("float32")
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            inputs = np.asarray(keras.Model(base.input, layer.input)(images))  # eager: no compile per layer
            axes = tuple(range(inputs.ndim - 1))
            gamma, beta, _, _ = layer.get_weights()
            layer.set_weights([gamma, beta, inputs.mean(axis=axes), inputs.var(axis=axes)])
    base.save_weights(path)
    return path
