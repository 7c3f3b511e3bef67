"""Serving load and peer tools: what `oodserve bench` runs (dev extra; not imported by the server)."""
