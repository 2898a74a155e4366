"""ONNX export, onnxruntime sessions, faiss index, serving path."""
