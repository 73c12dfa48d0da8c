"""Any keras.applications network by name: the committed table equals what Keras gives, a few per
preprocessing family build at a small size with the documented feature width, a whole saved model
serves as the backbone, and names are checked when the config loads."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.core.errors import PipelineError
from pipeline.models.applications import applications, derive_applications
from pipeline.models.backbones import build_feature_model
from tests.helpers import SHARED_DATA, make_statefarm_like, needs_shared_data, statefarm_like_config


def test_the_committed_table_is_what_the_installed_keras_gives():
    derived = {row.name: row for row in derive_applications(widths=False)}
    committed = applications()
    assert sorted(derived) == sorted(committed) and len(committed) >= 40
    for name, row in committed.items():
        assert (row.module, row.preprocessing, row.default_size, row.min_size, row.alpha) == (
            derived[name].module, derived[name].preprocessing, derived[name].default_size, derived[name].min_size,
            derived[name].alpha), name
    assert committed["Xception"].default_size == 299 and committed["EfficientNetB7"].default_size == 600
    assert {committed[n].preprocessing for n in ("EfficientNetV2B0", "ConvNeXtTiny", "MobileNetV3Small")} == {"none"}
    assert (committed["VGG16"].preprocessing, committed["DenseNet121"].preprocessing,
            committed["ResNet50V2"].preprocessing) == ("caffe", "torch", "tf")


@pytest.mark.parametrize("name", ["VGG16", "resnet50v2", "DenseNet121", "EfficientNetV2B0", "MobileNetV3Small"])
def test_one_network_per_preprocessing_builds_with_its_documented_width(name):
    row = applications()[next(n for n in applications() if n.lower() == name.lower())]
    size = max(row.min_size, 32)
    features = build_feature_model(name, None, (size, size, 3), "pool")
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    prepared = features.preprocess(images) if features.preprocess else images
    out = np.asarray(features.model(prepared))
    assert out.shape[-1] == row.width and np.isfinite(out).all()
    assert (features.preprocess is None) == (row.preprocessing == "none")


def test_a_saved_model_is_a_backbone_with_the_preprocessing_the_config_declares(tmp_path):
    import keras

    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(6, 3, strides=2)(keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    keras.Model(inputs, conv).save(tmp_path / "mine.keras")
    features = build_feature_model("file", str(tmp_path / "mine.keras"), (24, 32, 3), "pool", preprocess="none")
    assert features.preprocess is None and tuple(features.model.output.shape) == (None, 6)
    images = np.random.default_rng(1).uniform(0, 255, (3, 24, 32, 3)).astype("float32")
    saved = keras.models.load_model(tmp_path / "mine.keras")
    np.testing.assert_allclose(np.asarray(features.model(images)), np.asarray(saved(images)).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)  # the same network and weights, pooled
    with pytest.raises(PipelineError, match="backbone file: say how its images are prepared"):
        build_feature_model("file", str(tmp_path / "mine.keras"), (24, 32, 3), "pool")


@needs_shared_data
@pytest.mark.parametrize("backbone, file, alpha", [
    ("file", "efficientnet_lite0_imagenet_notop.keras", 1.0), ("file", "efficientnet_lite1_imagenet_notop.keras", 1.0),
    ("file", "efficientnet_lite2_imagenet_notop.keras", 1.0), ("MobileNetV2", "mobilenet_v2_1.0_224_no_top.h5", 1.0),
])
def test_the_real_weights_files_load_as_backbones(backbone, file, alpha):
    weights = SHARED_DATA / "weights" / file
    features = build_feature_model(backbone, str(weights), (64, 64, 3), "pool", alpha,
                                   preprocess="none" if backbone == "file" else "backbone")
    assert tuple(features.model.output.shape) == (None, 1280)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    out = np.asarray(features.model(features.preprocess(images) if features.preprocess else images))
    assert np.isfinite(out).all() and out.std() > 0


def test_a_backbone_name_is_checked_when_the_config_loads(project):
    result = CliRunner().invoke(cli, ["status", "--comp", "dogscats", "--set", "precompute.backbone=EfficientNetV2B9"])
    assert result.exit_code == 2 and "precompute.backbone 'EfficientNetV2B9': not a keras.applications network " \
        "(did you mean" in result.output, result.output
    assert CliRunner().invoke(cli, ["status", "--comp", "dogscats", "--set",
                                    "precompute.backbone=efficientnetv2b0"]).exit_code == 0


def test_kp_backbones_lists_every_network_with_its_size_and_width():
    result = CliRunner().invoke(cli, ["backbones"])
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if line.startswith("Xception "))
    assert line.split() == ["Xception", "tf", "299", "71", "2,048"]


def test_a_modern_backbone_runs_the_pipeline_end_to_end(project, tmp_path):
    statefarm_like_config(project, make_statefarm_like(tmp_path / "data"))
    sets = ["--set", "stages=[download, split, precompute, finetune, submit]", "--set", "submit.source=finetune",
            "--set", "precompute.backbone=EfficientNetV2B0", "--set", "precompute.weights=none",
            "--set", "competition.image_size=[32, 32]", "--set", "finetune.phases=[{epochs: 1, lr: 0.001}]"]
    result = CliRunner().invoke(cli, ["all", "--comp", "synth", *sets])
    assert result.exit_code == 0, result.output
    features = np.load(project / "work" / "synth" / "precompute" / "train.npy")
    assert features.shape[1:] == (1280,) and np.isfinite(features).all()


def test_imagenet_weights_without_a_network_is_one_line_naming_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens: as offline as a test can be
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(PipelineError, match=r"precompute.weights imagenet: Keras could not download MobileNetV3Small's "
                                            r"ImageNet weights .*weights_mobilenet_v3_small.*put it in \$KERAS_HOME/models"):
        build_feature_model("MobileNetV3Small", "imagenet", (224, 224, 3), "pool")


def _tiny_hub_preset(folder):
    """A small KerasHub ResNet saved as a preset folder (config.json, model.weights.h5, image_converter.json)."""
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16], stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2], block_type="basic_block", use_pre_activation=False, image_shape=(None, None, 3))
    backbone.save_to_preset(str(folder))
    keras_hub.layers.ResNetImageConverter(image_size=(48, 48), scale=1 / 255.0).save_to_preset(str(folder))
    return backbone


def test_a_saved_kerashub_preset_is_a_backbone_offline(project, tmp_path):
    """backbone: hub:FOLDER: the preset's backbone behind its own image converter, precomputed end to end."""
    import keras

    preset = tmp_path / "tiny_resnet"
    saved = _tiny_hub_preset(preset)
    statefarm_like_config(project, make_statefarm_like(tmp_path / "data"))
    sets = ["--set", "stages=[download, split, precompute, finetune, submit]", "--set", "submit.source=finetune",
            "--set", f"precompute.backbone=hub:{preset}", "--set", "competition.image_size=[40, 40]",
            "--set", "finetune.phases=[{epochs: 1, lr: 0.001}]"]
    result = CliRunner().invoke(cli, ["all", "--comp", "synth", *sets])
    assert result.exit_code == 0, result.output
    work = project / "work" / "synth"
    features = np.load(work / "precompute" / "train.npy").astype(np.float32)
    assert features.shape[1:] == (16,) and np.isfinite(features).all()
    # the features are the preset's: its converter (resize to 48x48, x / 255) and its trained weights, pooled
    from pipeline.data.images import checked_batches
    from pipeline.data.index import read_index

    index = read_index(work / "download" / "index.csv")
    first = next(iter(checked_batches([work / "download" / "raw" / index[index.subset == "train"].path.iloc[0]],
                                      (40, 40), 1)))
    resized = keras.ops.image.resize(np.asarray(first, np.float32), (48, 48)) / 255.0
    expected = np.asarray(keras.ops.mean(saved(resized), axis=(1, 2)))
    np.testing.assert_allclose(features[0], expected[0], rtol=0.02, atol=1e-3)  # stored as float16
    assert "hub_tiny_resnet" in (work / "precompute" / "meta.json").read_text()


def test_a_kerashub_preset_name_offline_says_how_to_bring_it(tmp_path):
    from pipeline.models.hub import hub_feature_model

    with pytest.raises(PipelineError, match=r"hub:resnet_50_imagenet: downloading a preset by name needs .*save the "
                                            r"preset to a folder"):
        hub_feature_model("resnet_50_imagenet", tmp_path, (64, 64, 3), "pool", random_weights=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="has no config.json"):
        hub_feature_model(str(tmp_path / "empty"), tmp_path, (64, 64, 3), "pool", random_weights=False)
