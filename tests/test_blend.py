"""blend: several sources' out-of-fold predictions combined with weights chosen out of fold, each source a
variant of the competition (another feature set) sharing its run cache."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.engine.status import stage_statuses
from pipeline.evaluation.blending import choose, cross_fit, hill_climb, simplex_weights
from pipeline.evaluation.predictions import load_fold_test, load_predictions
from tests.test_cv import CV, _cross_validated

FEATURES = "features={wide: {image_size: [48, 48]}, mobile: {backbone: MobileNetV2, alpha: 0.35, image_size: [32, 32]}}"
SOURCES = "blend.sources=[{stage: cv}, {stage: cv, features: wide}]"
BLEND = [s.replace("cv, submit", "cv, blend, submit") for s in CV if not s.startswith("submit.source")] + [
    FEATURES, SOURCES, "submit.source=blend"]


def _noisy_sources(rng, n=600, k=3):
    labels = rng.integers(0, k, n)
    truth = np.eye(k)[labels]

    def source(noise):
        logits = 2.0 * truth + rng.normal(0, noise, (n, k))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return labels, np.stack([source(1.0), source(1.0), source(6.0)])


def test_weights_and_hill_climbing_beat_each_source_and_ignore_the_noise():
    labels, probs = _noisy_sources(np.random.default_rng(0))
    losses = [sk_log_loss(labels, p) for p in probs]
    for weights in (simplex_weights(probs, labels), hill_climb(probs, labels, 100)):
        assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
        assert weights[2] < 0.2 < min(weights[:2])  # the noisy source gets little, the two good ones share
        blended = np.tensordot(weights, probs, axes=1)
        assert sk_log_loss(labels, blended) < min(losses) - 0.01  # two independent errors average out
    stacked = choose("stack", probs, labels).apply(probs)
    np.testing.assert_allclose(stacked.sum(axis=1), 1.0, rtol=1e-6)
    assert sk_log_loss(labels, stacked) < min(losses)


def test_cross_fitting_blends_each_fold_without_its_own_labels():
    rng = np.random.default_rng(1)
    labels, probs = _noisy_sources(rng)
    folds = np.arange(len(labels)) % 4
    for method in ("weights", "hill_climb", "stack"):
        blended, blenders = cross_fit(method, probs, labels, folds)
        assert sorted(blenders) == [0, 1, 2, 3]
        changed = labels.copy()
        changed[folds == 2] = rng.integers(0, 3, (folds == 2).sum())  # fold 2's labels never reach fold 2's blend
        again, _ = cross_fit(method, probs, changed, folds)
        np.testing.assert_allclose(again[folds == 2], blended[folds == 2], rtol=1e-6, atol=1e-9)
        assert not np.allclose(again[folds != 2], blended[folds != 2])  # they do reach the other folds'


def _blended(root):
    runner.run(load_config("synth", sets=BLEND))


@pytest.fixture
def blend_run(warm_project):
    """The synthetic competition's cv blended with cv on a second feature set (once per session, copied per test)."""
    warm_project("blend", _blended, base=("cv", _cross_validated))
    return load_config("synth", sets=BLEND)


def test_blend_of_two_feature_sets_cross_fits_on_the_split_folds(blend_run):
    work = blend_run.work_dir
    m = Manifest.read(work / "blend").metrics
    assert set(m["sources"]) == {"base-cv", "wide-cv"} and m["validation"] == "cv4-oof"
    assert sum(m["weights"].values()) == pytest.approx(1.0, abs=1e-3) and m["cross_fitting_folds"] == 4
    # the base source is the competition's own cv run (one stored run, not a second one)
    assert os.readlink(work / "_variants" / "base-cv" / "cv") == os.readlink(work / "cv")
    wide = work / "_variants" / "wide-cv"
    assert os.readlink(wide / "cv") != os.readlink(work / "cv")
    assert json.loads((wide / "precompute" / "meta.json").read_text())["input_size"] == [48, 48]
    assert os.readlink(wide / "download") == os.readlink(work / "download")  # shared, never extracted twice
    # the reported rows are blended with weights chosen on the other folds, recomputed here
    import pandas as pd

    split = pd.read_csv(work / "split" / "split.csv", dtype={"id": str})
    sources = [load_predictions(work / "cv"), load_predictions(wide / "cv")]
    probs = np.stack([s.valid_probs for s in sources]).astype(np.float64)
    folds = split.set_index("id").loc[sources[0].valid_ids, "fold"].to_numpy()
    expected, blenders = cross_fit("weights", probs, sources[0].valid_labels, folds)
    blend = load_predictions(work / "blend")
    assert blend.valid_ids == sources[0].valid_ids
    np.testing.assert_allclose(blend.valid_probs, expected, rtol=1e-4, atol=1e-6)
    assert m["val_log_loss"] == pytest.approx(sk_log_loss(blend.valid_labels, expected, labels=[0, 1, 2]), abs=1e-4)
    fold_test = load_fold_test(work / "blend", len(blend.test_ids), 4)
    source_folds = np.stack([load_fold_test(work / "cv", len(blend.test_ids)), load_fold_test(wide / "cv", len(blend.test_ids))])
    np.testing.assert_allclose(fold_test[1], blenders[1].apply(source_folds[:, 1].astype(np.float64)), rtol=1e-4, atol=1e-6)
    submission = json.loads((work / "submit" / "submission.json").read_text())
    assert submission["source"] == "blend" and submission["validation"] == "cv4-oof"
    from pipeline.experiments.report import build_report

    html = build_report(blend_run).read_text()
    table = html[html.index("blend source"):html.index("the blend (cross-fitted)")]
    assert "base-cv" in table and "wide-cv" in table and f"{m['sources']['wide-cv']['val_log_loss']:.4f}" in table


