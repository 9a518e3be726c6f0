"""PyTorch -> ONNX export and model-package writing (needs torch and onnx; not for inference)."""
