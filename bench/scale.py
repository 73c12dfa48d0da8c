"""The pipeline at a real competition's size: seconds per 1,000 images and peak memory of each stage as N grows.

For each N of `--rows` it writes a synthetic competition of N images in State Farm's Kaggle layout
(`SLUG.zip` holding `imgs.zip` with train/cK/ and test/, `driver_imgs_list.csv`,
`sample_submission.csv`; JPEGs of `--size`, 640x480 by default, 10 classes, 26 drivers, and State
Farm's share of training images, 22,424 of 102,150) into a throwaway project, then runs download ->
split -> precompute (a small network: MobileNet alpha 0.25 at 96x96, random weights) -> augment (one
pass over train and test) -> finetune -> smooth (nearest neighbours over every test row) -> submit,
each stage in its own `kp` process. Per stage: the stage's own seconds (its manifest; TensorFlow's
import left out), per 1,000 images, and the peak RSS of its process; per N: the largest peak RSS and
the disk the work folder and the data take. The limits it checks (and prints): no stage over 5 s
costs more than 1.5x per image at the largest N than at the smallest, and peak RSS stays under 3 GB.
Writes bench/results/scale.json: {"rows": [{"n", "stages": {STAGE: {"seconds", ...}}, "peak_rss_mb",
"disk_mb"}], "limits": {...}}.
    .venv/bin/python bench/scale.py --rows 5000,20000
    .venv/bin/python bench/scale.py --rows 102150          # State Farm's real counts
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.experiments.bench_results import write_result  # noqa: E402

STAGES = ("download", "split", "precompute", "augment", "finetune", "smooth", "submit")
CLASSES, DRIVERS = 10, 26
TRAIN_SHARE = 22_424 / 102_150  # State Farm: 22,424 training and 79,726 test images
PER_IMAGE_LIMIT, RSS_LIMIT_MB, TIMED_FROM_S = 1.5, 3_000, 5.0


def _jpeg(args: tuple[int, int, int, int, int]) -> bytes:
    """One synthetic frame: a class's colour and a driver's shade over noise, as a JPEG (quality 90)."""
    import numpy as np
    from PIL import Image

    seed, label, driver, width, height = args
    rng = np.random.default_rng(seed)
    base = np.array([(37 * label) % 255, (91 * driver) % 255, (53 * label + 17 * driver) % 255], np.float32)
    pixels = base + rng.normal(0, 40, (height // 8, width // 8, 3))  # coarse noise, as a camera frame compresses
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_competition(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """`folder/scale-statefarm.zip`: N images as State Farm lays them out; returns the archive."""
    n_train = max(CLASSES * 2, round(n * TRAIN_SHARE))
    train = [(i, i % CLASSES, (i // CLASSES) % DRIVERS) for i in range(n_train)]
    test = list(range(n_train, n))
    folder.mkdir(parents=True, exist_ok=True)
    inner = folder / "imgs.zip"
    width, height = size
    with Pool(os.cpu_count()) as pool, zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as zf:
        jobs = [(i, label, driver, width, height) for i, label, driver in train] + [(i, 0, 0, width, height) for i in test]
        names = [f"train/c{label}/img_{i}.jpg" for i, label, _ in train] + [f"test/img_{i}.jpg" for i in test]
        for name, data in zip(names, pool.imap(_jpeg, jobs, chunksize=64)):
            zf.writestr(name, data)
    drivers = "subject,classname,img\n" + "".join(f"p{d:03d},c{label},img_{i}.jpg\n" for i, label, d in train)
    header = "img," + ",".join(f"c{c}" for c in range(CLASSES))
    sample = header + "\n" + "".join(f"img_{i}.jpg," + ",".join(["0.1"] * CLASSES) + "\n" for i in test)
    archive = folder / "scale-statefarm.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.write(inner, "imgs.zip")
        zf.writestr("driver_imgs_list.csv", drivers)
        zf.writestr("sample_submission.csv", sample)
    inner.unlink()
    return archive


def write_project(root: Path, archive: Path) -> None:
    """A project root with the repo's configs and `configs/scale.yaml` for the synthetic competition."""
    shutil.copytree(REPO / "configs", root / "configs")
    names = [f"c{c}" for c in range(CLASSES)]
    (root / "configs" / "scale.yaml").write_text(f"""# bench/scale.py's synthetic State Farm
competition:
  slug: scale-statefarm
  classes: {names}
  id_column: img
  submission_columns: [img, {", ".join(names)}]
  image_size: [96, 96]
stages: [{", ".join(STAGES)}]
download:
  source: {archive}
  layout: class_folders
  expected: [imgs.zip, driver_imgs_list.csv, sample_submission.csv]
  test_file: "{{id}}"
  groups: {{csv: driver_imgs_list.csv, file_column: img, label_column: classname, group_column: subject}}
split:
  strategy: group
  fraction: 0.2
precompute:
  backbone: mobilenet
  alpha: 0.25
  weights: none
  cut: pool
augment:
  passes: 1
  test_passes: 1
  transforms: [{{HorizontalFlip: {{p: 0.5}}}}]
model:
  arch: pool
  hidden: []
  dropout: []
finetune:
  augmented: true
  tta: true
  phases: [{{epochs: 2, lr: 0.001}}]
smooth:
  source: finetune
  tune: false
submit:
  source: smooth
""")


