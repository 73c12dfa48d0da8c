"""Config merge order, --set parsing, and the one-line errors for every kind of bad config."""
from __future__ import annotations

import re

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.engine.config import config_model, load_config
from tests.helpers import REPO, write_config


def test_layers_merge_in_order_defaults_comp_overlay_set(project, tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("split:\n  fraction: 0.3\n  seed: 7\n")
    config = load_config("digits", extra_files=[overlay], sets=["split.seed=11"])
    assert config.get("split.strategy") == "random"          # digits.yaml
    assert config.get("split.folds") == 5                    # defaults.yaml
    assert config.get("split.fraction") == 0.3               # overlay
    assert config.get("split.seed") == 11                    # --set, last
    assert config.provenance["split.fraction"] == str(overlay)
    assert config.provenance["split.seed"] == "--set split.seed=11"
    assert config.provenance["split.folds"] == "configs/defaults.yaml"
    assert config.provenance["download.source"] == "configs/digits.yaml"


def test_an_overlay_can_extend_another_which_merges_first(project, tmp_path):
    (tmp_path / "base.yaml").write_text("split:\n  fraction: 0.3\n  seed: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nsplit:\n  seed: 8\n")
    config = load_config("digits", extra_files=[tmp_path / "child.yaml"])
    assert (config.get("split.fraction"), config.get("split.seed")) == (0.3, 8)
    assert config.provenance["split.fraction"] == str(tmp_path / "base.yaml")
    assert config.provenance["split.seed"] == str(tmp_path / "child.yaml")
    (tmp_path / "base.yaml").write_text("extends: child.yaml\n")
    with pytest.raises(PipelineError, match="extends:` loops back"):
        load_config("digits", extra_files=[tmp_path / "child.yaml"])
    (tmp_path / "child.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(PipelineError, match=r"child.yaml: extends: nowhere.yaml: no such file"):
        load_config("digits", extra_files=[tmp_path / "child.yaml"])
    kaggle = load_config("statefarm", root=REPO, extra_files=[REPO / "configs/offline/statefarm-kaggle.yaml"])
    offline = load_config("statefarm", root=REPO, extra_files=[REPO / "configs/offline/statefarm.yaml"])
    assert kaggle.get("download.source") == "kaggle"
    assert kaggle.get("precompute") == offline.get("precompute") and kaggle.get("model") == offline.get("model")


def test_set_values_are_yaml(project):
    config = load_config("digits", sets=["competition.image_size=[28, 28]", "split.strategy=kfold"])
    assert config.competition.image_size == (28, 28)
    assert config.get("split.strategy") == "kfold"


def test_every_committed_competition_validates():
    for name in ["digits", "mnist", "dogscats", "statefarm"]:
        config = load_config(name, root=REPO)
        assert config.stage_names[0] == "download"
    offline = REPO / "configs" / "offline"
    for overlay in sorted(offline.glob("*.yaml")):
        comp = overlay.stem.split("-")[0]
        if (REPO / "configs" / f"{comp}.yaml").is_file():
            load_config(comp, root=REPO, extra_files=[overlay])
        else:  # an overlay over a competition's own offline overlay (fast.yaml, mobilenetv2.yaml): its network wins
            import yaml

            backbone = yaml.safe_load(overlay.read_text())["precompute"]["backbone"]
            for base in ("dogscats", "statefarm"):
                assert load_config(base, root=REPO, extra_files=[offline / f"{base}.yaml", overlay]).get(
                    "precompute.backbone") == backbone


def test_defaults_hold_every_key_each_with_a_comment():
    text = (REPO / "configs" / "defaults.yaml").read_text()
    defaults = yaml.safe_load(text)
    schema = config_model()
    assert set(defaults) == set(schema.model_fields)
    for section, fields in defaults.items():
        if isinstance(fields, dict):
            model = schema.model_fields[section].annotation
            if not hasattr(model, "model_fields"):  # named entries (`features`), none by default
                assert fields == {}, section
                continue
            assert set(fields) == set(model.model_fields), section
    for line in text.splitlines():
        if re.match(r"^\s*[a-z_]+:\s*\S", line):  # a key with a value on the line
            assert "#" in line, f"defaults.yaml line without a comment: {line!r}"


def _error(**kwargs) -> str:
    with pytest.raises(PipelineError) as caught:
        load_config(**kwargs)
    return str(caught.value)


def test_unknown_key_names_file_key_and_suggestion(project):
    text = (project / "configs" / "digits.yaml").read_text()
    assert "  fraction: 0.2\n" in text
    write_config(project, "typo", text.replace("  fraction: 0.2\n", "  fracton: 0.2\n"))
    message = _error(comp="typo")
    assert "configs/typo.yaml" in message
    assert "split.fracton" in message
    assert "did you mean 'fraction'" in message
    assert "allowed keys here: folds, fraction, seed, strategy, valid_fold" in message


def test_wrong_type_names_the_set_argument_key_value_and_rule(project):
    message = _error(comp="digits", sets=["split.fraction=lots"])
    assert "--set split.fraction=lots" in message and "split.fraction" in message and "'lots'" in message
    assert "valid number" in message
    message = _error(comp="digits", sets=["split.fraction=1.5"])
    assert "less than 1" in message


def test_wrong_choice_lists_the_allowed_ones(project):
    message = _error(comp="digits", sets=["split.strategy=by_driver"])
    assert "split.strategy" in message and "'random', 'group', 'kfold' or 'group_kfold'" in message


def test_missing_required_value_names_the_key(project):
    write_config(project, "noslug", "competition:\n  task: binary\n")
    message = _error(comp="noslug")
    assert "competition.slug" in message and "not set" in message
    assert "competition.classes" in message


def test_cross_field_rule_names_the_section(project):
    message = _error(comp="digits", sets=["competition.clip=[0.9, 0.1]"])
    assert "competition" in message and "clip must satisfy" in message


def test_malformed_yaml_gives_file_line_and_column(project):
    write_config(project, "broken", "competition:\n  slug: x\n  classes: [a, b\nsplit: {}\n")
    message = _error(comp="broken")
    assert re.search(r"configs/broken\.yaml:\d+:\d+: malformed YAML", message), message


def test_duplicate_yaml_key_is_an_error_not_a_silent_override(project):
    write_config(project, "twice", "split:\n  seed: 1\nsplit:\n  seed: 2\n")
    message = _error(comp="twice")
    assert re.search(r"configs/twice\.yaml:3:1: malformed YAML: duplicate key 'split'", message), message


def test_unknown_competition_lists_the_known_ones(project):
    message = _error(comp="statefram")
    assert "unknown competition 'statefram'" in message
    assert "digits, dogscats, mnist, statefarm" in message


def test_set_key_that_does_not_exist(project):
    message = _error(comp="digits", sets=["split.fracton=0.1"])
    assert message.startswith("--set split.fracton=0.1: unknown key 'split.fracton'")
    assert "did you mean 'fraction'" in message
    assert "unknown key" in _error(comp="digits", sets=["nosuchsection.x=1"])
    assert "expected dotted.key=value" in _error(comp="digits", sets=["split.fraction"])


def test_stage_list_is_checked(project):
    assert "unknown stage 'splt'" in _error(comp="digits", sets=["stages=[download, splt]"])
    assert "'split' needs 'download', which is not listed" in _error(comp="digits", sets=["stages=[split]"])


def test_settings_that_name_a_predicting_stage_are_checked_against_the_registry(project):
    from pipeline.engine.registry import all_stages, predicting_stages

    declared = {name for name, stage in all_stages().items() if stage.predicts is not None}
    assert set(predicting_stages()) == declared >= {"finetune", "bnretrain", "tune", "ensemble", "cv", "smooth",
                                                     "pseudo", "blend"}
    assert not {"download", "split", "precompute", "augment", "submit"} & declared
    message = _error(comp="digits", sets=["submit.source=precompute"])
    assert "submit.source: 'precompute' is not a predicting stage; one of" in message and "ensemble" in message
    assert "(did you mean 'ensemble'?)" in _error(comp="digits", sets=["submit.source=ensembel"])
    loop = ["stages=[download, precompute, split, finetune, smooth, pseudo, submit]", "smooth.source=pseudo",
            "pseudo.source=smooth"]
    assert "--set pseudo.source=smooth: pseudo.source: 'smooth' reads pseudo itself" in _error(comp="digits", sets=loop)
    assert "'blend' reads blend itself" in _error(comp="digits", sets=[
        "stages=[download, split, blend, submit]", "blend.sources=[{stage: blend}, {stage: cv}]"])


def test_stages_run_in_the_order_their_needs_give_whatever_the_listing(project):
    listed = load_config("digits", sets=["stages=[submit, ensemble, finetune, precompute, split, download]"])
    order = listed.stage_names
    assert order == load_config("digits").stage_names
    assert order[0] == "download" and order[-1] == "submit"
    for stage in ("finetune", "ensemble"):
        assert order.index("split") < order.index(stage) and order.index("precompute") < order.index(stage)


def test_submission_name_template_is_checked(project):
    message = _error(comp="dogscats", sets=["submit.name='{comp}-{seed}'"])
    assert "submit.name" in message and "{comp}, {source} and {fingerprint}" in message


def test_committed_defaults_and_key_table_are_what_the_code_generates():
    """`configs/defaults.yaml` and docs' key table are generated from the pydantic fields (`kp config --defaults`)."""
    from pipeline.engine.config_reference import config_table, defaults_yaml, with_table

    assert (REPO / "configs" / "defaults.yaml").read_text() == defaults_yaml(), "run kp config --defaults"
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert with_table(doc, config_table(), "docs/configuration.md") == doc, "run kp config --defaults"


def test_every_key_has_a_default_and_a_description():
    for section, field in config_model().model_fields.items():
        model = field.annotation
        for key, sub in getattr(model, "model_fields", {}).items():
            assert sub.description, f"{section}.{key} has no description"
            assert not sub.is_required(), f"{section}.{key} has no default"
