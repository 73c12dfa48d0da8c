"""kaggle-pipeline: a staged, cached Keras pipeline for Kaggle image competitions.

The engine lives at this level: the command line (`cli`), configuration (`config`), the stage
registry (`registry`), staleness (`status`) and the runner (`runner`); it is the only code that
imports the stage recipes of the top-level `stages` package. The library is layered below it:
`core` (what a stage is written against: Stage, cache, run store, artifact names, errors), `data`,
`models`, `evaluation`, `training` and `kaggle`; no module imports from a layer above its own.
Nothing imported at start-up may import TensorFlow or pandas: `kp --help` and `kp status` must
start fast.
"""

import os as _os

# TensorFlow's C++ INFO lines (CPU features, oneDNN) drown the pipeline's own output; warnings stay.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
