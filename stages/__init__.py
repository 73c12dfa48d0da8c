"""The pipeline's stages, one module each; every module with a `STAGE` is a stage and a `kp` command.

Stage modules import only light modules at top level (TensorFlow and Keras go inside `run`).
"""
