"""The BatchTopK family: the whole-batch top-k selection and its fused training step."""
