"""onnxruntime side: execution providers, sessions with checked input/output names, batch runs."""
