"""`kp package`: the trained models a submission comes from, bundled with what runs them again on other
test images offline, as a code competition's kernel must (no training, no network).

The bundle (`work/COMP/package/`) holds every model the source stage averages (the one model of
finetune or bnretrain, each member of an ensemble, each fold model of cv), precompute's network
settings and its weights file, the augmented test passes' transforms and seed when the models
use test-time augmentation, the competition's submission format, and `kernel.py`, which runs
`pipeline.shipping.kernel` (features of the test images, each model's averaged probabilities, their mean,
`submission.csv`). `bundle.json` records the fingerprints of the source and the runs the models
came from, and the bundle's size. It is written to a temporary folder renamed into place.

Packaged so far: sources whose models read precompute's features (finetune, bnretrain, ensemble
and cv over those recipes) and smooth of one of them (the kernel smooths its test rows among
themselves with the k and weight the smooth run used), on a network given as a weights file or
`weights: none`.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.artifacts import (BUNDLE_DIR, BUNDLE_FILE, BUNDLE_MODELS_DIR, BUNDLE_NETWORK_DIR, BUNDLE_WHEELS_DIR,
                                     KERNEL_SCRIPT, MODEL_FILE, PACKAGE_DIR, UNIT_FILE)
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.engine.config import ResolvedConfig


KERNEL_TEXT = '''"""A code competition's kernel: a kp bundle's models on the competition's test images, offline."""
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

KAGGLE = Path(os.environ.get("KP_KAGGLE_ROOT", "/kaggle"))  # a local sandbox gives its own root
BUNDLE = Path(globals().get("__file__", ".")).resolve().parent  # run from the bundle itself,
if not (BUNDLE / "bundle.json").is_file():  # or pushed as a kernel, the bundle attached as its dataset
    BUNDLE = KAGGLE / "input" / "@DATASET@"
WHEELS = BUNDLE / "wheels"
if WHEELS.is_dir() and importlib.util.find_spec("pipeline") is None:  # no network: install from the bundle,
    # keeping the TensorFlow an image already has (Kaggle's), else TensorFlow for the CPU from the bundle too
    project = "kaggle-pipeline" if importlib.util.find_spec("tensorflow") else "kaggle-pipeline[cpu]"
    into = []
    if not os.access(sysconfig.get_paths()["purelib"], os.W_OK):  # a read-only image (a sandbox): beside it
        into = ["--target", tempfile.mkdtemp(prefix="kp-site-")]
        sys.path.insert(0, into[1])
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-cache-dir", "--find-links", str(WHEELS),
                    *into, project], check=True)
    importlib.invalidate_caches()

from pipeline.shipping.kernel import main  # noqa: E402

status = main([str(BUNDLE), "--input", os.environ.get("KP_COMPETITION_INPUT", str(KAGGLE / "input" / "@SLUG@")),
               "--out", os.environ.get("KP_KERNEL_OUTPUT", str(KAGGLE / "working"))])
if status:  # a notebook's cell must not call sys.exit(0)
    raise SystemExit(status)
