"""Model runtimes behind the `Backend` protocol: ONNX Runtime (TensorRT/CUDA/CPU) and native TensorRT."""