def run_stage(root: Path, stage: str) -> dict:
    """`kp STAGE --comp scale` in its own process: the stage's seconds (manifest) and the process's peak RSS."""
    env = {**os.environ, "KP_ROOT": str(root), "NO_ALBUMENTATIONS_UPDATE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = root / f"{stage}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", stage, "--comp", "scale"], cwd=root, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
        clock = time.perf_counter()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - clock
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"kp {stage} failed; its log: {log}\n" + log.read_text()[-3000:])
    manifest = json.loads((root / "work" / "scale" / stage / "manifest.json").read_text())
    return {"seconds": manifest["duration_s"], "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def folder_mb(*folders: Path) -> int:
    return round(sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file()) / 1e6)


def measure(n: int, size: tuple[int, int], keep: Path | None) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix=f"kp-scale-{n}-", dir=keep))
    try:
        clock = time.perf_counter()
        archive = write_competition(scratch / "data", n, size)
        print(f"n={n:,}: {archive.stat().st_size / 1e6:,.0f} MB archive written in {time.perf_counter() - clock:.0f} s",
              flush=True)
        root = scratch / "project"
        write_project(root, archive)
        stages = {}
        for stage in STAGES:
            stages[stage] = {**run_stage(root, stage)}
            stages[stage]["per_1000_s"] = round(stages[stage]["seconds"] / n * 1000, 3)
            print(f"  {stage:10} {stages[stage]['seconds']:8.1f} s  {stages[stage]['per_1000_s']:7.3f} s/1000 images  "
                  f"peak RSS {stages[stage]['peak_rss_mb']:6,} MB", flush=True)
        return {"n": n, "stages": stages, "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
                "disk_mb": folder_mb(root / "work", scratch / "data")}
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


def limits(rows: list[dict]) -> dict:
    """Per-image cost growth from the smallest N to the largest, for each stage over `TIMED_FROM_S` there,
    and the peak RSS at the largest N; each with whether it meets its limit."""
    first, last = rows[0], rows[-1]
    growth = {}
    for stage, timing in last["stages"].items():
        if len(rows) > 1 and timing["seconds"] > TIMED_FROM_S and first["stages"][stage]["per_1000_s"] > 0:
            ratio = timing["per_1000_s"] / first["stages"][stage]["per_1000_s"]
            growth[stage] = {"ratio": round(ratio, 2), "ok": ratio <= PER_IMAGE_LIMIT}
    return {"per_image_growth": growth, "per_image_limit": PER_IMAGE_LIMIT,
            "peak_rss_mb": last["peak_rss_mb"], "rss_limit_mb": RSS_LIMIT_MB, "rss_ok": last["peak_rss_mb"] <= RSS_LIMIT_MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="5000,20000", help="image counts, comma-separated (smallest first)")
    parser.add_argument("--size", default="640x480", help="image width x height")
    parser.add_argument("--keep", type=Path, default=None, help="keep each N's project under this folder")
    parser.add_argument("--out", default="scale.json", help="the result's file name in bench/results/")
    args = parser.parse_args()
    counts = [int(n) for n in args.rows.split(",")]
    size = tuple(int(v) for v in args.size.lower().split("x"))
    rows = [measure(n, size, args.keep) for n in counts]
    checked = limits(rows)
    heads = ["s/1000 at {:,}".format(r["n"]) for r in rows]
    print(f"\n{'stage':10}" + "".join(f"{head:>18}" for head in heads) + f"{'growth':>9}")
    for stage in STAGES:
        growth = checked["per_image_growth"].get(stage)
        print(f"{stage:10}" + "".join(f"{r['stages'][stage]['per_1000_s']:18.3f}" for r in rows)
              + (f"{growth['ratio']:8.2f}x" + ("" if growth["ok"] else " over the limit") if growth else f"{'-':>9}"))
    print("peak RSS " + ", ".join(f"{r['n']:,}: {r['peak_rss_mb']:,} MB" for r in rows)
          + f" (limit {RSS_LIMIT_MB:,} MB: {'met' if checked['rss_ok'] else 'MISSED'}); disk "
          + ", ".join(f"{r['n']:,}: {r['disk_mb']:,} MB" for r in rows))
    write_result(args.out, {"rows": rows, "limits": checked, "size": list(size)})


if __name__ == "__main__":
    main()
