"""split: design the validation set, the decision every score after it depends on.

Recipe: read the training rows of the index -> assign each a fold by `split.strategy` (`random`
stratified by class; `group`, holding out whole groups such as State Farm's drivers; `kfold`;
`group_kfold`) -> write `split.csv` (id, fold, side = train | valid, aligned with the index's
training rows) and a report of sizes per class per side and groups per side. Warns when a random
split is used on data that has groups: validation would then flatter the leaderboard.
"""
from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.artifacts import INDEX_FILE, REPORT_FILE, SPLIT_FILE
from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Stage, StageContext


class Settings(StrictModel):
    """The `split` section: which training rows validate (a held-out side, or folds)."""

    strategy: Literal["random", "group", "kfold", "group_kfold"] = Field("random", description=(
        "random (stratified) | group (whole groups) | kfold | group_kfold"))
    fraction: float = Field(0.2, gt=0, lt=1, description=(
        "random, group: share of training rows held out for validation"))
    seed: int = Field(42, ge=0, le=2**32 - 1, description="the same seed gives the same split")
    folds: int = Field(5, ge=2, description="kfold, group_kfold: number of folds")
    valid_fold: int = Field(0, ge=0, description="kfold, group_kfold: the fold used as validation by later stages")

    @model_validator(mode="after")
    def _fold_exists(self):
        if self.valid_fold >= self.folds:
            raise ValueError(f"valid_fold {self.valid_fold} must be below folds {self.folds}")
        return self


def check(s: Settings, known: dict[str, dict]) -> None:
    """Settings the downloaded data cannot satisfy, refused before anything runs (`Stage.check`):
    a stratified split needs a row of every class on each side, k folds need k rows of some class
    (kfold) or k groups (group_kfold), and a group split needs two groups."""
    counts = known.get("download")
    if not counts:
        return  # not downloaded yet: the split checks again when it runs
    n, per_class, n_groups = counts["n_train"], counts["train_per_class"], counts.get("n_groups", 0)
    if s.strategy == "random":
        n_valid, n_train, k = math.ceil(s.fraction * n), math.floor((1 - s.fraction) * n), len(per_class)
        if min(n_valid, n_train) < k:
            raise PipelineError(f"split.fraction={s.fraction:g} holds out {n_valid:,} of the {n:,} training rows and "
                                f"keeps {n_train:,}: a split stratified by class needs at least one row of each of "
                                f"the {k} classes on each side (a fraction between {k / n:.3g} and {1 - k / n:.3g})")
    if s.strategy == "kfold" and s.folds > max(per_class.values(), default=0):
        raise PipelineError(f"split.folds={s.folds}: more folds than the {max(per_class.values(), default=0)} rows of "
                            f"the largest class (rows per class: {per_class}); stratified folds need fewer")
    if s.strategy == "group_kfold" and 0 < n_groups < s.folds:  # none at all: the run says what to set
        raise PipelineError(f"split.folds={s.folds}: more folds than the {n_groups} groups of the download")
    if s.strategy == "group" and 0 < n_groups < 2:
        raise PipelineError(f"split.strategy=group: the download has {n_groups} group; a group split needs two")


def run(ctx: StageContext) -> dict:
    import numpy as np
    import pandas as pd

    from pipeline.data.index import read_index
    from pipeline.data.splits import group_kfold, group_split, kfold, random_split

    s = ctx.settings
    check(s, {"download": Manifest.read(ctx.input("download")).metrics})
    index = read_index(ctx.input("download") / INDEX_FILE)
    train = index[index.subset == "train"].reset_index(drop=True)
    labels, groups = train["label"].to_numpy(), train["group"].to_numpy()
    has_groups = bool((groups != "").all())
    if s.strategy in ("group", "group_kfold") and not has_groups:
        raise PipelineError(
            f"split.strategy={s.strategy!r} needs a group for every training row, but this competition's "
            "index has none (set download.groups, or use split.strategy: random)"
        )
    if s.strategy == "random" and has_groups:
        ctx.warn(
            f"random split on data with {len(set(groups))} groups: the same group lands on both sides, "
            "so validation will look better than the leaderboard; use split.strategy: group"
        )

    if s.strategy == "random":
        folds = random_split(labels, s.fraction, s.seed)
    elif s.strategy == "group":
        folds = group_split(labels, groups, s.fraction, s.seed)
    elif s.strategy == "kfold":
        folds = kfold(labels, s.folds, s.seed)
    else:
        folds = group_kfold(labels, groups, s.folds, s.seed)
    valid_fold = 0 if s.strategy in ("random", "group") else s.valid_fold
    valid = folds == valid_fold

    split = pd.DataFrame({"id": train["id"], "fold": folds, "side": np.where(valid, "valid", "train")})
    split.to_csv(ctx.out / SPLIT_FILE, index=False)
    report = _report(s.strategy, labels, groups if has_groups else None, valid, folds)
    (ctx.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _report(strategy, labels, groups, valid, folds) -> dict:
    import numpy as np

    from pipeline.data.splits import class_balance

    sides = {"train": ~valid, "valid": valid}
    report = {
        "strategy": strategy,
        "n_train": int((~valid).sum()),
        "n_valid": int(valid.sum()),
        "valid_fraction": round(float(valid.mean()), 4),
        "class_balance_tv": round(class_balance(labels, valid), 4),
        "per_class": {
            side: {str(c): int(n) for c, n in zip(*np.unique(labels[mask], return_counts=True))}
            for side, mask in sides.items()
        },
        "n_folds": int(len(np.unique(folds))),
    }
    if groups is not None:
        report["groups"] = {side: sorted(set(groups[mask])) for side, mask in sides.items()}
        report["groups_on_both_sides"] = sorted(set(groups[valid]) & set(groups[~valid]))
        report["n_groups"] = len(set(groups))
    return report


def _headline(m: dict) -> str:
    text = f"{m['strategy']}: {m['n_valid']:,} valid ({m['valid_fraction']:.1%}) / {m['n_train']:,} train"
    if "groups" in m:
        text += f", {len(m['groups']['valid'])} of {m['n_groups']} groups in valid"
        if m["groups_on_both_sides"]:
            text += f" ({len(m['groups_on_both_sides'])} on both sides)"
    return text


STAGE = Stage(
    name="split",
    settings=Settings,
    run=run,
    needs=("download",),
    outs=(SPLIT_FILE, REPORT_FILE),
    headline=_headline,
    check=check,
)
