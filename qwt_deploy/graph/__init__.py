"""The graph IR shared by the PyTorch simulation and the ONNX emitter."""
