"""The standard SAE family: a ReLU code with an L1 penalty weighted by the decoder rows' norms."""
