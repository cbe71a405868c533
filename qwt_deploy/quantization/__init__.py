"""Where quantizers go for each target, their arithmetic, and the PyTorch simulation."""
