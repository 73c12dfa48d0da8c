"""Data: safe archive extraction, the dataset index, validation splits, image decoding, pixel and
feature arrays on disk. Depends on `pipeline.core` only."""
