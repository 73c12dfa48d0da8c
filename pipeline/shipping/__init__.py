"""Shipping a code submission: the offline bundle (`packaging`), what its kernel runs (`kernel`), and the
bundle pushed, run and submitted through Kaggle (`code_submission`)."""
