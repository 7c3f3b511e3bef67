"""Serving side of oodserve: bundle loading, onnxruntime, scoring and the HTTP API (never imports torch)."""

__version__ = "0.1.0"
