"""Step 1 of the pipeline: read a model file and capture it as the graph IR."""
