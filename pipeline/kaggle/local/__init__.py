"""A local server speaking Kaggle's competition API: `python -m pipeline.kaggle.local` (see `server`)."""
