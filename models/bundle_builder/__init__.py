"""Bundle builder: train or take checkpoints, export to ONNX, calibrate, choose the fusion, write the manifest."""
