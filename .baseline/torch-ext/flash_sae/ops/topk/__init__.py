"""The TopK family: the encoder with exact top-k selection, and the fused training step."""
