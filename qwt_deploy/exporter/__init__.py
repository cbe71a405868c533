"""Step 4 of the pipeline: the IR and its quantization parameters -> QDQ ONNX."""
