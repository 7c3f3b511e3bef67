"""Open Inference Protocol v1 of oodserve: model summaries, scoring of JSON, .npy, PNG and multipart bodies, sampling."""
