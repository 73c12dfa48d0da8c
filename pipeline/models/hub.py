"""KerasHub presets as backbones: `precompute.backbone: hub:PRESET`.

PRESET is a folder saved by KerasHub (`config.json`, `model.weights.h5`, `image_converter.json`:
`Backbone.save_to_preset` and `ImageConverter.save_to_preset`), read offline, or a preset name
(`hub:efficientnet_b0_ra_imagenet`) that KerasHub downloads on a machine with a network. The preset's
image converter (its resizing and rescaling) goes inside the feature model, so precompute feeds it
RGB 0..255 at the competition's size; `cut: pool` averages a feature map over its positions (a
token sequence over its tokens). `precompute.weights: none` builds the preset's network with random
weights (tests, speed checks); any other value keeps the preset's own. Imports KerasHub and Keras
inside the functions: call only from inside a stage's `run`.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import PipelineError

HUB_PREFIX = "hub:"


def hub_preset(backbone: str) -> str | None:
    """The preset a `precompute.backbone` names (`hub:PRESET` -> PRESET), or None for another backbone."""
    return backbone[len(HUB_PREFIX):] if backbone.startswith(HUB_PREFIX) else None


def preset_location(preset: str, root: Path) -> str:
    """A preset folder (relative to the project root, or absolute) as its path, a preset name as it is."""
    path = Path(preset).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PipelineError(f"precompute.backbone hub:{preset}: {path} has no config.json (a KerasHub preset "
                                "folder holds config.json and model.weights.h5, as Backbone.save_to_preset writes)")
        return str(path)
    if "/" in preset or preset.startswith("."):
        raise PipelineError(f"precompute.backbone hub:{preset}: no such folder {path}")
    return preset


def hub_feature_model(preset: str, root: Path, input_shape: tuple[int, int, int], cut: str, random_weights: bool):
    """The feature model of a KerasHub preset: RGB 0..255 at `input_shape` -> its image converter -> backbone.

    Args:
        preset: a preset folder or name (what follows `hub:`).
        root: the project root a relative folder resolves against.
        input_shape: (height, width, 3) the images come at.
        cut: `pool` (average over positions or tokens) | `conv` (the backbone's output as it is).
        random_weights: build the network without loading the preset's weights.

    Returns:
        (keras.Model, a display name).
    """
    import keras

    try:
        import keras_hub
    except ImportError:
        raise PipelineError("precompute.backbone hub:...: KerasHub is not installed (make installs it: "
                            "pip install --no-deps keras-hub)") from None
    location = preset_location(preset, root)
    try:
        backbone = keras_hub.models.Backbone.from_preset(location, load_weights=not random_weights)
        converter = keras_hub.layers.ImageConverter.from_preset(location)
    except ImportError as exc:  # a preset name: kagglehub downloads it
        raise PipelineError(f"precompute.backbone hub:{preset}: downloading a preset by name needs {exc.name or 'kagglehub'}"
                            ", which is not installed (it pins a kagglesdk that the kaggle client refuses); on a "
                            "machine with a network save the preset to a folder (keras_hub.models.Backbone.from_preset("
                            "NAME).save_to_preset(DIR), and the ImageConverter alike) and set hub:DIR") from None
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise PipelineError(f"precompute.backbone hub:{preset}: KerasHub could not load it: {exc}") from None
    inputs = keras.Input(input_shape)
    outputs = backbone(converter(inputs))
    if cut == "pool" and len(outputs.shape) == 4:
        outputs = keras.layers.GlobalAveragePooling2D()(outputs)
    elif cut == "pool" and len(outputs.shape) == 3:
        outputs = keras.layers.GlobalAveragePooling1D()(outputs)
    name = Path(location).name if Path(location).is_dir() else location
    return keras.Model(inputs, outputs, name=f"{name}_features"), f"hub_{name}"
