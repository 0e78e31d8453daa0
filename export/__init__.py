"""ONNX and TensorRT export of the guided denoising step (installed as ``safe_denoiser.export``)."""
