"""Export: training runs and diffusers folders to model packages (ONNX + manifest), the text
encoder to int8 ONNX, guidance models, and the ONNX graph passes (static shapes, placement)."""
