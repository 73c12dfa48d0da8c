"""Augmentation declared as data: albumentations transforms listed in YAML, checked strictly, drawn per row.

A config lists the transforms in the order they apply, each a one-key mapping from an
albumentations class name to its arguments, exactly as albumentations spells them:

    transforms:
      - Affine: {rotate: [-15, 15], translate_percent: {x: [-0.1, 0.1], y: [-0.1, 0.1]}, p: 1.0}
      - HorizontalFlip: {p: 0.5}

`transform_problem` builds each with albumentations' own `strict=True` checking (an unknown
transform, an unknown argument or a bad value is an error naming it). `RowAugmenter` applies the
list to uint8 images; the random draws for row `r` come from the seed `(*seed, r)` alone, so a
pass gives the same arrays however its rows are batched or spread over threads (each thread keeps
its own `Compose`: albumentations' random state is not thread-safe). Imports albumentations
(about 1 s) inside the functions only.
"""
from __future__ import annotations

import difflib
import os
import re
import threading
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI check at import

TransformSpec = list[dict[str, Any]]


def _build(spec: TransformSpec):
    """An albumentations Compose from a transform list; raises ValueError naming the bad entry."""
    import albumentations as A

    transforms = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"transforms[{i}]: expected one mapping `Name: {{argument: value}}`, got {entry!r}")
        (name, arguments), = entry.items()
        cls = getattr(A, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            close = difflib.get_close_matches(str(name), [n for n in dir(A) if not n.startswith("_")], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (names as in albumentations, e.g. Affine, HorizontalFlip)"
            raise ValueError(f"transforms[{i}]: {name!r} is not an albumentations transform{hint}")
        if arguments is not None and not isinstance(arguments, dict):
            raise ValueError(f"transforms[{i}].{name}: expected a mapping of arguments, got {arguments!r}")
        try:
            transforms.append(cls(**(arguments or {}), strict=True))
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            reason = " ".join(re.sub(r"For further information visit \S+", "", str(exc)).split())[:400]
            raise ValueError(f"transforms[{i}].{name}: {reason}") from None
    return A.Compose(transforms)


def transform_problem(spec: TransformSpec) -> str | None:
    """Why albumentations refuses this transform list, or None when it builds."""
    try:
        _build(spec)
    except ValueError as exc:
        return str(exc)
    return None


PASS_SUBSETS = ("train", "test")  # a pass's seed holds its subset's position here


def pass_seed(seed: int, subset: str, number: int) -> tuple[int, int, int]:
    """The seed of augmented pass `number` (1-based; 0 is the clean images) of `subset` (train | test)
    under `augment.seed`: what augment's passes, tune's test-time passes, the preview and a kernel's
    passes all draw from, so a row's version is the same wherever it is drawn."""
    return (int(seed), PASS_SUBSETS.index(subset), int(number))


def row_seed(seed: tuple[int, ...], row: int) -> int:
    """The albumentations seed of one row: a function of the pass's seed and the row number only."""
    return int(np.random.SeedSequence([*seed, row]).generate_state(1)[0] >> 1)


class RowAugmenter:
    """`augmenter(image, row)`: one row's augmented version in a pass seeded by `seed`.

    Args:
        spec: the transform list (checked by `transform_problem`).
        seed: the pass's seed, e.g. (config seed, subset, pass number).
    """

    def __init__(self, spec: TransformSpec, seed: tuple[int, ...]):
        self.spec, self.seed = spec, tuple(int(s) for s in seed)
        self._local = threading.local()

    def __call__(self, image: np.ndarray, row: int) -> np.ndarray:
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = _build(self.spec)
        compose.set_random_seed(row_seed(self.seed, int(row)))
        out = compose(image=image)["image"]
        return out.reshape(image.shape).astype(image.dtype, copy=False)
