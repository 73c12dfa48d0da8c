"""Evaluation: metrics as Kaggle computes them, predictions on disk, submission files, scoring a
file against hidden labels, and plots."""
