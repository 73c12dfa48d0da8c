"""`kp show`: a grid of training images with their labels, and with `augmented` their augmented versions.

fastai's `show_batch`: the first look at a competition's data. A few training images of every class
(a seeded draw), decoded at `competition.image_size` exactly as precompute sees them (image files)
or reshaped from the pixel CSV (digit layouts); with `augmented`, each beside its versions in the
augment stage's passes 1..N, drawn with the same seeds as those passes, so the grid shows exactly
what augment computes for those rows. Reads the download stage's output (the caller brings it up
to date). Imports TensorFlow for image files.
"""
from __future__ import annotations
from pipeline.core.config_reader import ConfigReader
from pipeline.core.readers import read_table

from pathlib import Path

import numpy as np

def pick_rows(labels: list[str], classes: list[str], per_class: int, seed: int = 0) -> list[int]:
    """Up to `per_class` training rows of each class, in class order, drawn with `seed`."""
    order = np.random.default_rng(seed).permutation(len(labels))
    picked = {name: [] for name in classes}
    for row in order:
        chosen = picked.get(labels[row])
        if chosen is not None and len(chosen) < per_class:
            chosen.append(int(row))
    return [row for name in classes for row in sorted(picked[name])]


IMAGE_READS = ("competition.image_size", "competition.channels", "download.layout", "download.label_column")


def load_training_images(config: ConfigReader, download_dir: Path, index, rows: list[int]) -> list[np.ndarray]:
    """The training rows `rows` (positions among the index's train rows) as uint8 images of
    `competition.image_size`, as precompute decodes them.

    Args:
        config: a config (view) that reads `IMAGE_READS`.
        download_dir: the download stage's output (its `raw/` files).
        index: the index's training rows, in order.
        rows: positions among them.
    """

    from pipeline.core.artifacts import RAW_DIR

    raw = download_dir / RAW_DIR
    height, width = config.competition.image_size
    channels = config.competition.channels
    chosen = index.iloc[rows]
    if config.get("download.layout") == "pixels_csv":
        wanted = set(chosen["row"])
        table = read_table(raw / chosen["path"].iloc[0], skiprows=lambda line: line > 0 and line - 1 not in wanted)
        pixels = table.drop(columns=[config.get("download.label_column")]).to_numpy()
        by_row = dict(zip(sorted(chosen["row"]), pixels))
        return [by_row[r].reshape(height, width, channels).astype(np.uint8) for r in chosen["row"]]
    from pipeline.data.images import decode_resize

    return [np.clip(np.round(np.asarray(decode_resize(str(raw / path), (height, width), channels))), 0, 255)
            .astype(np.uint8) for path in chosen["path"]]


def show_training_images(config: ConfigReader, per_class: int = 4, augmented: bool = False, passes: int = 3,
                         say=print) -> tuple[Path, list[dict]]:
    """Write the grid into `work/COMP/show/` from the download stage's current output.

    Args:
        config: the resolved config.
        per_class: images of each class.
        augmented: also each image's versions in augment's passes 1..`passes` (its `transforms`, its seeds).
        passes: versions per image with `augmented`.
        say: prints progress.

    Returns:
        (the PNG's path, one {"row", "id", "label"} per image shown, in grid order).
    """
    from pipeline.core.artifacts import INDEX_FILE, SHOW_AUGMENTED_PLOT, SHOW_DIR, SHOW_PLOT
    from pipeline.core.errors import PipelineError
    from pipeline.data.augmentation import RowAugmenter
    from pipeline.data.index import read_index

    index = read_index(config.work_dir / "download" / INDEX_FILE)
    train = index[index.subset == "train"].reset_index(drop=True)
    rows = pick_rows(train["label"].tolist(), config.competition.classes, per_class)
    if not rows:
        raise PipelineError(f"{config.work_dir / 'download' / INDEX_FILE}: no training rows to show")
    images = load_training_images(config, config.work_dir / "download", train, rows)
    versions = [[] for _ in images]
    if augmented:
        transforms, seed = config.get("augment.transforms"), config.get("augment.seed")
        if not transforms:
            raise PipelineError("kp show --augmented: augment.transforms is empty; nothing to show")
        # row r of training pass k is drawn from (seed, 0, k, r): the same draw as the augment stage's
        versions = [[RowAugmenter(transforms, (seed, 0, k))(image, row) for k in range(1, passes + 1)]
                    for row, image in zip(rows, images)]
    shown = [{"row": row, "id": train["id"][row], "label": train["label"][row]} for row in rows]
    out = config.work_dir / SHOW_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / (SHOW_AUGMENTED_PLOT if augmented else SHOW_PLOT)
    _plot_grid(images, versions, shown, path, f"{config.comp}: {per_class} training images per class"
               + (f", each with augment passes 1-{passes}" if augmented else ""))
    say(f"{len(images)} training images of {len(config.competition.classes)} classes")
    return path, shown


def _plot_grid(images, versions, shown, path: Path, title: str) -> None:
    """Without versions: a grid of images titled with their labels; with them: one image per row."""
    from pipeline.evaluation.plots import pyplot

    plt = pyplot()
    if any(versions):
        cells = [[(image, f"{s['label']} ({s['id']})")] + [(v, f"pass {k}") for k, v in enumerate(vs, 1)]
                 for image, vs, s in zip(images, versions, shown)]
    else:
        columns = min(8, len(images))
        flat = [(image, f"{s['label']} ({s['id']})") for image, s in zip(images, shown)]
        cells = [flat[i:i + columns] for i in range(0, len(flat), columns)]
    n_rows, n_columns = len(cells), max(len(row) for row in cells)
    fig, axes = plt.subplots(n_rows, n_columns, figsize=(1.9 * n_columns, 2.0 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(cells):
        for c, (image, label) in enumerate(row):
            axes[r][c].imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
            axes[r][c].set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
