"""`kp package`: the trained models a submission comes from, bundled with what runs them again on other
test images offline, as a code competition's kernel must (no training, no network).

The bundle (`work/COMP/package/`) holds every model the source stage's test probabilities come from
(the one model of finetune, bnretrain or tune, each member of an ensemble, each fold model of cv,
each student of pseudo; for a blend, those of every source), each network's weights file once
(a Keras weights file, a whole saved model, or `weights: imagenet` saved from Keras' cache), the
prediction plan (`prediction_plan`: which models average over which test passes of which network's
features, smoothed how, blended with which weights), the competition's submission format, and
`kernel.py`, which runs `pipeline.shipping.kernel`. `bundle.json` records the plan, the fingerprints
of the source and the runs it read, the kernel's time measured here on the public test with the
estimate at the hidden test's size (`pipeline.shipping.kernel_time`), and the bundle's size. It is
written to a temporary folder renamed into place.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.artifacts import (BLENDER_FILE, BUNDLE_DIR, BUNDLE_FILE, BUNDLE_MODELS_DIR, BUNDLE_NETWORK_DIR, BUNDLE_WHEELS_DIR,
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


def check_source(config: ResolvedConfig, source: str) -> None:
    """One clear error for a source that is not a predicting stage (`kp package` ships every one)."""
    from pipeline.engine.registry import predicting_stages

    shipped = predicting_stages()
    if source not in shipped:
        raise PipelineError(f"kp package --source {source}: not a predicting stage; one of {', '.join(shipped)}")


def _smoothing(metrics: dict, config: ResolvedConfig, prefix: str = "") -> dict:
    """How the kernel smooths the test rows again: the k and weight a run used (`metrics`, its manifest's:
    chosen on the validation rows when it tuned them; `prefix` `smooth_` for a stage that smoothed its own
    models' rows, pseudo with `pseudo.smooth`), the smooth section's metric and weighting."""
    return {"k": int(metrics[f"{prefix}k"]), "weight": float(metrics[f"{prefix}weight"]),
            "metric": config.get("smooth.metric"), "distance_weighted": bool(config.get("smooth.distance_weighted"))}


def _finished(config: ResolvedConfig, stage: str):
    """The manifest of `stage`'s current result under `config` (a blend source's under its variant)."""
    from pipeline.core.cache import Manifest

    manifest = Manifest.read(config.work_dir / stage)
    if manifest is None:
        raise PipelineError(f"{config.work_dir / stage}: no finished {stage} run to package; run kp {stage} first")
    return manifest


def model_folders(config: ResolvedConfig, source: str) -> list[Path]:
    """The folders of the models whose mean is `source`'s test probabilities, each holding `model.keras`
    (for smooth, its source's models; not for a stage that combines variants, see `prediction_plan`).

    Raises:
        PipelineError: no current result, or a model missing.
    """
    from pipeline.core.runs import unit_store

    role = config.predicts(source)
    if role.smooths:
        return model_folders(config, role.source(config))
    folder = (config.work_dir / source).resolve()
    manifest = _finished(config, source)
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


class _Writer:
    """Copies what the kernel needs into the bundle folder `out` once each: every network file (shared by
    the sources on the same network), every model (numbered in order)."""

    def __init__(self, out: Path):
        self.out, self.networks, self.models = out, {}, []

    def network(self, config: ResolvedConfig, weights: bool = True) -> dict:
        """precompute's settings as the kernel builds its network (`weights` a file of the bundle), and its
        image size; `weights` False: the settings only (a fine-tuned network holds its backbone's weights)."""
        from pipeline.models.backbones import resolve_weights
        from pipeline.models.extractor import feature_size

        settings = config.section("precompute").model_dump(mode="json")
        if settings["backbone"] == "none":
            raise PipelineError("kp package: the models read pixels from scratch (precompute.backbone: none); a "
                                "kernel runs models on a network's features or a fine-tuned network")
        size = list(feature_size(config))
        if weights and settings["weights"] != "none":
            path = resolve_weights(settings["weights"], config.root)  # a missing file: one clear error
            key = path if path != "imagenet" else f"imagenet {settings['backbone']} {settings['alpha']}"
            if key not in self.networks:  # network/NN/FILE: each file under its own name
                folder = self.out / BUNDLE_NETWORK_DIR / f"{len(self.networks):02d}"
                folder.mkdir(parents=True)
                if path == "imagenet":
                    name = imagenet_weights(settings, size, folder)
                else:
                    name = Path(path).name
                    shutil.copy2(path, folder / name)
                self.networks[key] = str((folder / name).relative_to(self.out))
            settings["weights"] = self.networks[key]
        return {"precompute": settings, "image_size": size}

    def model(self, folder: Path, stage: str) -> str:
        number = len(self.models)
        target = self.out / BUNDLE_MODELS_DIR / f"{number:02d}"
        target.mkdir(parents=True)
        shutil.copy2(folder / MODEL_FILE, target / MODEL_FILE)
        if (folder / UNIT_FILE).is_file():
            shutil.copy2(folder / UNIT_FILE, target / UNIT_FILE)
        self.models.append({"folder": f"{BUNDLE_MODELS_DIR}/{number:02d}", "from": folder.name, "stage": stage})
        return self.models[-1]["folder"]


def imagenet_weights(settings: dict, size: list[int], folder: Path) -> str:
    """`weights: imagenet`: the network built from Keras' cache of its ImageNet weights (as precompute built
    it; no network is reached when the file is there), its weights saved into `folder`; returns the
    file's name. A KerasHub preset is refused: give it as a folder (precompute.backbone: hub:PATH)."""
    import keras

    from pipeline.models.applications import application
    from pipeline.models.hub import hub_preset

    if hub_preset(settings["backbone"]) is not None:
        raise PipelineError(f"kp package: precompute.backbone {settings['backbone']} with weights imagenet: a kernel "
                            "has no network; give the preset as a local folder (hub:PATH)")
    app = application(settings["backbone"])
    options = {"include_top": False, "weights": "imagenet"}
    if app.alpha:
        options["alpha"] = settings["alpha"]
    options["input_shape"] = (*size, 3)  # the size picks the weights file of some networks (MobileNet's rows)
    try:
        model = getattr(keras.applications, app.name)(**options)
    except Exception as exc:  # offline and not in the cache: Keras' download fails
        raise PipelineError(f"kp package: precompute.weights imagenet: {app.name}'s ImageNet weights are not in "
                            f"Keras' cache ($KERAS_HOME/models, ~/.keras/models) and cannot be downloaded "
                            f"({type(exc).__name__}); run precompute once with a network, or set precompute.weights "
                            "to the weights file") from None
    name = f"{app.name.lower()}-imagenet.weights.h5"
    model.save_weights(folder / name)
    return name


def prediction_plan(config: ResolvedConfig, stage: str, writer: _Writer) -> dict:
    """How the kernel computes `stage`'s test probabilities, its files copied by `writer`: a tree of
    {"stage", "weighting": what blend chose, "of": [plans]} (each source's plan under its variant's config;
    a source whose weight is 0 is left out, its network never run: the blend is the same),
    {"stage", "neighbours": k, weight, metric and the network whose features find them, "of": plan},
    or a leaf {"stage", "network", "reads", "tta", "models"}: the mean of the models over the test passes."""
    from pipeline.engine.registry import all_stages
    from pipeline.engine.variants import variant_configs

    definition, role = all_stages()[stage], config.predicts(stage)
    if definition.variants is not None:
        _finished(config, stage)
        chosen = config.work_dir / stage / BLENDER_FILE
        if not chosen.is_file():
            raise PipelineError(f"{chosen}: missing (a {stage} run from before kp kept it); run kp {stage} --force")
        blender = json.loads(chosen.read_text())
        variants = variant_configs(config, definition)
        if [variant.name for variant, _ in variants] != blender["sources"]:
            raise PipelineError(f"{chosen}: its sources {blender['sources']} are not the configured ones; "
                                f"run kp {stage}")
        used = [i for i, weight in enumerate(blender["weights"]) if weight > 0 or "stack" in blender]
        if len(used) < len(variants):  # a source the weights leave out costs the kernel its network, not a digit
            blender = {**blender, "sources": [blender["sources"][i] for i in used],
                       "weights": [blender["weights"][i] for i in used], "left_out": [
                           name for i, name in enumerate(blender["sources"]) if i not in used]}
        return {"stage": stage, "weighting": blender,
                "of": [{"name": variants[i][0].name, **prediction_plan(variants[i][1], variants[i][0].target, writer)}
                       for i in used]}
    metrics = _finished(config, stage).metrics
    if role.smooths:
        return {"stage": stage, "neighbours": {**_smoothing(metrics, config), "network": writer.network(config)},
                "of": prediction_plan(config, role.source(config), writer)}
    folders, reads = model_folders(config, stage), _reads(config, stage)
    leaf = {"stage": stage, "network": writer.network(config, weights=reads == "features"), "reads": reads,
            "tta": _tta(config, folders), "models": [writer.model(folder, stage) for folder in folders]}
    if "smooth_k" in metrics:  # the stage smoothed its own models' rows (pseudo.smooth)
        return {"stage": stage, "neighbours": {**_smoothing(metrics, config, "smooth_"), "network": leaf["network"]},
                "of": leaf}
    return leaf


def _reads(config: ResolvedConfig, stage: str) -> str:
    """What `stage`'s models take (`Recipe.takes` of its recipe's last step): `features` (precompute's rows) or
    `images` (a fine-tuned network, backbone included). A student of pseudo follows a teachable recipe,
    which takes features."""
    from pipeline.training.recipes import steps_of

    follows = config.predicts(stage).recipe
    return "features" if follows is None else steps_of(follows(config), config)[-1].takes


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
    wrote; a bundle folder kp did not make, or one a person added to or edited, is refused), then time
    its kernel here on the public test images (`pipeline.shipping.kernel_time`).

    Args:
        config: the competition's resolved config.
        source: the predicting stage whose test probabilities the kernel must reproduce.
        wheels: also bundle the wheels to install kp offline, for this CPython version ("3.11"); None: none.
        say: prints a line.
        force: replace the bundle folder whatever it holds.

    Returns:
        (the bundle's folder, its `bundle.json` record).
    """
    from pipeline.core.ownership import check_replaceable
    from pipeline.core.runs import folder_size
    from pipeline.shipping.kernel_time import time_kernel

    check_source(config, source)
    store = package_store(config)
    check_replaceable(store.path(BUNDLE_DIR), "kp writes the bundle whole: move them out of it, or pass --force to "
                      "let kp delete them", force)
    with store.write(BUNDLE_DIR) as out:
        writer = _Writer(out)
        plan = prediction_plan(config, source, writer)
        manifest = _finished(config, source)
        record = {
            "comp": config.comp, "source": source, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "fingerprints": {source: manifest.fingerprint, **(manifest.reads or manifest.inputs.get("upstream", {}))},
            "validation": {"kind": manifest.metrics.get("validation", "holdout"),
                           "val_log_loss": manifest.metrics.get("val_log_loss")},
            "competition": config.competition.model_dump(mode="json"),
            "download": {key: config.get(f"download.{key}") for key in ("sample_submission", "test_dir", "test_file")},
            "renormalize": config.get("submit.renormalize"),
            "predict": plan, "models": writer.models, "networks": sorted(writer.networks.values()),
        }
        (out / KERNEL_SCRIPT).write_text(kernel_script(config))
        (out / BUNDLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        record["timing"] = time_kernel(config, out, say)
        record["wheels"] = write_wheels(out / BUNDLE_WHEELS_DIR, wheels, say) if wheels else None
        record["size_bytes"] = folder_size(out)
        (out / BUNDLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return store.path(BUNDLE_DIR), record
