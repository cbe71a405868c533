"""Step 7: check the backend against the PyTorch simulation, in units of quantization steps."""
