"""Prometheus metrics: the service registry, score and verdict series, scheduler and engine collectors."""
