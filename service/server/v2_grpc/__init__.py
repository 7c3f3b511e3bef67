"""KServe v2 over gRPC: the generated messages and the servicer."""