@pytest.mark.slow  # 16 s (2026-12-06): a third network's features and folds; the fast tier keeps the two-source blend
def test_a_third_source_computes_only_its_own_and_a_source_change_makes_the_blend_stale(blend_run):
    work = blend_run.work_dir
    before = {name: Manifest.read(work / "_variants" / name / "cv").finished for name in ("base-cv", "wide-cv")}
    three = [s if not s.startswith("blend.sources") else
             "blend.sources=[{stage: cv}, {stage: cv, features: wide}, {stage: cv, features: mobile}]" for s in BLEND]
    assert {s.name: s.state for s in stage_statuses(load_config("synth", sets=three))}["blend"] != "up to date"
    runner.run(load_config("synth", sets=three))
    after = {name: Manifest.read(work / "_variants" / name / "cv").finished for name in ("base-cv", "wide-cv")}
    assert after == before  # neither retrained
    assert set(Manifest.read(work / "blend").metrics["sources"]) == {"base-cv", "wide-cv", "mobile-cv"}
    assert len([p for p in (work / "_runs" / "precompute").iterdir() if p.is_dir()]) == 3
    changed = {s.name: s for s in stage_statuses(load_config("synth", sets=three + ["cv.seed=1"]))}
    assert changed["blend"].state != "up to date" and changed["cv"].state != "up to date"


def test_blend_refuses_an_unknown_feature_set_and_a_single_source(project):
    from tests.helpers import make_statefarm_like, statefarm_like_config

    archive = make_statefarm_like(project.parent / "data", drivers=4, classes=3, per_driver_class=2, test=2)
    statefarm_like_config(project, archive)
    unknown = [s if not s.startswith("blend.sources") else "blend.sources=[{stage: cv}, {stage: cv, features: wider}]"
               for s in BLEND]
    with pytest.raises(PipelineError, match=r"blend.sources\[1\].features: no feature set 'wider'.*declared: wide, mobile"):
        stage_statuses(load_config("synth", sets=unknown))
    single = [s if not s.startswith("blend.sources") else "blend.sources=[{stage: cv}]" for s in BLEND]
    with pytest.raises(PipelineError, match="at least two"):
        stage_statuses(load_config("synth", sets=single))
    resplit = [s if not s.startswith("blend.sources") else "blend.sources=[{stage: cv}, {stage: cv, set: {split.seed: 1}, name: other}]"
               for s in BLEND]
    with pytest.raises(PipelineError, match=r"blend.sources\[1\].set: 'split.seed': every source shares"):
        stage_statuses(load_config("synth", sets=resplit))


def test_a_blend_teaches_each_folds_student_with_its_own_folds_blend(blend_run):
    from pipeline.training.pseudo import Teaching

    work = blend_run.work_dir
    taught = [s.replace("cv, blend, submit", "cv, blend, pseudo, submit") for s in BLEND] + ["pseudo.source=blend"]
    runner.run(load_config("synth", sets=taught))
    m = Manifest.read(work / "pseudo").metrics
    assert m["source"] == "blend" and m["validation"] == "cv4-oof" and m["recipe"] == "finetune"
    teachers = load_fold_test(work / "blend", 6, 4)
    for row in m["students"]:
        record = json.loads((work / "_runs" / "pseudo-students" / row["key"] / "unit.json").read_text())
        assert record["taught"] == Teaching(teachers[row["fold"] - 1], np.ones(6, bool), 0.25).digest()
    assert m["teacher_val_log_loss"] == Manifest.read(work / "blend").metrics["val_log_loss"]


