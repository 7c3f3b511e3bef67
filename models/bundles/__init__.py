"""Building bundles: the trained builder, the closed-form demo builder, the shared signal fit and calibration path,
label-free fusion choice. The subdirectories hold the shipped bundles themselves (data, not code)."""
