"""Evaluation of a bundle: OOD metrics, verdict false-positive rates, plots and the report."""
