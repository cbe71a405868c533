"""Steps 2 and 3 of the pipeline: calibration data, range observers, and the closed-form
compensation solvers (QwT-v2 CWAC, bias correction), run sequentially over the graph."""
