"""The edge runtime: run an exported INT8 model where PyTorch has no place.

It imports only onnxruntime, numpy, Pillow and the standard library (a test runs it with
``import torch`` made impossible), so a container for an ARM board or a gateway stays small.

    metadata    the ONNX metadata contract written by qwt-export (preprocessing, input shape, labels)
    preprocess  image bytes -> input tensor, from that metadata
    model       the ONNX Runtime session, input validation, top-k
    batcher     a small dynamic batcher (max batch size, max wait)
    metrics     request counts and latency histograms, Prometheus text format
    server      the HTTP server behind ``qwt-serve``
"""
