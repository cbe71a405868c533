"""Step 6: run the exported model (ONNX Runtime on CPU here; TensorRT where it exists)."""
