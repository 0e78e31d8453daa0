"""Exporting a configured pipeline, its negative bank and guidance to an ONNX bundle (and TensorRT engines)."""
