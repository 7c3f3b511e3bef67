"""oodserve benchmarks and load drivers: `oodserve bench` (throughput against raw onnxruntime) and `bench --load`
(bounded soak run), scripts and their results. Installed with the dev extra, never in the runtime image."""