'''


def kernel_script(config: ResolvedConfig) -> str:
    """The kernel's code for `config`'s competition and the dataset `kp kernel push` attaches the bundle as."""
    dataset, _ = config.section("kernel").names(config.comp)
    return KERNEL_TEXT.replace("@SLUG@", config.competition.slug).replace("@DATASET@", dataset)


def kernel_notebook(script: str) -> str:
    """The kernel's code as a Jupyter notebook of one code cell (`kernel.kind: notebook`)."""
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "source": script.splitlines(keepends=True)}
    return json.dumps({"cells": [cell], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                    "language": "python"}},
                       "nbformat": 4, "nbformat_minor": 5}, indent=1) + "\n"


def current_bundle(config: ResolvedConfig, source: str, wheels: str | None) -> tuple[Path, dict] | None:
    """The bundle already written for `source`'s current result (with wheels for `wheels`), or None."""
    from pipeline.core.cache import Manifest

    folder = config.work_dir / PACKAGE_DIR / BUNDLE_DIR
    manifest = Manifest.read(config.work_dir / source)
    if manifest is None or not (folder / BUNDLE_FILE).is_file():
        return None
    record = json.loads((folder / BUNDLE_FILE).read_text())
    has = (record.get("wheels") or {}).get("python")
    if record.get("source") != source or record["fingerprints"].get(source) != manifest.fingerprint or has != wheels:
        return None
    return folder, record


def packageable(config: ResolvedConfig) -> tuple[str, ...]:
    """The predicting stages whose models `kp package` ships (`Predicts.packaged`: their models read
    precompute's features; smooth of one of them, its test rows smoothed again in the kernel)."""
    from pipeline.engine.registry import predicting_stages

    return tuple(name for name in predicting_stages() if config.predicts(name).packaged)


def check_source(config: ResolvedConfig, source: str) -> None:
    """One clear error for a source stage whose models cannot be packaged yet."""
    shipped = packageable(config)
    if source not in shipped:
        raise PipelineError(f"kp package --source {source}: only {', '.join(shipped)} can be packaged so far "
                            "(their models read precompute's features; smooth of one of them)")


def _smoothing(config: ResolvedConfig, source: str) -> dict | None:
    """How the kernel smooths the test rows again: the k and weight the smooth run used (chosen on the
    validation rows when it tuned them), its metric and weighting; None for another source."""
    from pipeline.core.cache import Manifest

    if not config.predicts(source).smooths:
        return None
    metrics = Manifest.read(config.work_dir / source).metrics
    return {"k": int(metrics["k"]), "weight": float(metrics["weight"]), "metric": config.get("smooth.metric"),
            "distance_weighted": bool(config.get("smooth.distance_weighted"))}


def model_folders(config: ResolvedConfig, source: str) -> list[Path]:
    """The folders of the models `source`'s test probabilities average, each holding `model.keras`.

    Raises:
        PipelineError: the source is not packaged yet, has no current result, or lacks a model.
    """
    from pipeline.core.cache import Manifest
    from pipeline.core.runs import unit_store

    check_source(config, source)
    role = config.predicts(source)
    if role.source is not None:  # smooth: the models of the stage it smooths
        inner = role.source(config)
        modelled = [name for name in packageable(config) if config.predicts(name).source is None]
        if inner not in modelled:
            raise PipelineError(f"kp package: {source}'s source is {inner}; {source} can be packaged when it is "
                                f"one of {', '.join(modelled)}")
        return model_folders(config, inner)
    folder = (config.work_dir / source).resolve()
    manifest = Manifest.read(folder)
    if manifest is None:
        raise PipelineError(f"{config.work_dir / source}: no finished {source} run to package; run kp {source} first")
    if role.models is not None:
        kind, listed = role.models
        store = unit_store(config.work_dir, source, kind)
        folders = [store.path(run["key"]) for run in manifest.metrics[listed]]
    else:
        folders = [folder]
    for model in folders:
        if not (model / MODEL_FILE).is_file():
            raise PipelineError(f"{model}: no {MODEL_FILE}; run kp {source} --force to train it again")
    return folders


def _tta(config: ResolvedConfig, folders: list[Path]) -> dict | None:
    """The augmented test passes the models average over (the augment section's), or None."""
    from pipeline.core.cache import Manifest
    from pipeline.core.executor import read_record

    def record(folder: Path) -> dict:  # a unit's record, or a stage's own metrics (finetune, bnretrain)
        return read_record(folder) if (folder / UNIT_FILE).is_file() else Manifest.read(folder).metrics

    passes = {int(record(folder).get("tta_passes", 0) or 0) for folder in folders}
    if len(passes) != 1:
        raise PipelineError(f"the models use different numbers of test passes ({sorted(passes)}): cannot package them")
    count = passes.pop()
    if not count:
        return None
    return {"passes": count, "seed": config.get("augment.seed"), "transforms": config.get("augment.transforms")}


WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")


def project_source() -> Path:
    """The checkout the running `pipeline` package comes from (its `pyproject.toml`), to build its wheel."""
    import pipeline

    root = Path(pipeline.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise PipelineError(f"{root}: no pyproject.toml beside the installed pipeline package, so its wheel cannot be "
                            "built; install kp from its checkout (pip install -e .) to package wheels")
    return root


def _pip(*args: str, doing: str) -> None:
    """Run pip in this interpreter; a failure is one PipelineError with pip's own last error lines."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
        raise PipelineError(f"kp package --wheels: pip could not {doing}: {' '.join(lines[-2:])[:400]}")


def project_wheel(folder: Path) -> Path:
    """Build the project's wheel into `folder` from a clean copy of its sources (a checkout's `build/`
    may hold stale files); returns its path."""
    import tempfile

    source = project_source()
    with tempfile.TemporaryDirectory(prefix="kp-wheel-") as clean:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(source / name, Path(clean) / name)
        for package in ("pipeline", "stages"):
            shutil.copytree(source / package, Path(clean) / package, ignore=shutil.ignore_patterns("__pycache__"))
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), clean, doing="build the project's wheel")
    [wheel] = folder.glob("kaggle_pipeline-*.whl")
    return wheel


def write_wheels(folder: Path, python: str, say=print) -> dict:
    """The project's wheel and the wheels of its dependencies (TensorFlow for the CPU included) for
    CPython `python` on x86_64 Linux, as Kaggle runs kernels, into `folder`, for `pip install --no-index`.

    Returns:
        {"python", "files", "bytes"} of the wheels.
    """
    folder.mkdir()
    own = project_wheel(folder)
    say(f"downloading the wheels of {own.name}'s dependencies for Python {python}")
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    _pip("download", "-d", str(folder), "--only-binary=:all:", "--python-version", python, *platforms, f"{own}[cpu]",
         doing=f"get every dependency for Python {python}")
    files = sorted(folder.glob("*.whl"))
    return {"python": python, "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def package_store(config: ResolvedConfig):
    """`work/COMP/package/`: the bundle, kernel and output folders, each written whole (a temporary folder
    renamed into place) with a record of its files (`pipeline.core.ownership`: a folder a person added
    to or edited is not replaced)."""
    from pipeline.core.runs import RunStore

    return RunStore(config.work_dir / PACKAGE_DIR, record_files=True)


def package(config: ResolvedConfig, source: str, wheels: str | None = None, say=print,
            force: bool = False) -> tuple[Path, dict]:
    """Write the inference bundle of `source` to `work/COMP/package/bundle/` (replacing an older one kp
    wrote; a bundle folder kp did not make, or one a person added to or edited, is refused).

    Args:
        config: the competition's resolved config.
        source: the predicting stage whose test probabilities the kernel must reproduce.
        wheels: also bundle the wheels to install kp offline, for this CPython version ("3.11"); None: none.
        say: prints a line.
        force: replace the bundle folder whatever it holds.

    Returns:
        (the bundle's folder, its `bundle.json` record).
    """
    from pipeline.core.cache import Manifest
    from pipeline.core.ownership import check_replaceable
    from pipeline.core.runs import folder_size
    from pipeline.models.backbones import resolve_weights
    from pipeline.models.extractor import feature_size

    folders = model_folders(config, source)
    precompute = config.section("precompute").model_dump(mode="json")
    if precompute["backbone"] == "none":
        raise PipelineError("kp package: the models read pixels (precompute.backbone: none); only models on a "
                            "network's features can be packaged so far")
    if precompute["weights"] == "imagenet":
        raise PipelineError("kp package: precompute.weights is imagenet (Keras' download cache); a kernel has no "
                            "network, so give the weights as a file (precompute.weights: PATH)")
    store = package_store(config)
    check_replaceable(store.path(BUNDLE_DIR), "kp writes the bundle whole: move them out of it, or pass --force to "
                      "let kp delete them", force)
    with store.write(BUNDLE_DIR) as out:
        if precompute["weights"] != "none":
            path = Path(resolve_weights(precompute["weights"], config.root))  # a missing file: one clear error
            (out / BUNDLE_NETWORK_DIR).mkdir()
            shutil.copy2(path, out / BUNDLE_NETWORK_DIR / path.name)
            precompute["weights"] = f"{BUNDLE_NETWORK_DIR}/{path.name}"
        models = []
        for number, folder in enumerate(folders):
            target = out / BUNDLE_MODELS_DIR / f"{number:02d}"
            target.mkdir(parents=True)
            shutil.copy2(folder / MODEL_FILE, target / MODEL_FILE)
            if (folder / UNIT_FILE).is_file():
                shutil.copy2(folder / UNIT_FILE, target / UNIT_FILE)
            models.append({"folder": f"{BUNDLE_MODELS_DIR}/{number:02d}", "from": folder.name})
        manifest = Manifest.read(config.work_dir / source)
        record = {
            "comp": config.comp, "source": source, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "fingerprints": {source: manifest.fingerprint, **(manifest.reads or manifest.inputs.get("upstream", {}))},
            "validation": {"kind": manifest.metrics.get("validation", "holdout"),
                           "val_log_loss": manifest.metrics.get("val_log_loss")},
            "competition": config.competition.model_dump(mode="json"),
            "download": {key: config.get(f"download.{key}") for key in ("sample_submission", "test_dir", "test_file")},
            "renormalize": config.get("submit.renormalize"),
            "precompute": precompute, "image_size": list(feature_size(config)),
            "tta": _tta(config, folders), "smooth": _smoothing(config, source), "models": models,
        }
        (out / KERNEL_SCRIPT).write_text(kernel_script(config))
        record["wheels"] = write_wheels(out / BUNDLE_WHEELS_DIR, wheels, say) if wheels else None
        record["size_bytes"] = folder_size(out)
        (out / BUNDLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return store.path(BUNDLE_DIR), record
