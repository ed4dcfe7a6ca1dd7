"""Deployment tools: ONNX export and INT8 quantization, ONNX Runtime and compiled models, model profiles.
Benchmarks live in `mobilezoo.bench`."""
