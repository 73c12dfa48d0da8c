"""Training: Keras fit mechanics (optimizer, schedule, best epoch), augmentation, pseudo-labels, and the
recipes (`pipeline.training.recipes`) that turn settings into trained models with their files."""
