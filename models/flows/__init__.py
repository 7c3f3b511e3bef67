"""Normalizing flow zoo (NICE, RealNVP/Glow, neural spline, i-ResNet) with exact ONNX export."""
