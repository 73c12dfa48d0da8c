"""The embedded `digits` competition: scikit-learn's 1,797 handwritten digits in Kaggle's layout.

Writes `train.csv` (`label,pixel0..pixel63`), `test.csv` and `sample_submission.csv`
(`ImageId,Label`) exactly as Kaggle's digit-recognizer ships them (8x8 images instead of 28x28,
values scaled from 0..16 to 0..255), plus `solution.csv` with the held-out test labels, which only
a scoring server or a benchmark may read. Needs no network and no credentials.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TEST_SIZE = 300
SEED = 2017


def write_digits_competition(raw: Path, solution: Path) -> dict[str, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import pandas as pd

    digits = load_digits()
    pixels = np.minimum(digits.data * 16, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=TEST_SIZE, stratify=labels, random_state=SEED
    )
    columns = [f"pixel{i}" for i in range(pixels.shape[1])]
    raw.mkdir(parents=True, exist_ok=True)
    train = pd.DataFrame(train_x, columns=columns)
    train.insert(0, "label", train_y)
    train.to_csv(raw / "train.csv", index=False)
    pd.DataFrame(test_x, columns=columns).to_csv(raw / "test.csv", index=False)
    image_ids = np.arange(1, len(test_x) + 1)
    pd.DataFrame({"ImageId": image_ids, "Label": 0}).to_csv(raw / "sample_submission.csv", index=False)
    pd.DataFrame({"ImageId": image_ids, "Label": test_y}).to_csv(solution, index=False)
    return {"train": len(train_x), "test": len(test_x)}
