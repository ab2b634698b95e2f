"""The Gated SAE family: a gate path and a magnitude path sharing one encoder (Rajamanoharan et al. 2024)."""
