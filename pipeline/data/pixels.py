"""Raw pixels of indexed items, in index order, as float32 (n, height, width, channels) chunks.

For `pixels_csv` layouts the rows come from the competition's CSV (digit-recognizer); for image
layouts the files are decoded and resized. Used by precompute for from-scratch models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_table


def pixel_chunks(raw: Path, rows: pd.DataFrame, shape: tuple[int, int, int], layout: str,
                 chunk: int) -> Iterator[np.ndarray]:
    if layout == "pixels_csv":
        files = rows["path"].unique()
        if len(files) > 1:
            raise PipelineError(f"pixel rows of one subset must come from one CSV, got {list(files)}")
        if not len(files):
            return
        table = read_table(raw / files[0], dtype=str)
        columns = [c for c in table.columns if c.startswith("pixel")]
        if len(columns) != int(np.prod(shape)):
            raise PipelineError(f"{raw / files[0]}: {len(columns)} pixel columns, competition.image_size x "
                                f"channels needs {int(np.prod(shape))}")
        # only the indexed rows: the ones download skipped (non-numeric, out of range) are never parsed
        selected = table.iloc[rows["row"].to_numpy()][columns].astype(np.float32).to_numpy().reshape((-1, *shape))
        for start in range(0, len(selected), chunk):
            yield selected[start:start + chunk]
        return
    from pipeline.data.images import checked_batches

    for batch in checked_batches([raw / p for p in rows["path"]], shape[:2], chunk, channels=shape[2]):
        yield batch.numpy()
