"""Torch side of oodserve: flows, SNGP, training, calibration, export and shipped bundles."""
