"""The JumpReLU family: per-latent learned thresholds, trained with straight-through estimators."""
