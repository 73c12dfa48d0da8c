"""Training: Keras fit mechanics (optimizer, schedule, best epoch), augmentation, and the recipe that
turns the config into one trained model with its files."""
