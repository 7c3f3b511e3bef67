"""Pure numpy scoring: signal kinds, conformal p-values, p-value fusion and the per-instance verdict."""
