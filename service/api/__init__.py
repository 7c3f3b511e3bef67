"""Thin FastAPI routers: health, v1 scoring and models, Prometheus metrics; shared deps and error handling."""
