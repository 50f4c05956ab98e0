"""Checkpoint -> plan directory (ONNX graphs, TensorRT engines, manifest)."""
