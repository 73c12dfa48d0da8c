"""Networks: ImageNet backbones, dense heads, the from-scratch ladder, which network the `model`
section builds, and inference. Keras is imported inside functions only."""
