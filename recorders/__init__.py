"""recorders: runtime hooks (PyTorch, ONNX Runtime, CoreML, Hugging Face, scripts) that write
traces through tracefmt. Each ML framework is imported in exactly one module of this package."""
