"""Kaggle: the official client wrapped (`api`), uploading and reading scores back (`leaderboard`),
the validation-vs-leaderboard ledger, and a local Kaggle-compatible server (`local`)."""
