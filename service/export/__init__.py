"""Exports of a bundle to other servers (a Triton model repository)."""
