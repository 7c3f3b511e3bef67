"""SNGP: spectral-normalised residual classifier with a random-feature Gaussian-process output (Liu et al. 2020)."""
