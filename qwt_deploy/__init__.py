"""qwt-deploy: PyTorch model -> QwT-compensated INT8 -> folded QDQ ONNX -> ONNX Runtime.

The pipeline reads top to bottom in the package layout:

    qwt_deploy/load      read a model file and capture it as a small graph IR
    calibration/         calibration data, observers, and the closed-form compensation solvers
    qwt_deploy/quantize  where quantizers go (per target) and the PyTorch fake-quant simulation
    qwt_deploy/export    the IR -> QDQ ONNX emitter
    graph_passes/        ONNX passes on onnx-graphsurgeon (CWAC folding)
    qwt_deploy/runtime   ONNX Runtime sessions
    qwt_deploy/check     agreement between PyTorch simulation and the backend
"""

__version__ = "0.1.0"
