"""Drift of the traffic: online conformal test martingales and change detection per model stream."""
