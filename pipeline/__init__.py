"""kaggle-pipeline: a staged, cached Keras pipeline for Kaggle image competitions.

The library half of the project: configuration (`config`), the artifact cache (`cache`), the stage
registry and runner (`stages_registry`, `runner`), data handling (`archive`, `dataset_index`,
`splits`) and the command line (`cli`). Stage recipes live in the top-level `stages` package.
Nothing imported here may import TensorFlow: `kp --help` and `kp status` must start fast.
"""

import os as _os

# TensorFlow's C++ INFO lines (CPU features, oneDNN) drown the pipeline's own output; warnings stay.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
