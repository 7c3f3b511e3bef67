"""Open Inference Protocol v2 (KServe / Triton REST): routes and the tensor codec."""
