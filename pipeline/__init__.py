"""kaggle-pipeline: a staged, cached Keras pipeline for Kaggle image competitions.

One folder per purpose, each a layer (docs/layout.md): `core` (what a stage is written against:
Stage, the config's typed face, cache, run store, artifact names, errors) < `data` < `models`,
`evaluation` < `training`, `kaggle` < the `stages` package < `engine` (config, registry, status,
runner, variants: the only code that imports stages) < `experiments` (sweeps, runs table, report),
`shipping` (code submissions) < `cli`. No module imports from a layer above its own. Nothing
imported at start-up may import TensorFlow or pandas: `kp --help` and `kp status` must start fast.
"""

import os as _os

# TensorFlow's C++ INFO lines (CPU features, oneDNN) drown the pipeline's own output; warnings stay.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