def _tree(folder):
    """Every path under `folder` (links not followed) with what it is: a link's target, a file's size and mtime."""
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else
            (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder" for p in folder.rglob("*")}


def test_kp_status_writes_nothing_for_a_blend(blend_run, tmp_path):
    """`kp status` only reads: no variant folder, link, lock or memo appears, on a run blend or a fresh one."""
    from click.testing import CliRunner

    from pipeline.cli.commands import cli

    work = blend_run.work_dir
    sets = [arg for s in BLEND for arg in ("--set", s)]
    before = _tree(work.parent)
    result = CliRunner().invoke(cli, ["status", "--comp", "synth", *sets], catch_exceptions=False)
    assert result.exit_code == 0 and "blend" in result.output
    assert _tree(work.parent) == before
    for stamp in ("mtime", "content"):  # content stamps hash the input files: status keeps no memo of them
        fresh = tmp_path / f"fresh-work-{stamp}"
        result = CliRunner().invoke(cli, ["status", "--comp", "synth", *sets, "--set", f"paths.work={fresh}",
                                          "--set", f"cache.stamp={stamp}"], catch_exceptions=False)
        assert result.exit_code == 0 and "never run" in result.output and not fresh.exists()
    content = CliRunner().invoke(cli, ["status", "--comp", "synth", *sets, "--set", "cache.stamp=content"],
                                 catch_exceptions=False)
    assert content.exit_code == 0 and _tree(work.parent) == before


def test_kp_status_of_the_dogscats_blend_writes_nothing(project):
    from click.testing import CliRunner

    from pipeline.cli.commands import cli
    from tests.helpers import COMPETITIONS

    archive = COMPETITIONS / "dogs-vs-cats-redux-kernels-edition" / "dogs-vs-cats-redux-kernels-edition.zip"
    if not archive.is_file():
        pytest.skip(f"{archive}: the shared data is not here")
    weights = archive.parents[2] / "weights"
    sets = ["download.source=" + str(archive), "precompute.weights=" + str(weights / "efficientnet_lite2_imagenet_notop.keras")]
    for name, file in (("lite1", "efficientnet_lite1_imagenet_notop.keras"), ("lite0", "efficientnet_lite0_imagenet_notop.keras"),
                       ("mobilenetv2", "mobilenet_v2_1.0_224_no_top.h5")):
        sets.append(f"features.{name}.weights={weights / file}")
    before = _tree(project)
    result = CliRunner().invoke(cli, ["status", "--comp", "dogscats", "--config", "configs/offline/dogscats.yaml",
                                      "--config", "configs/offline/dogscats-blend.yaml",
                                      *[arg for s in sets for arg in ("--set", s)]], catch_exceptions=False)
    assert result.exit_code == 0 and "blend" in result.output, result.output
    assert _tree(project) == before


def test_a_packaged_blend_runs_each_sources_network_and_models_then_its_stacked_model(blend_run, tmp_path):
    """A stacked blend (a logistic regression on the sources' log-probabilities) as the kernel runs it: each
    source's network and fold models, then the stack's fitted coefficients from `blender.json`."""
    from pipeline.experiments.report import build_report
    from tests.test_package import kernel_reproduces

    sets = BLEND + ["blend.method=stack"]
    runner.run(load_config("synth", sets=sets))
    record = kernel_reproduces(sets, "blend", tmp_path)
    plan = record["predict"]
    chosen = json.loads((blend_run.work_dir / "blend" / "blender.json").read_text())
    assert plan["weighting"] == chosen and chosen["sources"] == ["base-cv", "wide-cv"] and "stack" in chosen
    assert [source["name"] for source in plan["of"]] == ["base-cv", "wide-cv"]
    assert [source["network"]["image_size"] for source in plan["of"]] == [[32, 32], [48, 48]]
    assert len(record["models"]) == 8 and {m["stage"] for m in record["models"]} == {"cv"}  # 4 fold models per source
    assert set(record["timing"]["images_per_s"]) == {"features vgg16", "cv's models"}
    html = build_report(load_config("synth", sets=sets)).read_text()
    assert '<h2 id="kernel">Kernel: blend, packaged' in html and "Estimate for 6 hidden test images" in html


def test_a_source_the_blend_weighs_zero_is_left_out_of_the_kernel(blend_run, tmp_path):
    from tests.test_package import kernel_reproduces

    sets = BLEND + ["blend.method=hill_climb", "blend.rounds=1"]  # one pick: the best source alone
    runner.run(load_config("synth", sets=sets))
    chosen = json.loads((blend_run.work_dir / "blend" / "blender.json").read_text())
    assert sorted(chosen["weights"]) == [0.0, 1.0]
    record = kernel_reproduces(sets, "blend", tmp_path)
    kept = chosen["sources"][chosen["weights"].index(1.0)]
    plan = record["predict"]
    assert [source["name"] for source in plan["of"]] == [kept] and plan["weighting"]["weights"] == [1.0]
    assert plan["weighting"]["left_out"] == [name for name in chosen["sources"] if name != kept]
    assert len(record["models"]) == 4  # the left-out source's 4 fold models are not in the bundle
